/*
 * The udp fast path's per-byte work in plain C, shared by the Python helper
 * (_vnetc.c, which wraps each function for netemu/overlay/vnet.py and the
 * Python worker) and the compiled worker (fastudp_worker.c). No Python here:
 * every function works on bytes and buffers its caller owns.
 *
 * Sums follow vnet.ones_sum: the big-endian 16-bit one's-complement sum,
 * reduced mod 0xFFFF (0..0xFFFE), so that every header written here is the
 * very one the Python code writes (tests/unit compare both, byte for byte).
 *
 * The buffers of vnet_tcp_items and vnet_udp_items come from the underlay:
 * any length, any bytes, any segment size. Every read below is within the
 * datagram it belongs to; where that rests on an earlier check, the comment
 * next to the read names it (tests/unit/test_fastpath_fuzz.py throws garbage
 * of every length at both). Bad input gives an error code or single datagrams
 * (which the worker validates one by one), never a read out of bounds.
 */
#ifndef NETEMU_VNET_CORE_H
#define NETEMU_VNET_CORE_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "ones_sum assumes a little-endian host"
#endif

#define M 0xFFFFu
#define VNET_HDR_LEN 10
#define VNET_F_NEEDS_CSUM 1
#define GSO_NONE 0
#define GSO_TCPV4 1
#define GSO_UDP_L4 5
#define GSO_ECN 0x80
#define IPPROTO_ICMP_ 1
#define IPPROTO_TCP_ 6
#define IPPROTO_UDP_ 17
#define TCP_FIN 0x01
#define TCP_PSH 0x08
#define TCP_ACK 0x10
#define TCP_CWR 0x80

/* Error codes of the functions below (0: done). */
#define VNET_ENOMEM (-1)       /* no memory for the work arrays */
#define VNET_ESPACE (-2)       /* the output buffer is too small */
#define VNET_EEMIT (-3)        /* the caller's emit callback failed */
#define VNET_ENOTTCP (-4)      /* not a TCP/IPv4 super-packet (or no MSS) */
#define VNET_EIHL (-5)         /* bad IPv4 header length */
#define VNET_ETHL (-6)         /* bad TCP header length */

/* Big-endian one's-complement sum of P[0:N] mod 0xFFFF (an odd last byte is
 * the high byte of its word). Adds native little-endian 32-bit words: each is
 * congruent to the sum of its two little-endian 16-bit words, and the
 * little-endian sum times 256 is the big-endian one (2^16 = 1 mod 0xFFFF). */
static uint32_t ones_sum(const uint8_t *p, ssize_t n)
{
    uint64_t s = 0;
    ssize_t i = 0;
    for (; i + 4 <= n; i += 4) {
        uint32_t w;
        memcpy(&w, p + i, 4);
        s += w;
    }
    if (i + 2 <= n) {
        s += (uint32_t)p[i] | ((uint32_t)p[i + 1] << 8);
        i += 2;
    }
    if (i < n)
        s += p[i];
    return (uint32_t)(((s % M) * 256) % M);
}

static inline void put16(uint8_t *p, uint32_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static inline uint32_t get16(const uint8_t *p) { return ((uint32_t)p[0] << 8) | p[1]; }
static inline uint32_t get32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}
static inline void put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}
static inline uint32_t negate(uint32_t s) { return (M - s % M) % M; }   /* (-s) % 0xFFFF */

static void put_vnet(uint8_t *p, int gso_type, uint32_t hdr_len, uint32_t gso_size, uint32_t csum_offset)
{
    /* <BBHHHH: flags, gso_type, hdr_len, gso_size, csum_start (20: no L2), csum_offset */
    p[0] = VNET_F_NEEDS_CSUM; p[1] = (uint8_t)gso_type;
    p[2] = (uint8_t)hdr_len; p[3] = (uint8_t)(hdr_len >> 8);
    p[4] = (uint8_t)gso_size; p[5] = (uint8_t)(gso_size >> 8);
    p[6] = 20; p[7] = 0;
    p[8] = (uint8_t)csum_offset; p[9] = 0;
}

/* IP header checksum of H[0:ihl] (its checksum field ignored), written in place. */
static void ip_checksum(uint8_t *h, ssize_t ihl)
{
    h[10] = h[11] = 0;
    put16(h + 10, negate(ones_sum(h, ihl)));
}

/* ---- segment -------------------------------------------------------------- */

/* vnet.segment of the TCP/IPv4 super-packet P[0:N] at MSS, written into
 * O[0:OLEN]: *COUNT packets of *SIZE bytes back to back, the last possibly
 * shorter, *TOTAL bytes in all. 0, or VNET_ENOTTCP/EIHL/ETHL/ESPACE. */
static int vnet_segment(const uint8_t *p, ssize_t n, ssize_t mss, uint8_t *o, ssize_t olen,
                        ssize_t *total_out, ssize_t *size_out, ssize_t *count_out)
{
    if (n < 40 || mss < 1 || mss > 0xFFFF)
        return VNET_ENOTTCP;
    ssize_t ihl = (p[0] & 0x0F) * 4;
    if (ihl < 20 || ihl + 20 > n)
        return VNET_EIHL;
    ssize_t thl = (p[ihl + 12] >> 4) * 4, hdr = ihl + thl;
    if (thl < 20 || hdr > n)
        return VNET_ETHL;
    ssize_t payload = n - hdr;
    ssize_t count = payload > 0 ? payload / mss + (payload % mss != 0) : 1;
    ssize_t size = hdr + mss, last = payload - (count - 1) * mss;
    ssize_t total = (count - 1) * size + hdr + last;
    if (count > 0xFFFF || size > 0xFFFF || olen < total)
        return VNET_ESPACE;
    /* IP: the template's sum without total length, id and checksum. */
    uint8_t iph[60];
    memcpy(iph, p, ihl);
    memset(iph + 2, 0, 4);
    iph[10] = iph[11] = 0;
    uint32_t ip_base = ones_sum(iph, ihl);
    uint32_t ident0 = get16(p + 4), seq0 = get32(p + ihl + 4);
    uint32_t addresses = ones_sum(p + 12, 8);
    const uint8_t *data = p + hdr;
    for (ssize_t k = 0; k < count; k++) {
        uint8_t *row = o + k * size;
        ssize_t chunk = k == count - 1 ? last : mss;
        uint32_t length = (uint32_t)(hdr + chunk), ident = (ident0 + (uint32_t)k) & M;
        memcpy(row, p, hdr);
        memcpy(row + hdr, data + k * mss, chunk);
        put16(row + 2, length);
        put16(row + 4, ident);
        put16(row + 10, negate(ip_base + length + ident));
        uint8_t *tcp = row + ihl;
        put32(tcp + 4, seq0 + (uint32_t)(k * mss));
        if (k < count - 1) tcp[13] &= (uint8_t)~(TCP_FIN | TCP_PSH);
        if (k > 0) tcp[13] &= (uint8_t)~TCP_CWR;
        tcp[16] = tcp[17] = 0;
        uint64_t s = (uint64_t)ones_sum(tcp, thl) + ones_sum(row + hdr, chunk)
                     + addresses + IPPROTO_TCP_ + (length - ihl);
        put16(tcp + 16, negate((uint32_t)(s % M)));
    }
    *total_out = total;
    *size_out = size;
    *count_out = count;
    return 0;
}

/* ---- coalesce (TCP) ------------------------------------------------------ */

/* Bytes of a TCP/IPv4 header (no IP options) that segments of one flow share:
 * all but total length (2-3), id (4-5), IP checksum (10-11), seq (24-27),
 * flags (33) and TCP checksum (36-37). */
static int shared_byte(ssize_t i)
{
    return !((i >= 2 && i < 6) || (i >= 10 && i < 12) || (i >= 24 && i < 28) || i == 33
             || (i >= 36 && i < 38));
}

/* Where vnet_tcp_items and vnet_udp_items put their results: super-packets
 * into OUT, and one item per result through EMIT: (merged, start, end);
 * merged 0: a single datagram, buffer[start:end]; merged >= 2: a super-packet
 * of that many datagrams, out[start:end]. EMIT returns 0, or nonzero to stop
 * (VNET_EEMIT). */
typedef struct {
    int (*emit)(void *ctx, ssize_t merged, ssize_t start, ssize_t end);
    void *ctx;
    uint8_t *out;
    ssize_t out_len, used;
} Items;

static int add_item(Items *it, ssize_t merged, ssize_t start, ssize_t end)
{
    return it->emit(it->ctx, merged, start, end) ? VNET_EEMIT : 0;
}

/* In vnet_tcp_items and vnet_udp_items: the length of datagram I of the
 * receive (COUNT datagrams in N bytes, each SIZE bytes but the last: 1 to
 * SIZE bytes). */
#define LEN(i) ((i) == count - 1 ? n - (i) * size : size)

static uint8_t *reserve(Items *it, ssize_t n)
{
    if (it->used + n > it->out_len)
        return NULL;
    uint8_t *at = it->out + it->used;
    it->used += n;
    return at;
}

/* vnet.coalesce of the datagrams B[0:N] of SIZE (>= 1) bytes each but the
 * last, with super-packets written whole (vnet header, IP/TCP header,
 * payloads) into IT's buffer; items in arrival order. 0, or an error code. */
static int vnet_tcp_items(Items *it, const uint8_t *b, ssize_t n, ssize_t size)
{
    uint8_t *valid = NULL, *joins = NULL;
    int status = 0;
    ssize_t count = n / size + (n % size != 0);     /* not (n + size - 1): no overflow */
    ssize_t hdr = n >= 33 ? 20 + (b[32] >> 4) * 4 : 0;
    /* count >= 2 means the first datagram is whole: SIZE (>= 40) bytes, so
     * b[0], b[9] and b[32] are its own. From here on, 40 <= HDR < SIZE (a TCP
     * data offset under 5 is no TCP header: nothing is merged). */
    if (count < 2 || size < 40 || size % 2 || b[0] != 0x45 || b[9] != IPPROTO_TCP_ || hdr < 40 || hdr >= size) {
        for (ssize_t i = 0; i < count && !status; i++) {
            ssize_t end = (i + 1) * size < n ? (i + 1) * size : n;
            status = add_item(it, 0, i * size, end);
        }
        return status;
    }
    valid = calloc(count, 1);
    joins = calloc(count, 1);
    if (valid == NULL || joins == NULL) {
        status = VNET_ENOMEM;
        goto out;
    }
    for (ssize_t i = 0; i < count; i++) {
        const uint8_t *d = b + i * size;
        ssize_t len = LEN(i);
        uint8_t fl = len > 33 ? d[33] : 0;
        /* whole and valid (IP and TCP checksums with its own pseudo-header), with
         * data (pure ACKs are never merged), flags ACK or ACK|PSH. LEN > HDR
         * (>= 40) comes first: every later read is within the datagram. */
        valid[i] = len > hdr && get16(d + 2) == (uint32_t)len
                   && ones_sum(d, 20) == 0
                   && ((uint64_t)ones_sum(d + 12, 8) + IPPROTO_TCP_ + (len - 20) + ones_sum(d + 20, len - 20)) % M == 0
                   && (fl | TCP_PSH) == (TCP_ACK | TCP_PSH);
    }
    for (ssize_t i = 1; i < count; i++) {
        const uint8_t *d = b + i * size, *prev = d - size;
        if (!valid[i] || !valid[i - 1] || prev[33] != TCP_ACK)   /* valid: longer than HDR */
            continue;
        int same = 1;
        for (ssize_t j = 0; j < hdr && same; j++)
            same = !shared_byte(j) || d[j] == prev[j];
        joins[i] = same && ((get32(d + 24) - get32(prev + 24)) == (uint32_t)(size - hdr));
    }
    ssize_t start = 0;
    while (start < count && !status) {
        ssize_t end = start + 1;
        while (end < count && joins[end])
            end++;
        /* A run of 2+ starts with a valid datagram (joins needs valid[i - 1]):
         * h[0..HDR) is its own. A run of one may be the short last datagram,
         * so END - START >= 2 is tested before any read of h. */
        const uint8_t *h = b + start * size;
        ssize_t total = (end - start - 1) * (size - hdr) + LEN(end - 1);   /* merged */
        if (end - start >= 2 && total <= 0xFFFF && h[0] == 0x45 && (h[6] & 0x3F) == 0 && h[7] == 0
                && h[8] > 1 && h[9] == IPPROTO_TCP_) {
            ssize_t at = it->used;
            uint8_t *o = reserve(it, VNET_HDR_LEN + total);
            if (o == NULL) {
                status = VNET_ESPACE;
                goto out;
            }
            put_vnet(o, GSO_TCPV4, (uint32_t)hdr, (uint32_t)(size - hdr), 16);
            uint8_t *head = o + VNET_HDR_LEN, *w = head + hdr;
            memcpy(head, h, hdr);
            for (ssize_t i = start; i < end; i++) {
                ssize_t chunk = LEN(i) - hdr;
                memcpy(w, b + i * size + hdr, chunk);
                w += chunk;
            }
            put16(head + 2, (uint32_t)total);
            head[8] -= 1;                                   /* TTL, checked > 1 */
            head[33] = b[(end - 1) * size + 33];            /* PSH of the last segment */
            ip_checksum(head, 20);
            /* TCP checksum field: the pseudo-header sum, for the kernel to finish */
            put16(head + 36, (ones_sum(head + 12, 8) + IPPROTO_TCP_ + (uint32_t)(total - 20)) % M);
            status = add_item(it, end - start, at, at + VNET_HDR_LEN + total);
        } else {
            for (ssize_t i = start; i < end && !status; i++)
                status = add_item(it, 0, i * size, i * size + LEN(i));
        }
        start = end;
    }
out:
    free(valid);
    free(joins);
    return status;
}

/* ---- coalesce_udp --------------------------------------------------------- */

/* N > 28 is tested first: every later read is within the datagram. */
static int valid_udp(const uint8_t *d, ssize_t n)
{
    return n > 28 && d[0] == 0x45 && d[9] == IPPROTO_UDP_ && get16(d + 2) == (uint32_t)n
           && !((d[6] & 0x3F) || d[7]) && d[8] > 1 && get16(d + 24) == (uint32_t)(n - 20)
           && (d[26] || d[27]) && ones_sum(d, 20) == 0
           && ((uint64_t)ones_sum(d + 12, 8) + IPPROTO_UDP_ + (n - 20) + ones_sum(d + 20, n - 20)) % M == 0;
}

typedef struct {
    ssize_t first, last;        /* datagram numbers of the run's first and last member */
    ssize_t members, size;      /* how many; every member's length but the last's */
    uint32_t ident;             /* IP id of the last member */
    int open;                   /* no shorter (last) member yet */
    int latest;                 /* the newest run of its flow (the one a datagram may join) */
} Run;

/* vnet.coalesce_udp (the per-datagram way's rules and order) with UDP GSO
 * super-packets written whole into IT's buffer; as vnet_tcp_items. */
static int vnet_udp_items(Items *it, const uint8_t *b, ssize_t n, ssize_t size)
{
    Run *runs = NULL;
    ssize_t *order = NULL, *next = NULL;   /* order: run number, or -1 - datagram (invalid) */
    int status = 0;
    ssize_t count = n / size + (n % size != 0), nruns = 0, norder = 0;   /* no overflow */
    runs = calloc(count ? count : 1, sizeof(Run));
    order = calloc(count ? count : 1, sizeof(ssize_t));
    next = calloc(count ? count : 1, sizeof(ssize_t));   /* next member of a run, -1 at the end */
    if (runs == NULL || order == NULL || next == NULL) {
        status = VNET_ENOMEM;
        goto out;
    }
    for (ssize_t i = 0; i < count; i++) {
        const uint8_t *d = b + i * size;
        ssize_t len = LEN(i);
        next[i] = -1;
        if (!valid_udp(d, len)) {
            order[norder++] = -1 - i;
            continue;
        }
        uint32_t ident = get16(d + 4);
        Run *run = NULL;
        for (ssize_t r = nruns - 1; r >= 0; r--) {
            const uint8_t *f = b + runs[r].first * size;
            if (runs[r].latest && memcmp(f + 12, d + 12, 12) == 0) {
                run = &runs[r];
                break;
            }
        }
        if (run != NULL) {
            const uint8_t *f = b + run->first * size;
            if (run->open && len <= run->size && ident == ((run->ident + 1) & M)
                    && d[1] == f[1] && d[6] == f[6] && d[8] == f[8]) {
                next[run->last] = i;
                run->last = i;
                run->members++;
                run->ident = ident;
                run->open = len == run->size;
                continue;
            }
            run->latest = 0;
        }
        runs[nruns] = (Run){i, i, 1, len, ident, 1, 1};
        order[norder++] = nruns++;
    }
    for (ssize_t k = 0; k < norder && !status; k++) {
        if (order[k] < 0) {
            ssize_t i = -1 - order[k];
            status = add_item(it, 0, i * size, i * size + LEN(i));
            continue;
        }
        Run *run = &runs[order[k]];
        if (run->members == 1) {
            status = add_item(it, 0, run->first * size, run->first * size + LEN(run->first));
            continue;
        }
        ssize_t total = 28;
        for (ssize_t i = run->first; i >= 0; i = next[i])
            total += LEN(i) - 28;
        if (total > 0xFFFF) {                  /* cannot be one IPv4 packet: one by one */
            for (ssize_t i = run->first; i >= 0 && !status; i = next[i])
                status = add_item(it, 0, i * size, i * size + LEN(i));
            continue;
        }
        ssize_t at = it->used;
        uint8_t *o = reserve(it, VNET_HDR_LEN + total);
        if (o == NULL) {
            status = VNET_ESPACE;
            goto out;
        }
        put_vnet(o, GSO_UDP_L4, 28, (uint32_t)(run->size - 28), 6);
        uint8_t *head = o + VNET_HDR_LEN, *w = head + 28;
        memcpy(head, b + run->first * size, 28);
        for (ssize_t i = run->first; i >= 0; i = next[i]) {
            memcpy(w, b + i * size + 28, LEN(i) - 28);
            w += LEN(i) - 28;
        }
        put16(head + 2, (uint32_t)total);
        head[8] -= 1;                                       /* TTL, checked > 1 */
        ip_checksum(head, 20);
        put16(head + 24, (uint32_t)(total - 20));
        put16(head + 26, (ones_sum(head + 12, 8) + IPPROTO_UDP_ + (uint32_t)(total - 20)) % M);
        status = add_item(it, run->members, at, at + VNET_HDR_LEN + total);
    }
out:
    free(runs);
    free(order);
    free(next);
    return status;
}

#undef LEN

/* ---- inner sources ---------------------------------------------------------- */

/* Whether every datagram of a GRO receive B[0:N] (SIZE >= 20 bytes each, the
 * last possibly shorter) long enough to hold an IPv4 header has its source
 * address (bytes 12-15) in NETWORK/MASK. */
static int vnet_sources_within(const uint8_t *b, ssize_t n, ssize_t size, uint32_t network, uint32_t mask)
{
    /* each datagram at AT has AT + 20 <= N bytes before its end: 12-15 are its own */
    for (ssize_t at = 0; at + 20 <= n; at += size)
        if ((get32(b + at + 12) & mask) != network)
            return 0;
    return 1;
}

/* ---- one small packet ------------------------------------------------------ */

/* packet.decrement_ttl, then (FLAGS has NEEDS_CSUM) vnet.finish_checksum, in
 * place on P[0:N]. 0, packet untouched, if the TTL would reach 0 (or N < 20). */
static int vnet_forward(uint8_t *p, ssize_t n, int flags, ssize_t csum_start, ssize_t csum_offset)
{
    if (n < 20 || p[8] <= 1)
        return 0;
    /* Each bounded first, so that their sum cannot overflow. */
    int checksum = (flags & VNET_F_NEEDS_CSUM) && csum_start >= 0 && csum_offset >= 0
                   && csum_start <= n && csum_offset <= n && csum_start + csum_offset + 2 <= n;
    /* RFC 1624 eqn. 3 over the TTL/protocol word, as packet.decrement_ttl */
    uint32_t old_word = ((uint32_t)p[8] << 8) | p[9], new_word = old_word - 0x100;
    uint32_t total = (~get16(p + 10) & M) + (~old_word & M) + new_word;
    total = (total & M) + (total >> 16);
    total = (total & M) + (total >> 16);
    p[8] -= 1;
    put16(p + 10, ~total & M);
    if (checksum) {
        uint32_t csum = negate(ones_sum(p + csum_start, n - csum_start));
        if (csum == 0 && p[9] == IPPROTO_UDP_)
            csum = M;                       /* UDP: 0 would mean "no checksum" */
        put16(p + csum_start + csum_offset, csum);
    }
    return 1;
}

/* ---- one datagram from the underlay ----------------------------------------- */

/* packet.ipv4_problem as a number: 0 none, then 1 truncated, 2 version, 3
 * header length, 4 total length, 5 checksum (the order of fastudp.MALFORMED). */
static int vnet_ipv4_problem(const uint8_t *p, ssize_t n)
{
    ssize_t ihl;
    if (n < 20)
        return 1;
    if (p[0] >> 4 != 4)
        return 2;
    if ((ihl = (ssize_t)(p[0] & 0x0F) * 4) < 20 || ihl > n)
        return 3;
    if ((ssize_t)get16(p + 2) != n)
        return 4;
    if (ones_sum(p, ihl) != 0)         /* version 4: never all zeros, so 0 mod 0xFFFF is valid */
        return 5;
    return 0;
}

#endif
