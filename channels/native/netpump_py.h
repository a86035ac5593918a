/* channels._netpump's Python face: the Pump type over netpump.c's loops.
 *
 * A Pump holds the buffers it runs on (the ring area, the pools or pages, the counters page)
 * as buffer exports for its whole life, so none can be unmapped under it (Python's mmap refuses
 * to close while an export is alive: the grant mapper then keeps a dropped pool mapped until
 * the pump goes, as it does for a page a Python data path still holds). ``run()`` releases the
 * GIL until the loop ends: stopped, a protocol violation, or a frame for Python's checked path.
 * Include only from netpump.c.
 */

#include "pump_py.h"

typedef struct {
    PyObject_HEAD
    int kind;
    pump_t p;
    views_t views; /* ring, pages, counters (kept for life) */
    pool_views_t pools;
    int running;
} Pump;

/* A Pump before (or without) __init__: nothing to close or stop. */
static PyObject *Pump_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    Pump *self = (Pump *)PyType_GenericNew(type, args, kw);
    if (self)
        self->p.stop_fd = self->p.mine.fd = self->p.peer.fd = -1;
    return (PyObject *)self;
}

/* netback rx keeps posted buffers between runs: a replaced pool stays mapped while one of
   them lies in it. */
static int holds_page(const void *pump, const uint8_t *lo, size_t len) {
    const pump_t *p = pump;
    for (uint32_t i = 0; i < p->held_len; i++) {
        const uint8_t *page = HELD(p, i);
        if (page >= lo && page < lo + len)
            return 1;
    }
    return 0;
}

static int set_pools(Pump *self, PyObject *pools) {
    return grants_set(&self->p.grants, &self->pools, pools,
                      self->kind == NETBACK_RX ? holds_page : NULL, &self->p);
}

static int uint_list(PyObject *obj, uint32_t **out, Py_ssize_t *len) {
    PyObject *seq = PySequence_Fast(obj, "expected a sequence of integers");
    if (!seq)
        return -1;
    *len = PySequence_Fast_GET_SIZE(seq);
    *out = calloc((size_t)*len + 1, sizeof **out);
    if (!*out) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < *len; i++) {
        unsigned long v = PyLong_AsUnsignedLong(PySequence_Fast_GET_ITEM(seq, i));
        if (PyErr_Occurred()) {
            Py_DECREF(seq);
            return -1;
        }
        (*out)[i] = (uint32_t)v;
    }
    Py_DECREF(seq);
    return 0;
}

static int Pump_init(Pump *self, PyObject *args, PyObject *kw) {
    static char *names[] = {"kind", "area", "slot_size", "nr_ents", "cons", "prod_pvt",
                            "pushed", "tap_fd", "mine", "peer", "counters", "pools", "domid",
                            "pages", "grefs", "slot_page", "gso", "sources", "figures", NULL};
    PyObject *area, *mine, *peer, *counters = Py_None, *pools = NULL, *pages = Py_None;
    PyObject *grefs = NULL, *slot_page = NULL, *sources = Py_None, *figures = Py_None;
    unsigned int slot, nr, cons, prod_pvt, pushed, domid = 0;
    int tap_fd, gso = 0;
    if (self->views.n || self->p.mine.sem) {
        PyErr_SetString(PyExc_RuntimeError, "a Pump is initialised once");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iOIIIIIiUU|$OOIOOOpOO", names, &self->kind,
                                     &area, &slot, &nr, &cons, &prod_pvt, &pushed, &tap_fd,
                                     &mine, &peer, &counters, &pools, &domid, &pages, &grefs,
                                     &slot_page, &gso, &sources, &figures))
        return -1;
    if (domid > 0xFFFF) {
        PyErr_Format(PyExc_ValueError, "domid %u is not a domain id", domid);
        return -1;
    }
    unsigned int want = self->kind == NETBACK_TX || self->kind == NETFRONT_TX ? 12 : 8;
    if (slot != want) {
        PyErr_Format(PyExc_ValueError, "a %u-byte slot is not this pump's ring (%u)", slot, want);
        return -1;
    }
    pump_t *p = &self->p;
    memset(p, 0, sizeof *p);
    p->tap_fd = tap_fd;
    p->gso = gso;
    p->grants.domid = (uint16_t)domid;
    p->counters = p->scratch;
    p->stop_fd = p->mine.fd = p->peer.fd = -1;
    p->spin.window = SPIN_START;
    Py_buffer *view;
    if (self->kind < NETBACK_TX || self->kind > NETFRONT_RX || !nr || nr & (nr - 1) ||
        views_keep(&self->views, area, 1, &view) < 0 ||
        (uint64_t)RING_HEADER + (uint64_t)nr * slot > (uint64_t)view->len) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "bad pump kind or ring geometry");
        return -1;
    }
    p->ring = (ring_t){(volatile uint32_t *)view->buf, (uint8_t *)view->buf + RING_HEADER,
                       nr, nr - 1, slot, cons, prod_pvt, pushed, 0, NULL};
    if (figures_keep(&self->views, figures, &p->ring, &p->eoi) < 0)
        return -1;
    if (counters != Py_None) {
        if (views_keep(&self->views, counters, 1, &view) < 0)
            return -1;
        if (view->len < (Py_ssize_t)(N_COUNTERS * 8) || (uintptr_t)view->buf % 8) {
            PyErr_SetString(PyExc_ValueError, "counters: too small or unaligned");
            return -1;
        }
        p->counters = view->buf;
    }
    if (pools && set_pools(self, pools) < 0)
        return -1;
    if (pages != Py_None) {
        Py_ssize_t n;
        if (views_keep(&self->views, pages, 1, &view) < 0 || !grefs || uint_list(grefs, &p->grefs, &n) < 0)
            return -1;
        if ((Py_ssize_t)n * (Py_ssize_t)PAGE_SIZE > view->len || n > 65536) {
            PyErr_SetString(PyExc_ValueError, "more grant refs than pages");
            return -1;
        }
        p->pages = view->buf;
        p->npages = (uint32_t)n;
        p->free_stack = calloc(n + 1, sizeof *p->free_stack);
        p->in_flight = calloc(n + 1, 1);
        if (!p->free_stack || !p->in_flight) {
            PyErr_NoMemory();
            return -1;
        }
        for (uint32_t i = 0; i < p->npages; i++)
            p->free_stack[i] = i;
        p->nfree = p->npages;
    }
    if (slot_page) {
        Py_ssize_t n;
        if (uint_list(slot_page, &p->slot_page, &n) < 0)
            return -1;
        if (n != nr) {
            PyErr_SetString(PyExc_ValueError, "slot_page must name a page for every slot");
            return -1;
        }
        for (Py_ssize_t i = 0; i < n; i++)
            if (p->slot_page[i] >= p->npages) {
                PyErr_SetString(PyExc_ValueError, "slot_page names a page outside the pool");
                return -1;
            }
    }
    if (self->kind == NETFRONT_TX || self->kind == NETFRONT_RX) {
        if (!p->pages || (self->kind == NETFRONT_RX && !p->slot_page)) {
            PyErr_SetString(PyExc_ValueError, "a frontend pump needs pages, grefs (and slot_page)");
            return -1;
        }
    }
    if (sources != Py_None) {
        Py_buffer mac, ipv4 = {0};
        int any;
        if (!PyArg_ParseTuple(sources, "y*z*p", &mac, &ipv4, &any))
            return -1;
        int ok = mac.len == 6 && (!ipv4.buf || ipv4.len == 4);
        if (ok) {
            memcpy(p->mac, mac.buf, 6);
            if (ipv4.buf)
                memcpy(p->ipv4, ipv4.buf, 4), p->has_ipv4 = 1;
        }
        PyBuffer_Release(&mac);
        if (ipv4.buf)
            PyBuffer_Release(&ipv4);
        if (!ok) {
            PyErr_SetString(PyExc_ValueError, "sources: a 6-byte MAC and a 4-byte IPv4 or None");
            return -1;
        }
        p->check_sources = 1;
        p->any_address = any;
    }
    if ((p->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    if (bell_open(mine, &p->mine) < 0 || bell_open(peer, &p->peer) < 0)
        return -1;
    return 0;
}

static void Pump_dealloc(Pump *self) {
    pump_t *p = &self->p;
    grants_free(&p->grants);
    free(p->grefs);
    free(p->free_stack);
    free(p->in_flight);
    free(p->slot_page);
    if (p->stop_fd >= 0)
        close(p->stop_fd);
    bell_close(&p->mine);
    bell_close(&p->peer);
    views_release(&self->views);
    pool_views_release(&self->pools);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Pump_run(Pump *self, PyObject *unused) {
    pump_t *p = &self->p;
    if (!p->mine.sem || !p->peer.sem || self->running) {
        PyErr_SetString(PyExc_RuntimeError, "pump not initialised, or already running");
        return NULL;
    }
    int code;
    self->running = 1;
    p->why[0] = 0;
    p->detail = 0;
    Py_BEGIN_ALLOW_THREADS
    switch (self->kind) {
    case NETBACK_TX:
        code = run_netback_tx(p);
        break;
    case NETBACK_RX:
        code = run_netback_rx(p);
        break;
    case NETFRONT_TX:
        code = run_netfront_tx(p);
        break;
    default:
        code = run_netfront_rx(p);
    }
    Py_END_ALLOW_THREADS
    self->running = 0;
    return Py_BuildValue("isI", code, p->why, p->detail);
}

static PyObject *Pump_stop(Pump *self, PyObject *unused) {
    self->p.stopping = 1;
    uint64_t one = 1;
    if (self->p.stop_fd >= 0)
        (void)!write(self->p.stop_fd, &one, sizeof one);
    Py_RETURN_NONE;
}

static PyObject *Pump_set_pools(Pump *self, PyObject *pools) {
    if (self->running) {
        PyErr_SetString(PyExc_RuntimeError, "set_pools while the pump runs");
        return NULL;
    }
    self->running = 1; /* parsing may run Python code: no run() meanwhile */
    int failed = set_pools(self, pools) < 0;
    self->running = 0;
    if (failed)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Pump_indices(Pump *self, void *unused) {
    ring_t *r = &self->p.ring;
    return Py_BuildValue("III", r->cons, r->prod_pvt, r->pushed);
}

static int Pump_set_indices(Pump *self, PyObject *value, void *unused) {
    unsigned int cons, prod_pvt, pushed;
    if (self->running) {
        PyErr_SetString(PyExc_RuntimeError, "indices set while the pump runs");
        return -1;
    }
    if (!value || !PyArg_ParseTuple(value, "III", &cons, &prod_pvt, &pushed))
        return -1;
    self->p.ring.cons = cons, self->p.ring.prod_pvt = prod_pvt, self->p.ring.pushed = pushed;
    return 0;
}

static PyObject *Pump_spurious(Pump *self, void *unused) {
    return PyLong_FromUnsignedLongLong(self->p.eoi.spurious);
}

static PyObject *Pump_held(Pump *self, void *unused) {
    return PyLong_FromUnsignedLong(self->p.held_len);
}

static PyMethodDef Pump_methods[] = {
    {"run", (PyCFunction)Pump_run, METH_NOARGS,
     "Run the loop, GIL released, until it stops: (code, why, detail)."},
    {"stop", (PyCFunction)Pump_stop, METH_NOARGS, "Make run() return PUMP_STOPPED soon."},
    {"set_pools", (PyCFunction)Pump_set_pools, METH_O,
     "Look grant refs up in these pools from now on (the old ones stay mapped)."},
    {NULL}};

static PyGetSetDef Pump_getset[] = {
    {"indices", (getter)Pump_indices, (setter)Pump_set_indices, "(cons, prod_pvt, pushed) of the ring", NULL},
    {"spurious", (getter)Pump_spurious, NULL, "wakeups that found no work", NULL},
    {"held", (getter)Pump_held, NULL, "rx buffers taken off the ring, not yet filled", NULL},
    {NULL}};

static PyTypeObject PumpType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "channels._netpump.Pump",
    .tp_basicsize = sizeof(Pump),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One netif batch pump (netback tx/rx, netfront tx/rx).",
    .tp_new = Pump_new,
    .tp_init = (initproc)Pump_init,
    .tp_dealloc = (destructor)Pump_dealloc,
    .tp_methods = Pump_methods,
    .tp_getset = Pump_getset,
};

/* serve_queue(tx, rx) -> (which, code, why, detail): a queue's two pumps of one side in one
 * loop (netpump.c's run_netback_queue, run_netfront_queue), GIL released, until either ends;
 * `which` says whose end it is (0: tx, 1: rx), the rest is as that pump's run() says it. */
static PyObject *serve_queue(PyObject *module, PyObject *args) {
    Pump *tx, *rx;
    if (!PyArg_ParseTuple(args, "O!O!", &PumpType, &tx, &PumpType, &rx))
        return NULL;
    int back = tx->kind == NETBACK_TX && rx->kind == NETBACK_RX;
    if (!back && !(tx->kind == NETFRONT_TX && rx->kind == NETFRONT_RX)) {
        PyErr_SetString(PyExc_ValueError, "serve_queue: a tx and an rx pump of one side");
        return NULL;
    }
    if (!tx->p.mine.sem || !rx->p.mine.sem || tx->running || rx->running) {
        PyErr_SetString(PyExc_RuntimeError, "pump not initialised, or already running");
        return NULL;
    }
    if (tx->p.tap_fd != rx->p.tap_fd) {
        PyErr_SetString(PyExc_ValueError, "serve_queue: the two pumps serve different TAPs");
        return NULL;
    }
    int which = 0, code;
    tx->running = rx->running = 1;
    tx->p.why[0] = rx->p.why[0] = 0;
    tx->p.detail = rx->p.detail = 0;
    Py_BEGIN_ALLOW_THREADS
    code = back ? run_netback_queue(&tx->p, &rx->p, &which)
                : run_netfront_queue(&tx->p, &rx->p, &which);
    Py_END_ALLOW_THREADS
    tx->running = rx->running = 0;
    pump_t *ended = which ? &rx->p : &tx->p;
    return Py_BuildValue("iisI", which, code, ended->why, ended->detail);
}

static PyMethodDef module_methods[] = {
    {"serve_queue", serve_queue, METH_VARARGS,
     "serve_queue(tx, rx): both pumps in one loop until either ends: (which, code, why, "
     "detail)."},
    {NULL}};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "channels._netpump",
    .m_doc = "netif's batch pumps, native (see netpump.c).", .m_size = -1,
    .m_methods = module_methods};

PyMODINIT_FUNC PyInit__netpump(void) {
    static const constant_t constants[] = {
        {"NETBACK_TX", NETBACK_TX}, {"NETBACK_RX", NETBACK_RX}, {"NETFRONT_TX", NETFRONT_TX},
        {"NETFRONT_RX", NETFRONT_RX}, {"STOPPED", PUMP_STOPPED}, {"FATAL", PUMP_FATAL},
        {"FALLBACK", PUMP_FALLBACK}, {"MISS", PUMP_MISS}, {"BROKEN", PUMP_BROKEN},
        {"IOERROR", PUMP_IOERROR}, {"N_COUNTERS", N_COUNTERS}, {"MAX_POOLS", MAX_POOLS},
        {"RING_FIGURES", RF_N},
    };
    return pump_module(&module, &PumpType, constants, sizeof constants / sizeof constants[0]);
}
