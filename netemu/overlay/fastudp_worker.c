/*
 * The udp backend's data path worker, compiled: netemu.overlay.fastudp's
 * Worker (tx_loop, rx_loop and what they call) in C, one process per
 * direction, with the same command line, counters, heartbeat and peer table:
 *
 *   fastudp-worker {tx|rx} TUN_FD SOCK_FD COUNTERS_FD PORT TUN_ADDRESS [--gso] [--plain]
 *   fastudp-worker --counters     (the counters' names, in the order of their slots)
 *
 * Why it exists: a small packet's round trip crosses four worker hops, and a
 * Python worker woken from sleep spends 20-30 us of cold interpreter on each
 * (issue 17's breakdown); a Python worker is also a whole interpreter, about
 * 6.7 MB of memory per worker, two per node (issue 14). This one does the same
 * work in a few hundred kilobytes. The Python worker (fastudp.py) stays: it is
 * the reference every behaviour here follows (the tests run both), and the
 * fallback where no C compiler built this (udp.py chooses; the environment
 * variable NETEMU_UDP_WORKER=python forces it).
 *
 * The per-byte work (segmenting, coalescing, checks) is vnet_core.h, shared
 * with the Python helper _vnetc.c. Everything read from the underlay is
 * hostile until checked (see fastudp.py's docstring): what fails is dropped
 * and counted by reason, nothing a datagram holds may crash the worker.
 *
 * The peer table comes on stdin, one line per table (fastudp.peer_line):
 * "peers SUBNET=ADDRESS ...\n"; a thread reads it and swaps the table under a
 * mutex. End of input (the daemon is gone) ends the worker.
 */
#define _GNU_SOURCE
#include "vnet_core.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <unistd.h>

#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#define UDP_SEGMENT_ 103
#define UDP_GRO_ 104
#define MAX_UDP_PAYLOAD 65507
#define MAX_GSO_SEGMENTS 64
#define READ_SIZE (65536 + VNET_HDR_LEN)
#define RECV_SIZE (1 << 17)
#define SEGMENTS_SIZE (1 << 17)
#define MERGED_SIZE (2 * RECV_SIZE + VNET_HDR_LEN)    /* see vnet.coalesced_room */
#define WAKE_SECONDS 30                               /* fastudp.WAKE */

/* fastudp.COUNTERS, in its order (the test compares the two lists). */
#define COUNTER_NAMES \
    X(TX_PACKETS, "tx_packets") X(TX_BYTES, "tx_bytes") X(RX_PACKETS, "rx_packets") \
    X(RX_BYTES, "rx_bytes") X(DROP_UNKNOWN_SOURCE, "drop_unknown_source") \
    X(DROP_MALFORMED, "drop_malformed") X(DROP_TTL, "drop_ttl") X(DROP_NO_ROUTE, "drop_no_route") \
    X(ICMP_UNREACHABLE_SENT, "icmp_unreachable_sent") X(DROP_NOT_IPV4, "drop_not_ipv4") \
    X(TX_ERRORS, "tx_errors") X(RX_ERRORS, "rx_errors") X(RX_COALESCED, "rx_coalesced") \
    X(DROP_SPOOFED_SOURCE, "drop_spoofed_source") X(DROP_INTERNAL_ERROR, "drop_internal_error") \
    X(MALFORMED_TRUNCATED, "malformed_truncated") X(MALFORMED_VERSION, "malformed_version") \
    X(MALFORMED_HEADER_LENGTH, "malformed_header_length") \
    X(MALFORMED_TOTAL_LENGTH, "malformed_total_length") X(MALFORMED_CHECKSUM, "malformed_checksum") \
    X(MALFORMED_SEGMENT_SIZE, "malformed_segment_size")

#define X(id, name) id,
enum { COUNTER_NAMES NCOUNTERS };
#undef X
#define X(id, name) name,
static const char *const counter_names[] = {COUNTER_NAMES};
#undef X

/* malformed reasons, numbered as vnet_ipv4_problem's (1..5), then 6: segment size */
#define PROBLEM_TRUNCATED 1
#define PROBLEM_HEADER_LENGTH 3
#define PROBLEM_SEGMENT_SIZE 6

/* ---- the peer table ---------------------------------------------------------- */

typedef struct {
    uint32_t network, mask, hop;      /* a peer's subnet, and its underlay address (host order) */
} Route;

typedef struct {
    size_t n;
    Route routes[];                   /* longest prefix first */
} Table;

static Table *table;                  /* under table_lock; replaced whole by the control thread */
static pthread_mutex_t table_lock = PTHREAD_MUTEX_INITIALIZER;

static int by_prefix(const void *a, const void *b)
{
    uint32_t ma = ((const Route *)a)->mask, mb = ((const Route *)b)->mask;
    return ma == mb ? 0 : (ma > mb ? -1 : 1);
}

/* A table from LINE ("peers SUBNET=ADDRESS ..."), or NULL if it is not one. */
static Table *parse_peers(char *line)
{
    if (strncmp(line, "peers", 5) != 0)
        return NULL;
    size_t words = 0;
    for (char *c = line; *c; c++)
        words += *c == '=';
    Table *t = malloc(sizeof(Table) + (words ? words : 1) * sizeof(Route));
    if (t == NULL)
        return NULL;
    t->n = 0;
    char *save = NULL;
    for (char *word = strtok_r(line + 5, " \t\r\n", &save); word; word = strtok_r(NULL, " \t\r\n", &save)) {
        char *eq = strchr(word, '='), *slash = strchr(word, '/');
        struct in_addr network, hop;
        if (eq == NULL || slash == NULL || slash > eq || t->n >= words)
            goto bad;
        *eq = *slash = '\0';
        char *end;
        long length = strtol(slash + 1, &end, 10);
        if (*end || length < 0 || length > 32 || !inet_aton(word, &network) || !inet_aton(eq + 1, &hop))
            goto bad;
        uint32_t mask = length ? 0xFFFFFFFFu << (32 - length) : 0;
        t->routes[t->n++] = (Route){ntohl(network.s_addr) & mask, mask, ntohl(hop.s_addr)};
    }
    qsort(t->routes, t->n, sizeof(Route), by_prefix);
    return t;
bad:
    free(t);
    return NULL;
}

/* One line from stdin; 0 at its end (the daemon is gone). A table that does
 * not parse is ignored, as the Python worker ignores it. */
static int read_control(void)
{
    static char *line;
    static size_t room;
    if (getline(&line, &room, stdin) < 0)
        return 0;
    Table *t = parse_peers(line);
    if (t != NULL) {
        pthread_mutex_lock(&table_lock);
        Table *old = table;
        table = t;
        pthread_mutex_unlock(&table_lock);
        free(old);
    }
    return 1;
}

static void *follow_control(void *unused)
{
    (void)unused;
    while (read_control())
        ;
    _exit(0);
}

/* The peer whose subnet holds DESTINATION (longest prefix), 0 if none. */
static uint32_t next_hop(uint32_t destination)
{
    uint32_t hop = 0;
    pthread_mutex_lock(&table_lock);
    for (size_t i = 0; table && i < table->n; i++)
        if ((destination & table->routes[i].mask) == table->routes[i].network) {
            hop = table->routes[i].hop;
            break;
        }
    pthread_mutex_unlock(&table_lock);
    return hop;
}

/* What PEER leases: how many subnets (0: not a peer), and the first one. */
static size_t leases_of(uint32_t peer, Route *first)
{
    size_t n = 0;
    pthread_mutex_lock(&table_lock);
    for (size_t i = 0; table && i < table->n; i++)
        if (table->routes[i].hop == peer && n++ == 0)
            *first = table->routes[i];
    pthread_mutex_unlock(&table_lock);
    return n;
}

/* fastudp.Peers.leased_by: PEER may send INNER_SOURCE (a pod of a subnet it
 * leases, or its own underlay address). */
static int leased_by(uint32_t peer, uint32_t inner_source)
{
    int ok = inner_source == peer;
    pthread_mutex_lock(&table_lock);
    for (size_t i = 0; !ok && table && i < table->n; i++)
        ok = table->routes[i].hop == peer && (inner_source & table->routes[i].mask) == table->routes[i].network;
    pthread_mutex_unlock(&table_lock);
    return ok;
}

/* ---- the worker -------------------------------------------------------------- */

typedef struct {
    int tun, sock, port, gso, hdr_len, udp_merge;
    uint8_t tun_address[4];
    int64_t *counters, *heartbeat;
    uint8_t *segments, *merged_out;
    uint8_t held[MAX_UDP_PAYLOAD];
    size_t held_len, held_size, held_count;
    uint32_t held_hop;
} Worker;

static const uint8_t plain_hdr[VNET_HDR_LEN];

/* Counters are read by the daemon at any time: each slot is written whole. */
static inline void count(Worker *w, int which, int64_t n)
{
    __atomic_store_n(&w->counters[which], w->counters[which] + n, __ATOMIC_RELAXED);
}

static inline void beat(Worker *w)
{
    __atomic_store_n(w->heartbeat, *w->heartbeat + 1, __ATOMIC_RELAXED);
}

static void drop_malformed(Worker *w, int problem, int64_t n)
{
    count(w, DROP_MALFORMED, n);
    count(w, MALFORMED_TRUNCATED + problem - 1, n);
}

/* One packet into flannel0: a vnet header (if offloads are on) and DATA. */
static int write_tun(Worker *w, const uint8_t *hdr, const uint8_t *data, size_t n)
{
    struct iovec iov[2] = {{(void *)hdr, hdr ? (size_t)w->hdr_len : 0}, {(void *)data, n}};
    if (writev(w->tun, iov, 2) < 0) {
        count(w, RX_ERRORS, 1);
        return 0;
    }
    return 1;
}

/* packet.looks_like_ipv4 */
static int looks_like_ipv4(const uint8_t *p, ssize_t n)
{
    return n >= 20 && p[0] >> 4 == 4 && (p[0] & 0x0F) >= 5;
}

#define UNREACHABLE_ROOM (20 + 8 + 56 + 8)     /* IP, ICMP, the quoted header (< 60) and 8 bytes */

/* packet.net_unreachable into OUT (UNREACHABLE_ROOM bytes): its length, or 0
 * where flannel sends nothing. */
static size_t net_unreachable(const uint8_t *o, ssize_t n, const uint8_t source[4], uint8_t *out)
{
    if (!looks_like_ipv4(o, n))
        return 0;
    ssize_t ihl = (o[0] & 0x0F) * 4;
    if (ihl >= 60 || ihl > n || o[9] == IPPROTO_ICMP_ || (get16(o + 6) & 0x1FFF))
        return 0;
    size_t quoted = (size_t)ihl + 8, total = 20 + 8 + quoted;
    uint8_t *icmp = out + 20;
    memset(out, 0, total);
    icmp[0] = 3;                                    /* destination unreachable, code 0: network */
    memcpy(icmp + 8, o, (size_t)n < quoted ? (size_t)n : quoted);   /* short: zeros after it */
    put16(icmp + 2, negate(ones_sum(icmp, 8 + quoted)));
    out[0] = 0x45;
    put16(out + 2, (uint32_t)total);
    out[8] = 8;                                     /* packet.ICMP_ERROR_TTL */
    out[9] = IPPROTO_ICMP_;
    memcpy(out + 12, source, 4);
    memcpy(out + 16, o + 12, 4);
    ip_checksum(out, 20);
    return total;
}

/* fastudp.Worker.send: COUNT packets of SIZE bytes (the last may be shorter),
 * back to back in BUF[0:N]: one UDP GSO send per 64 KB, or one sendto each. */
static void send_packets(Worker *w, const uint8_t *buf, size_t n, size_t size, size_t count_, uint32_t hop)
{
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(w->port), .sin_addr = {htonl(hop)}};
    size_t per_send = 1;
    if (w->gso) {
        per_send = MAX_UDP_PAYLOAD / size;
        if (per_send > MAX_GSO_SEGMENTS)
            per_send = MAX_GSO_SEGMENTS;
    }
    size_t step = per_send * size;
    for (size_t start = 0; start < n; start += step) {
        size_t chunk = n - start < step ? n - start : step;
        ssize_t sent;
        if (chunk > size) {
            union {
                char buf[CMSG_SPACE(sizeof(uint16_t))];
                struct cmsghdr align;
            } control;
            struct iovec iov = {(void *)(buf + start), chunk};
            struct msghdr msg = {.msg_name = &to, .msg_namelen = sizeof to, .msg_iov = &iov, .msg_iovlen = 1,
                                 .msg_control = control.buf, .msg_controllen = sizeof control.buf};
            struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
            c->cmsg_level = SOL_UDP;
            c->cmsg_type = UDP_SEGMENT_;
            c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
            uint16_t segment = (uint16_t)size;
            memcpy(CMSG_DATA(c), &segment, sizeof segment);
            sent = sendmsg(w->sock, &msg, 0);
        } else {
            sent = sendto(w->sock, buf + start, chunk, 0, (struct sockaddr *)&to, sizeof to);
        }
        if (sent < 0) {
            count(w, TX_ERRORS, 1);
            return;
        }
    }
    count(w, TX_PACKETS, (int64_t)count_);
    count(w, TX_BYTES, (int64_t)n);
}

static void flush_held(Worker *w)
{
    if (w->held_len) {
        send_packets(w, w->held, w->held_len, w->held_size, w->held_count, w->held_hop);
        w->held_len = w->held_count = 0;
    }
}

/* fastudp.Worker.hold */
static void hold(Worker *w, const uint8_t *p, size_t size, uint32_t hop)
{
    if (size > sizeof w->held) {                    /* no datagram holds it: the send says so */
        flush_held(w);
        send_packets(w, p, size, size, 1, hop);
        return;
    }
    if (w->held_len && (hop != w->held_hop || size > w->held_size || w->held_count >= MAX_GSO_SEGMENTS
                        || w->held_len + size > MAX_UDP_PAYLOAD))
        flush_held(w);
    if (!w->held_len) {
        w->held_hop = hop;
        w->held_size = size;
    }
    memcpy(w->held + w->held_len, p, size);
    w->held_len += size;
    w->held_count++;
    if (size < w->held_size)                        /* a shorter one can only be the last */
        flush_held(w);
}

/* vnet.segmentable */
static int segmentable(const uint8_t *p, ssize_t n, uint32_t mss)
{
    if (n < 40 || mss < 1 || mss > 0xFFFF || p[0] >> 4 != 4 || p[9] != IPPROTO_TCP_)
        return 0;
    ssize_t ihl = (p[0] & 0x0F) * 4;
    if (ihl < 20 || ihl + 20 > n)
        return 0;
    ssize_t thl = (p[ihl + 12] >> 4) * 4;
    return thl >= 20 && ihl + thl <= n;
}

/* A super-packet cut and sent (see fastudp.Worker.segment): in the worker's
 * buffer, or, for an MSS too small for it, in one of its own. */
static void send_segmented(Worker *w, const uint8_t *p, ssize_t n, uint32_t mss, uint32_t hop)
{
    ssize_t total, size, count_;
    if (vnet_segment(p, n, mss, w->segments, SEGMENTS_SIZE, &total, &size, &count_) == 0) {
        send_packets(w, w->segments, (size_t)total, (size_t)size, (size_t)count_, hop);
        return;
    }
    ssize_t room = (n / mss + 1) * (120 + (ssize_t)mss);    /* rows of at most 60 + 60 header bytes + MSS */
    uint8_t *own = malloc((size_t)room);
    if (own != NULL && vnet_segment(p, n, mss, own, room, &total, &size, &count_) == 0)
        send_packets(w, own, (size_t)total, (size_t)size, (size_t)count_, hop);
    else
        count(w, TX_ERRORS, 1);
    free(own);
}

/* fastudp.Worker.forward_one: one read from the TUN, BUF[0:N]: route it and
 * send or hold it. */
static void forward_one(Worker *w, uint8_t *buf, ssize_t n, int batching)
{
    if (n < w->hdr_len) {
        count(w, DROP_NOT_IPV4, 1);
        return;
    }
    int flags = 0, gso_type = 0;
    uint32_t gso_size = 0, csum_start = 0, csum_offset = 0;
    if (w->hdr_len) {               /* <BBHHHH: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset */
        flags = buf[0];
        gso_type = buf[1];
        gso_size = buf[4] | (uint32_t)buf[5] << 8;
        csum_start = buf[6] | (uint32_t)buf[7] << 8;
        csum_offset = buf[8] | (uint32_t)buf[9] << 8;
    }
    uint8_t *p = buf + w->hdr_len;
    ssize_t len = n - w->hdr_len;
    if (!looks_like_ipv4(p, len)) {
        count(w, DROP_NOT_IPV4, 1);
        return;
    }
    uint32_t hop = next_hop(get32(p + 16));
    if (hop == 0) {
        count(w, DROP_NO_ROUTE, 1);
        uint8_t reply[UNREACHABLE_ROOM];
        size_t size = net_unreachable(p, len, w->tun_address, reply);
        if (size) {
            /* Counted first: the pod may see the error before write() returns. */
            count(w, ICMP_UNREACHABLE_SENT, 1);
            if (!write_tun(w, plain_hdr, reply, size))
                count(w, ICMP_UNREACHABLE_SENT, -1);
        }
        return;
    }
    gso_type &= ~GSO_ECN;
    if (gso_type == GSO_NONE) {
        /* TTL, and the checksum the kernel left to us (NEEDS_CSUM) */
        if (!vnet_forward(p, len, flags, csum_start, csum_offset))
            count(w, DROP_TTL, 1);
        else if (batching)
            hold(w, p, (size_t)len, hop);
        else {
            flush_held(w);                          /* (held ones were read before it) */
            send_packets(w, p, (size_t)len, (size_t)len, 1, hop);
        }
    } else if (gso_type != GSO_TCPV4 || !segmentable(p, len, gso_size)) {
        /* Not offered by us, or a super-packet we could not cut: counted, never a crash. */
        drop_malformed(w, PROBLEM_HEADER_LENGTH, 1);
    } else if (!vnet_forward(p, len, 0, 0, 0)) {
        count(w, DROP_TTL, 1);
    } else {
        flush_held(w);
        send_segmented(w, p, len, gso_size, hop);
    }
}

/* fastudp.Worker.tx_loop (see its docstring): TUN -> UDP.
 *
 * Both loops sleep when their input is empty. What a lone small packet pays
 * for it, per worker hop (issue 17; tools/latency_sched.py and timestamps in
 * the worker): 3-6 us from wake-up to running (the waker finishing its system
 * call on the same vCPU; waking the other, idle vCPU costs more), 2 us of read,
 * 0.3 us of ours, 13-14 us in sendto or writev (the kernel carrying the packet
 * on to the next process's wake-up). Measured against host-gw in the same
 * rounds and not kept: busy-polling before sleeping (four workers and two pods
 * on 2 vCPUs then take turns by time slice: p50 3.0x became 4.7x at 20 us,
 * 9.4x at 60 us, 19x at 150 us; 3.1x with sched_yield but p99 23x); one
 * process for both directions, as flannel's proxy (3.06x against 2.83x; built
 * again whole in the fifteenth session, byte-exact tests passing, and measured
 * against these two processes in the same rounds: latency p50 0.95x of theirs,
 * spread 0.69-1.39 over 21 rounds, lower in 13; TCP 0.84x, lower in 10 of 10
 * rounds, ACKs and data serialised on one CPU; 64-byte rate 1.08x; a variant
 * draining only what poll reported: p50 0.98x, TCP 0.88x); a blocking read
 * instead of poll and read (2.95x against 2.83x); SCHED_FIFO (p99 worse);
 * vCPUs kept from halting, a SCHED_IDLE spinner on each (p50 100 against 96
 * us, p99 1.2 ms against 177 us); and, within noise, UDP GRO off, no
 * conntrack for port 8285, nice -10, CPU pinning, glibc's rseq off. */
static void tx_loop(Worker *w)
{
    uint8_t *buf = malloc(READ_SIZE);
    if (buf == NULL)
        return;
    int batching = w->gso && w->hdr_len, nowait = 1;
    struct pollfd queued = {.fd = w->tun, .events = POLLIN};
    for (;;) {
        beat(w);
        ssize_t n = 0;
        if (nowait) {
            struct iovec iov = {buf, READ_SIZE};
            n = preadv2(w->tun, &iov, 1, -1, RWF_NOWAIT);
            if (n < 0) {
                if (errno != EAGAIN && errno != EINTR)
                    nowait = 0;                     /* not for this kernel/device: poll */
                n = 0;
            }
        }
        if (n > 0) {
            forward_one(w, buf, n, batching);
            continue;
        }
        if (w->held_len && poll(&queued, 1, 0) == 0)
            flush_held(w);                          /* nothing more queued: the held batch leaves */
        if (poll(&queued, 1, WAKE_SECONDS * 1000) <= 0)
            continue;                               /* idle: beat, and wait again */
        n = read(w->tun, buf, READ_SIZE);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                continue;
            perror("fastudp-worker: read flannel0");
            return;
        }
        /* Read after the TUN was found empty: leave at once (without
         * RWF_NOWAIT, poll(0) is how we learn of a queue: batch as before). */
        forward_one(w, buf, n, batching && !nowait);
    }
}

/* fastudp.Worker.deliver: one datagram D[0:N] (in the receive buffer, ours to
 * change) validated, its inner source checked against PEER's leases (0:
 * checked already), TTL, into flannel0. */
static void deliver(Worker *w, uint8_t *d, ssize_t n, uint32_t peer)
{
    int problem = vnet_ipv4_problem(d, n);
    if (problem) {
        drop_malformed(w, problem, 1);
        return;
    }
    if (peer && !leased_by(peer, get32(d + 12))) {
        count(w, DROP_SPOOFED_SOURCE, 1);
        return;
    }
    if (!vnet_forward(d, n, 0, 0, 0)) {
        count(w, DROP_TTL, 1);
        return;
    }
    if (write_tun(w, plain_hdr, d, (size_t)n)) {
        count(w, RX_PACKETS, 1);
        count(w, RX_BYTES, n);
    }
}

typedef struct {
    ssize_t merged, start, end;
} Item;

typedef struct {
    Item *items;
    size_t n, room;
} Collected;

static int collect(void *ctx, ssize_t merged, ssize_t start, ssize_t end)
{
    Collected *c = ctx;
    if (c->n >= c->room)
        return -1;
    c->items[c->n++] = (Item){merged, start, end};
    return 0;
}

/* fastudp.Worker.receive_batch: a GRO receive from PEER, B[0:N], datagrams of
 * SIZE bytes (the last may be shorter). PEER leases NLEASES subnets, the
 * first of them LEASE (as leases_of found them). */
static void receive_batch(Worker *w, uint8_t *b, ssize_t n, ssize_t size, uint32_t peer, size_t nleases,
                          const Route *lease)
{
    static Item items[RECV_SIZE / 20 + 2];          /* at most one per 20-byte datagram */
    if (size < 20) {
        drop_malformed(w, PROBLEM_TRUNCATED, n / size + (n % size != 0));
        return;
    }
    /* (no offloads: nothing to merge into, one by one) */
    if (!w->hdr_len || nleases != 1 || !vnet_sources_within(b, n, size, lease->network, lease->mask)) {
        for (ssize_t at = 0; at < n; at += size)
            deliver(w, b + at, n - at < size ? n - at : size, peer);
        return;
    }
    int inner_udp = b[9] == IPPROTO_UDP_ && w->udp_merge;       /* size >= 20: a whole header */
    Collected c = {items, 0, sizeof items / sizeof items[0]};
    Items it = {collect, &c, w->merged_out, MERGED_SIZE, 0};
    if ((inner_udp ? vnet_udp_items : vnet_tcp_items)(&it, b, n, size) != 0) {
        count(w, DROP_INTERNAL_ERROR, 1);           /* no memory, or a bug: the receive is dropped */
        return;
    }
    ssize_t merged = 0, single_bytes = 0;
    for (size_t i = 0; i < c.n; i++) {
        Item *item = &items[i];
        if (item->merged) {
            merged += item->merged;
            /* (the super-packet carries its own vnet header) */
            if (write_tun(w, NULL, w->merged_out + item->start, (size_t)(item->end - item->start)))
                count(w, RX_COALESCED, 1);
            else if (inner_udp)
                w->udp_merge = 0;                   /* refused after all: per datagram from now on */
        } else {
            single_bytes += item->end - item->start;
            deliver(w, b + item->start, item->end - item->start, 0);
        }
    }
    count(w, RX_PACKETS, merged);
    count(w, RX_BYTES, n - single_bytes);
}

/* fastudp.gro_segment_size: the datagram size of a receive of N bytes; N
 * without a UDP_GRO message; -1 if the message holds no usable size. */
static ssize_t gro_segment_size(struct msghdr *msg, ssize_t n)
{
    for (struct cmsghdr *c = CMSG_FIRSTHDR(msg); c; c = CMSG_NXTHDR(msg, c)) {
        if (c->cmsg_level == SOL_UDP && c->cmsg_type == UDP_GRO_) {
            if (c->cmsg_len < CMSG_LEN(sizeof(int)))
                return -1;
            int size;
            memcpy(&size, CMSG_DATA(c), sizeof size);
            return size > 0 ? size : -1;
        }
    }
    return n;
}

/* fastudp.Worker.rx_loop and _receive: UDP -> TUN. */
static void rx_loop(Worker *w)
{
    uint8_t *buf = malloc(RECV_SIZE);
    if (buf == NULL)
        return;
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } control;
    for (;;) {
        beat(w);
        struct sockaddr_in from;
        struct iovec iov = {buf, RECV_SIZE};
        struct msghdr msg = {.msg_name = &from, .msg_namelen = sizeof from, .msg_iov = &iov, .msg_iovlen = 1,
                             .msg_control = control.buf, .msg_controllen = sizeof control.buf};
        ssize_t n = recvmsg(w->sock, &msg, 0);
        if (n < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
                count(w, RX_ERRORS, 1);
            continue;                               /* (EAGAIN: the receive timeout, idle) */
        }
        uint32_t peer = msg.msg_namelen >= sizeof from && from.sin_family == AF_INET ? ntohl(from.sin_addr.s_addr) : 0;
        ssize_t size = gro_segment_size(&msg, n);
        Route first = {0, 0, 0};
        size_t nleases = peer ? leases_of(peer, &first) : 0;
        if (nleases == 0) {
            count(w, DROP_UNKNOWN_SOURCE, size > 0 ? n / size + (n % size != 0) : 1);
            continue;
        }
        if (size < 0)
            drop_malformed(w, PROBLEM_SEGMENT_SIZE, 1);
        else if (size < n)
            receive_batch(w, buf, n, size, peer, nleases, &first);
        else
            deliver(w, buf, n, peer);
    }
}

/* ---- start ------------------------------------------------------------------- */

static const char usage[] =
    "usage: fastudp-worker {tx|rx} TUN_FD SOCK_FD COUNTERS_FD PORT TUN_ADDRESS [--gso] [--plain]\n";

/* A whole non-negative decimal number, or -1. */
static long number(const char *s)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    return *s && !*end && !errno && v >= 0 ? v : -1;
}

/* Whether this kernel's TUN takes UDP GSO super-packets (fastudp.udp_gso_writes: 6.2 and later). */
static int udp_gso_writes(void)
{
    FILE *f = fopen("/proc/sys/kernel/osrelease", "r");
    int major = 0, minor = 0;
    if (f != NULL) {
        if (fscanf(f, "%d.%d", &major, &minor) != 2)
            major = minor = 0;
        fclose(f);
    }
    return major > 6 || (major == 6 && minor >= 2);
}

int main(int argc, char **argv)
{
    if (argc == 2 && strcmp(argv[1], "--counters") == 0) {
        for (int i = 0; i < NCOUNTERS; i++)
            puts(counter_names[i]);
        return 0;
    }
    const char *words[6];
    int nwords = 0, gso = 0, plain = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--gso") == 0)
            gso = 1;
        else if (strcmp(argv[i], "--plain") == 0)
            plain = 1;
        else if (strncmp(argv[i], "--", 2) == 0 || nwords == 6)
            nwords = 7;
        else
            words[nwords++] = argv[i];
    }
    int tx = nwords == 6 && strcmp(words[0], "tx") == 0, rx = nwords == 6 && strcmp(words[0], "rx") == 0;
    long tun = tx || rx ? number(words[1]) : -1, sock = tx || rx ? number(words[2]) : -1;
    long counters_fd = tx || rx ? number(words[3]) : -1, port = tx || rx ? number(words[4]) : -1;
    struct in_addr tun_address;
    if (!(tx || rx) || tun < 0 || sock < 0 || counters_fd < 0 || port < 0 || port > 0xFFFF
            || !inet_aton(words[5], &tun_address)) {
        fputs(usage, stderr);
        return 2;
    }
    int flags = fcntl(tun, F_GETFL);                /* blocking, as the Python worker sets it */
    if (flags >= 0)
        fcntl(tun, F_SETFL, flags & ~O_NONBLOCK);
    flags = fcntl(sock, F_GETFL);
    if (flags >= 0)
        fcntl(sock, F_SETFL, flags & ~O_NONBLOCK);
    if (rx) {
        /* A receive timeout, not a non-blocking socket (see fastudp.main). */
        struct timeval wake = {WAKE_SECONDS, 0};
        setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &wake, sizeof wake);
    }
    size_t block = 8 * NCOUNTERS, length = 2 * block + 2 * 8;       /* fastudp.counters_memory */
    uint8_t *memory = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_SHARED, counters_fd, 0);
    if (memory == MAP_FAILED) {
        perror("fastudp-worker: counters");
        return 1;
    }
    static Worker worker;
    Worker *w = &worker;
    int index = rx;                                 /* fastudp.DIRECTIONS: tx, rx */
    w->tun = (int)tun;
    w->sock = (int)sock;
    w->port = (int)port;
    w->gso = gso;
    w->hdr_len = plain ? 0 : VNET_HDR_LEN;
    w->udp_merge = !plain && udp_gso_writes();
    memcpy(w->tun_address, &tun_address.s_addr, 4);
    w->counters = (int64_t *)(memory + block * index);
    w->heartbeat = (int64_t *)(memory + 2 * block + 8 * index);
    w->segments = tx ? malloc(SEGMENTS_SIZE) : NULL;
    w->merged_out = rx ? malloc(MERGED_SIZE) : NULL;
    if ((tx && w->segments == NULL) || (rx && w->merged_out == NULL)) {
        fputs("fastudp-worker: out of memory\n", stderr);
        return 1;
    }
    /* The daemon sends the peer table first thing: wait for it, or the packets
     * queued in flannel0 meanwhile would all be answered "net unreachable". */
    if (!read_control())
        return 0;
    pthread_t control;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 64 << 10);
    if (pthread_create(&control, &attr, follow_control, NULL) != 0) {
        fputs("fastudp-worker: no control thread\n", stderr);
        return 1;
    }
    if (tx)
        tx_loop(w);
    else
        rx_loop(w);
    return 1;
}
