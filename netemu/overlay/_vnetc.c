/*
 * netemu.overlay._vnetc: the udp fast path's per-byte work, compiled, for
 * Python: netemu/overlay/vnet.py and the Python worker (fastudp.py).
 *
 * The same three operations as vnet.py (segment, coalesce, coalesce_udp), with
 * the same results byte for byte (tests/unit check each against the
 * Python/numpy way), and the per-packet checks of the latency path. In Python
 * the cost of these is per operation, not per byte: about 80-100 microseconds
 * per 64 KB super-packet on a 2-vCPU machine, the largest user-space cost of
 * the udp backend. Here they are one pass over the bytes. The work itself is
 * in vnet_core.h, which the compiled worker (fastudp_worker.c) shares; this
 * file only wraps it. Nothing touches a socket or a device.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "vnet_core.h"

/* ---- segment -------------------------------------------------------------- */

PyDoc_STRVAR(segment_into_doc,
"segment_into(packet, mss, out) -> (nbytes, size, count)\n\n"
"vnet.segment written into OUT (a writable buffer): COUNT packets of SIZE bytes\n"
"back to back, the last possibly shorter, NBYTES in all. ValueError if PACKET is\n"
"not a TCP/IPv4 packet or OUT is too small.");

static PyObject *segment_into(PyObject *self, PyObject *args)
{
    Py_buffer in, out;
    Py_ssize_t mss;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "y*nw*", &in, &mss, &out))
        return NULL;
    ssize_t total, size, count;
    switch (vnet_segment(in.buf, in.len, mss, out.buf, out.len, &total, &size, &count)) {
    case 0:
        result = Py_BuildValue("nnn", (Py_ssize_t)total, (Py_ssize_t)size, (Py_ssize_t)count);
        break;
    case VNET_ENOTTCP:
        PyErr_SetString(PyExc_ValueError, "not a TCP/IPv4 super-packet (or no MSS)");
        break;
    case VNET_EIHL:
        PyErr_SetString(PyExc_ValueError, "bad IPv4 header length");
        break;
    case VNET_ETHL:
        PyErr_SetString(PyExc_ValueError, "bad TCP header length");
        break;
    default:
        PyErr_SetString(PyExc_ValueError, "output buffer too small");
    }
    PyBuffer_Release(&in);
    PyBuffer_Release(&out);
    return result;
}

/* ---- coalesce and coalesce_udp ------------------------------------------- */

PyDoc_STRVAR(coalesce_into_doc,
"coalesce_into(buffer, size, out) -> [(merged, start, end), ...]\n\n"
"vnet.coalesce with super-packets written whole (vnet header, IP/TCP header,\n"
"payloads) into OUT. Items in arrival order: merged == 0 is a single datagram,\n"
"buffer[start:end]; merged >= 2 a super-packet of that many, out[start:end].");

PyDoc_STRVAR(coalesce_udp_into_doc,
"coalesce_udp_into(buffer, size, out) -> [(merged, start, end), ...]\n\n"
"vnet.coalesce_udp (the per-datagram way's rules and order) with UDP GSO\n"
"super-packets written whole into OUT; items as coalesce_into's.");

/* An item, appended to the list CTX as (merged, start, end). */
static int append_item(void *ctx, ssize_t merged, ssize_t start, ssize_t end)
{
    PyObject *t = Py_BuildValue("(nnn)", (Py_ssize_t)merged, (Py_ssize_t)start, (Py_ssize_t)end);
    if (t == NULL)
        return -1;
    int r = PyList_Append((PyObject *)ctx, t);
    Py_DECREF(t);
    return r;
}

/* Parse (buffer, size, out), collect the items with MERGE. */
static PyObject *coalesce_with(PyObject *args, int (*merge)(Items *, const uint8_t *, ssize_t, ssize_t))
{
    Py_buffer in, out;
    Py_ssize_t size;
    if (!PyArg_ParseTuple(args, "y*nw*", &in, &size, &out))
        return NULL;
    PyObject *list = PyList_New(0);
    if (list != NULL && size < 1) {
        PyErr_SetString(PyExc_ValueError, "size must be positive");
        Py_CLEAR(list);
    }
    if (list != NULL) {
        Items it = {append_item, list, out.buf, out.len, 0};
        int status = merge(&it, in.buf, in.len, size);
        if (status == VNET_ENOMEM)
            PyErr_NoMemory();
        else if (status == VNET_ESPACE)
            PyErr_SetString(PyExc_ValueError, "output buffer too small");
        if (status)                                  /* (VNET_EEMIT: append_item set the error) */
            Py_CLEAR(list);
    }
    PyBuffer_Release(&in);
    PyBuffer_Release(&out);
    return list;
}

static PyObject *coalesce_into(PyObject *self, PyObject *args) { return coalesce_with(args, vnet_tcp_items); }
static PyObject *coalesce_udp_into(PyObject *self, PyObject *args) { return coalesce_with(args, vnet_udp_items); }

/* ---- inner sources ---------------------------------------------------------- */

PyDoc_STRVAR(sources_within_doc,
"sources_within(buffer, size, network, netmask) -> bool\n\n"
"Whether every datagram of a GRO receive (SIZE >= 20 bytes each, the last\n"
"possibly shorter) long enough to hold an IPv4 header has its source address\n"
"(bytes 12-15) in NETWORK/NETMASK (32-bit integers). fastudp.Worker.sources_leased\n"
"the Python way.");

static PyObject *sources_within(PyObject *self, PyObject *args)
{
    Py_buffer in;
    Py_ssize_t size;
    unsigned long network, mask;
    if (!PyArg_ParseTuple(args, "y*nkk", &in, &size, &network, &mask))
        return NULL;
    if (size < 20) {
        PyBuffer_Release(&in);
        PyErr_SetString(PyExc_ValueError, "size must be at least an IPv4 header (20)");
        return NULL;
    }
    int ok = vnet_sources_within(in.buf, in.len, size, (uint32_t)network, (uint32_t)mask);
    PyBuffer_Release(&in);
    return PyBool_FromLong(ok);
}

/* ---- one small packet ------------------------------------------------------ */

PyDoc_STRVAR(forward_doc,
"forward(packet, flags, csum_start, csum_offset) -> bool\n\n"
"packet.decrement_ttl, then (FLAGS has NEEDS_CSUM) vnet.finish_checksum, in\n"
"place on PACKET (writable), with the same bytes as a result. False, packet\n"
"untouched, if the TTL would reach 0.");

static PyObject *forward(PyObject *self, PyObject *args)
{
    Py_buffer pb;
    int flags;
    Py_ssize_t csum_start, csum_offset;
    if (!PyArg_ParseTuple(args, "w*inn", &pb, &flags, &csum_start, &csum_offset))
        return NULL;
    int done = vnet_forward(pb.buf, pb.len, flags, csum_start, csum_offset);
    PyBuffer_Release(&pb);
    return PyBool_FromLong(done);
}

/* ---- one datagram from the underlay ----------------------------------------- */

PyDoc_STRVAR(ipv4_problem_doc,
"ipv4_problem(datagram) -> int\n\n"
"packet.ipv4_problem as a number: 0 none, then 1 truncated, 2 version, 3 header\n"
"length, 4 total length, 5 checksum (the order of fastudp.MALFORMED).");

static PyObject *ipv4_problem(PyObject *self, PyObject *arg)
{
    Py_buffer pb;
    if (PyObject_GetBuffer(arg, &pb, PyBUF_SIMPLE) < 0)
        return NULL;
    int problem = vnet_ipv4_problem(pb.buf, pb.len);
    PyBuffer_Release(&pb);
    return PyLong_FromLong(problem);
}

static PyMethodDef methods[] = {
    {"forward", forward, METH_VARARGS, forward_doc},
    {"ipv4_problem", ipv4_problem, METH_O, ipv4_problem_doc},
    {"segment_into", segment_into, METH_VARARGS, segment_into_doc},
    {"coalesce_into", coalesce_into, METH_VARARGS, coalesce_into_doc},
    {"coalesce_udp_into", coalesce_udp_into, METH_VARARGS, coalesce_udp_into_doc},
    {"sources_within", sources_within, METH_VARARGS, sources_within_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "netemu.overlay._vnetc",
    "The udp fast path's segmentation and coalescing, compiled (see vnet.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__vnetc(void) { return PyModule_Create(&module); }
