/* channels._blkpump's Python face: the Pump type over blkpump.c's loop.
 *
 * ``run()`` releases the GIL until the loop ends: stopped, a broken ring, or a request for
 * Python's path (FLUSH, DISCARD, a grant ref in no pool we map); the I/O it started is
 * complete and answered by then. Include only from blkpump.c.
 */
#include "pump_py.h"

typedef struct {
    PyObject_HEAD
    blk_t b;
    views_t views; /* ring, counters (kept for life) */
    pool_views_t pools;
    int running, ready;
} Pump;

/* A Pump before (or without) __init__: nothing to close or stop. */
static PyObject *Pump_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    Pump *self = (Pump *)PyType_GenericNew(type, args, kw);
    if (self)
        self->b.stop_fd = self->b.mine.fd = self->b.peer.fd = -1;
    return (PyObject *)self;
}

static int make_jobs(blk_t *b, unsigned int outstanding) {
    if (outstanding < 1 || outstanding > MAX_OUTSTANDING) {
        PyErr_Format(PyExc_ValueError, "outstanding %u: 1 to %d", outstanding, MAX_OUTSTANDING);
        return -1;
    }
    b->max = b->nfree = outstanding;
    b->jobs = calloc(outstanding, sizeof *b->jobs);
    b->free_jobs = calloc(outstanding, sizeof *b->free_jobs);
    if (!b->jobs || !b->free_jobs) {
        PyErr_NoMemory();
        return -1;
    }
    for (uint32_t i = 0; i < outstanding; i++)
        b->free_jobs[i] = i;
    if (io_setup_(outstanding, &b->aio) < 0) {
        b->aio = 0;
        PyErr_Format(PyExc_OSError, "io_setup(%u): %s", outstanding, strerror(errno));
        return -1;
    }
    return 0;
}

static int Pump_init(Pump *self, PyObject *args, PyObject *kw) {
    static char *names[] = {"kind",   "area",  "slot_size", "nr_ents",  "cons",
                            "prod_pvt", "pushed", "fd",     "mine",     "peer",
                            "counters", "pools", "domid",   "sectors",  "readonly",
                            "outstanding", "figures", NULL};
    PyObject *area, *mine, *peer, *counters, *pools, *figures = Py_None;
    unsigned int kind, slot, nr, cons, prod_pvt, pushed, domid = 0, outstanding = 32;
    unsigned long long sectors = 0;
    int fd, readonly = 0;
    if (self->views.n || self->ready) {
        PyErr_SetString(PyExc_RuntimeError, "a Pump is initialised once");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "IOIIIIIiUU|$OOIKpIO", names, &kind, &area,
                                     &slot, &nr, &cons, &prod_pvt, &pushed, &fd, &mine, &peer,
                                     &counters, &pools, &domid, &sectors, &readonly,
                                     &outstanding, &figures))
        return -1;
    blk_t *b = &self->b;
    memset(b, 0, sizeof *b);
    b->stop_fd = b->mine.fd = b->peer.fd = -1;
    b->fd = fd;
    b->sectors = sectors;
    b->readonly = readonly;
    b->grants.domid = (uint16_t)domid;
    b->counters = b->scratch;
    b->spin.window = SPIN_START;
    Py_buffer *view;
    if (kind != BLKBACK || slot != BLK_SLOT || !nr || nr & (nr - 1) ||
        views_keep(&self->views, area, 1, &view) < 0 ||
        (uint64_t)RING_HEADER + (uint64_t)nr * slot > (uint64_t)view->len) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "bad pump kind or blkif ring geometry");
        return -1;
    }
    b->ring = (ring_t){(volatile uint32_t *)view->buf, (uint8_t *)view->buf + RING_HEADER,
                       nr, nr - 1, slot, cons, prod_pvt, pushed, 0, NULL};
    if (figures_keep(&self->views, figures, &b->ring, &b->eoi) < 0)
        return -1;
    if (counters) {
        if (views_keep(&self->views, counters, 1, &view) < 0)
            return -1;
        if (view->len < (Py_ssize_t)(N_COUNTERS * 8) || (uintptr_t)view->buf % 8) {
            PyErr_SetString(PyExc_ValueError, "counters: too small or unaligned");
            return -1;
        }
        b->counters = view->buf;
    }
    if (pools && grants_set(&b->grants, &self->pools, pools, NULL, NULL) < 0)
        return -1;
    pthread_mutex_init(&b->lock, NULL);
    pthread_cond_init(&b->room, NULL);
    pthread_cond_init(&b->work, NULL);
    self->ready = 1;
    if (make_jobs(b, outstanding) < 0)
        return -1;
    if ((b->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    if (bell_open(mine, &b->mine) < 0 || bell_open(peer, &b->peer) < 0)
        return -1;
    return 0;
}

static void Pump_dealloc(Pump *self) {
    blk_t *b = &self->b;
    grants_free(&b->grants);
    if (b->aio)
        io_destroy_(b->aio);
    free(b->jobs);
    free(b->free_jobs);
    if (self->ready) {
        pthread_mutex_destroy(&b->lock);
        pthread_cond_destroy(&b->room);
        pthread_cond_destroy(&b->work);
    }
    if (b->stop_fd >= 0)
        close(b->stop_fd);
    bell_close(&b->mine);
    bell_close(&b->peer);
    views_release(&self->views);
    pool_views_release(&self->pools);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Pump_run(Pump *self, PyObject *unused) {
    blk_t *b = &self->b;
    if (!b->mine.sem || !b->peer.sem || self->running) {
        PyErr_SetString(PyExc_RuntimeError, "pump not initialised, or already running");
        return NULL;
    }
    int code;
    self->running = 1;
    b->why[0] = 0;
    b->detail = 0;
    Py_BEGIN_ALLOW_THREADS
    code = run_blkback(b);
    Py_END_ALLOW_THREADS
    self->running = 0;
    return Py_BuildValue("isI", code, b->why, b->detail);
}

static PyObject *Pump_stop(Pump *self, PyObject *unused) {
    blk_t *b = &self->b;
    uint64_t one = 1;
    if (!self->ready)
        Py_RETURN_NONE;
    pthread_mutex_lock(&b->lock);
    b->stopping = 1;
    pthread_cond_broadcast(&b->room);
    pthread_mutex_unlock(&b->lock);
    if (b->stop_fd >= 0)
        (void)!write(b->stop_fd, &one, sizeof one);
    Py_RETURN_NONE;
}

static PyObject *Pump_set_pools(Pump *self, PyObject *pools) {
    if (self->running) {
        PyErr_SetString(PyExc_RuntimeError, "set_pools while the pump runs");
        return NULL;
    }
    self->running = 1; /* parsing may run Python code: no run() meanwhile */
    int failed = grants_set(&self->b.grants, &self->pools, pools, NULL, NULL) < 0;
    self->running = 0;
    if (failed)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Pump_indices(Pump *self, void *unused) {
    ring_t *r = &self->b.ring;
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
    ring_t *r = &self->b.ring;
    r->cons = cons, r->prod_pvt = prod_pvt, r->pushed = pushed;
    return 0;
}

static PyObject *Pump_spurious(Pump *self, void *unused) {
    return PyLong_FromUnsignedLongLong(self->b.eoi.spurious);
}

static PyMethodDef Pump_methods[] = {
    {"run", (PyCFunction)Pump_run, METH_NOARGS,
     "Run the loop, GIL released, until it stops: (code, why, detail)."},
    {"stop", (PyCFunction)Pump_stop, METH_NOARGS, "Make run() return PUMP_STOPPED soon."},
    {"set_pools", (PyCFunction)Pump_set_pools, METH_O,
     "Look grant refs up in these pools from now on (the old ones stay mapped)."},
    {NULL}};

static PyGetSetDef Pump_getset[] = {
    {"indices", (getter)Pump_indices, (setter)Pump_set_indices,
     "(req_cons, rsp_prod_pvt, rsp_prod pushed) of the ring", NULL},
    {"spurious", (getter)Pump_spurious, NULL, "wakeups that found no work", NULL},
    {NULL}};

static PyTypeObject PumpType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "channels._blkpump.Pump",
    .tp_basicsize = sizeof(Pump),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "blkback's batch pump for one vbd.",
    .tp_new = Pump_new,
    .tp_init = (initproc)Pump_init,
    .tp_dealloc = (destructor)Pump_dealloc,
    .tp_methods = Pump_methods,
    .tp_getset = Pump_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "channels._blkpump",
    .m_doc = "blkif's batch pump, native (see blkpump.c).", .m_size = -1};

PyMODINIT_FUNC PyInit__blkpump(void) {
    static const constant_t constants[] = {
        {"BLKBACK", BLKBACK}, {"STOPPED", PUMP_STOPPED}, {"FATAL", PUMP_FATAL},
        {"FALLBACK", PUMP_FALLBACK}, {"MISS", PUMP_MISS}, {"BROKEN", PUMP_BROKEN},
        {"N_COUNTERS", N_COUNTERS}, {"MAX_OUTSTANDING", MAX_OUTSTANDING}, {"RING_FIGURES", RF_N},
    };
    return pump_module(&module, &PumpType, constants, sizeof constants / sizeof constants[0]);
}
