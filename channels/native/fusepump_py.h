/* channels._fusepump's Python face: the Pump type over fusepump.c's reader and reaper.
 *
 * ``read()`` and ``reap()`` release the GIL until their loop ends; ``io()``, ``quiesce()`` and
 * ``reset()`` release it while they wait. Include only from fusepump.c.
 */
#include "pump_py.h"

typedef struct {
    PyObject_HEAD
    front_t f;
    views_t views; /* ring, data pages, indirect pages (kept for life) */
    int ready, reading, reaping;
} Pump;

static PyObject *Pump_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    Pump *self = (Pump *)PyType_GenericNew(type, args, kw);
    if (self)
        self->f.stop_fd = self->f.mine.fd = self->f.peer.fd = -1;
    return (PyObject *)self;
}

static int tables(front_t *f) {
    uint32_t nr = f->ring.nr;
    f->parts = calloc(nr, sizeof *f->parts);
    f->free_ids = calloc(nr, sizeof *f->free_ids);
    f->xfers = calloc(nr, sizeof *f->xfers);
    f->free_xfers = calloc(nr, sizeof *f->free_xfers);
    f->free_pages = calloc(f->npages, sizeof *f->free_pages);
    if (!f->parts || !f->free_ids || !f->xfers || !f->free_xfers || !f->free_pages)
        return -1;
    for (uint32_t i = 0; i < nr; i++) {
        f->free_ids[i] = nr - 1 - i; /* handed out from the end: lowest first */
        f->free_xfers[i] = i;
        if (!(f->xfers[i].pages = calloc(MAX_PAGES, sizeof(uint16_t))))
            return -1;
    }
    f->nfree_ids = f->nfree_xfers = nr;
    for (uint32_t i = 0; i < f->npages; i++)
        f->free_pages[i] = (uint16_t)(f->npages - 1 - i);
    f->nfree_pages = f->npages;
    return 0;
}

static int Pump_init(Pump *self, PyObject *args, PyObject *kw) {
    static char *names[] = {"fd",       "area",     "nr_ents",       "cons",    "prod_pvt",
                            "pushed",   "data",     "data_gref",     "indirect", "indirect_gref",
                            "sectors",  "max_segments", "readonly",  "mine",    "peer",
                            NULL};
    PyObject *area, *data, *indirect, *mine, *peer;
    unsigned int nr, cons, prod_pvt, pushed, data_gref, indirect_gref, max_segments;
    unsigned long long sectors;
    int fd, readonly;
    if (self->ready) {
        PyErr_SetString(PyExc_RuntimeError, "a Pump is initialised once");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iOIIIIOIOIKIpUU", names, &fd, &area, &nr, &cons,
                                     &prod_pvt, &pushed, &data, &data_gref, &indirect,
                                     &indirect_gref, &sectors, &max_segments, &readonly, &mine,
                                     &peer))
        return -1;
    front_t *f = &self->f;
    memset(f, 0, sizeof *f);
    f->stop_fd = f->mine.fd = f->peer.fd = -1;
    f->fuse_fd = fd;
    f->size = sectors * SECTOR_SIZE;
    f->max_segments = max_segments;
    f->readonly = readonly;
    f->max_read = MAX_PAGES * PAGE_SIZE;
    f->spin.window = SPIN_START;
    f->data_gref = data_gref;
    f->indirect_gref = indirect_gref;
    Py_buffer *view;
    if (!nr || nr & (nr - 1) || nr > 512 || sectors > (UINT64_MAX >> 10) ||
        max_segments < MAX_SEGMENTS || max_segments > MAX_PAGES ||
        (uint64_t)nr * max_segments < MAX_PAGES || views_keep(&self->views, area, 1, &view) < 0 ||
        (uint64_t)RING_HEADER + (uint64_t)nr * BLK_SLOT > (uint64_t)view->len) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "bad blkif ring geometry or segment limit");
        return -1;
    }
    f->ring = (ring_t){(volatile uint32_t *)view->buf, (uint8_t *)view->buf + RING_HEADER,
                       nr, nr - 1, BLK_SLOT, cons, prod_pvt, pushed, 0, NULL};
    if (views_keep(&self->views, data, 1, &view) < 0)
        return -1;
    f->data = view->buf;
    f->npages = (uint32_t)(view->len / PAGE_SIZE);
    if (f->npages < 2 * MAX_PAGES || f->npages > 65536) { /* the landing and one transfer */
        PyErr_Format(PyExc_ValueError, "a data pool of %u pages: %u to 65536", f->npages,
                     2 * MAX_PAGES);
        return -1;
    }
    if (max_segments > MAX_SEGMENTS) {
        if (indirect == Py_None || views_keep(&self->views, indirect, 1, &view) < 0 ||
            (uint64_t)view->len < (uint64_t)nr * PAGE_SIZE) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "indirect segments need a page per ring slot");
            return -1;
        }
        f->indirect = view->buf;
    }
    pthread_mutex_init(&f->lock, NULL);
    pthread_cond_init(&f->room, NULL);
    self->ready = 1;
    if (tables(f) < 0) {
        PyErr_NoMemory();
        return -1;
    }
    if ((f->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    if (bell_open(mine, &f->mine) < 0 || bell_open(peer, &f->peer) < 0)
        return -1;
    return 0;
}

static void Pump_dealloc(Pump *self) {
    front_t *f = &self->f;
    if (f->xfers)
        for (uint32_t i = 0; i < f->ring.nr; i++)
            free(f->xfers[i].pages);
    free(f->parts);
    free(f->free_ids);
    free(f->xfers);
    free(f->free_xfers);
    free(f->free_pages);
    if (self->ready) {
        pthread_mutex_destroy(&f->lock);
        pthread_cond_destroy(&f->room);
    }
    if (f->stop_fd >= 0)
        close(f->stop_fd);
    bell_close(&f->mine);
    bell_close(&f->peer);
    views_release(&self->views);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int usable(Pump *self) {
    if (!self->f.mine.sem || !self->f.peer.sem) {
        PyErr_SetString(PyExc_RuntimeError, "pump not initialised");
        return 0;
    }
    return 1;
}

/* read() -> (code, message): serve /dev/fuse until a message is Python's (R_PYTHON and its
 * bytes), the file system is gone (R_ENDED, None) or reading fails (R_ERROR, errno). */
static PyObject *Pump_read(Pump *self, PyObject *unused) {
    front_t *f = &self->f;
    if (f->stopping && !f->mine.sem)
        return Py_BuildValue("(iO)", R_ENDED, Py_None); /* closed: the disk went away */
    if (!usable(self))
        return NULL;
    if (self->reading) {
        PyErr_SetString(PyExc_RuntimeError, "one reader at a time");
        return NULL;
    }
    uint32_t length = 0;
    int code;
    self->reading = 1;
    Py_BEGIN_ALLOW_THREADS code = reader(f, &length);
    Py_END_ALLOW_THREADS self->reading = 0;
    if (code == R_ERROR)
        return Py_BuildValue("(iI)", code, length);
    if (code != R_PYTHON)
        return Py_BuildValue("(iO)", code, Py_None);
    PyObject *message = PyBytes_FromStringAndSize(NULL, length);
    if (!message)
        return NULL;
    uint8_t *out = (uint8_t *)PyBytes_AS_STRING(message);
    uint32_t head = length < HEAD_ROOM ? length : HEAD_ROOM;
    memcpy(out, f->head, head);
    for (uint32_t at = head, i = 0; at < length; at += PAGE_SIZE, i++)
        memcpy(out + at, page_at(f, f->landing[i]),
               length - at < PAGE_SIZE ? length - at : PAGE_SIZE);
    return Py_BuildValue("(iN)", code, message);
}

/* reap() -> (code, why): take responses until stopped (R_STOPPED) or broken (R_BROKEN). */
static PyObject *Pump_reap(Pump *self, PyObject *unused) {
    front_t *f = &self->f;
    if (!usable(self))
        return NULL;
    if (self->reaping) {
        PyErr_SetString(PyExc_RuntimeError, "one reaper at a time");
        return NULL;
    }
    int code;
    self->reaping = 1;
    Py_BEGIN_ALLOW_THREADS code = reap_loop(f);
    Py_END_ALLOW_THREADS self->reaping = 0;
    return Py_BuildValue("(is)", code, code == R_BROKEN ? f->why : "");
}

/* io(operation, offset, length, data=None) -> (status, data): one transfer, waited for. */
static PyObject *Pump_io(Pump *self, PyObject *args) {
    front_t *f = &self->f;
    unsigned int op;
    unsigned long long offset, length;
    Py_buffer data = {0};
    if (!usable(self) || !PyArg_ParseTuple(args, "IKK|y*", &op, &offset, &length, &data))
        return NULL;
    int rw = op == BLKIF_OP_READ || op == BLKIF_OP_WRITE;
    PyObject *out = NULL;
    if ((!rw && op != BLKIF_OP_FLUSH_DISKCACHE && op != BLKIF_OP_DISCARD) ||
        offset % SECTOR_SIZE || length % SECTOR_SIZE ||
        (rw && (!length || length > MAX_PAGES * PAGE_SIZE)) ||
        (op == BLKIF_OP_WRITE && (uint64_t)data.len != length) ||
        (op != BLKIF_OP_FLUSH_DISKCACHE && (offset > f->size || length > f->size - offset))) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "io: a transfer of whole sectors inside the disk");
        return NULL;
    }
    uint8_t *buf = data.buf;
    if (op == BLKIF_OP_READ) {
        if (!(out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)length)))
            return NULL;
        buf = (uint8_t *)PyBytes_AS_STRING(out);
    }
    int16_t status;
    Py_BEGIN_ALLOW_THREADS status = io(f, (uint8_t)op, offset, length, buf);
    Py_END_ALLOW_THREADS PyBuffer_Release(&data);
    if (status != BLKIF_RSP_OKAY || !out) {
        Py_XDECREF(out);
        return Py_BuildValue("(iO)", status, Py_None);
    }
    return Py_BuildValue("(iN)", status, out);
}

static PyObject *Pump_quiesce(Pump *self, PyObject *unused) {
    if (!usable(self))
        return NULL;
    Py_BEGIN_ALLOW_THREADS quiesce(&self->f);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

/* reset() -> requests posted again, or -1 if the disk is broken (``why`` says why). */
static PyObject *Pump_reset(Pump *self, PyObject *unused) {
    if (!usable(self))
        return NULL;
    int64_t replayed;
    Py_BEGIN_ALLOW_THREADS replayed = reset(&self->f);
    Py_END_ALLOW_THREADS return PyLong_FromLongLong(replayed);
}

/* configure(max_pages): INIT is done; READ and WRITE of up to max_pages pages are ours. */
static PyObject *Pump_configure(Pump *self, PyObject *args) {
    unsigned int max_pages;
    if (!PyArg_ParseTuple(args, "I", &max_pages))
        return NULL;
    if (!max_pages || max_pages > MAX_PAGES) {
        PyErr_Format(PyExc_ValueError, "max_pages %u: 1 to %u", max_pages, MAX_PAGES);
        return NULL;
    }
    pthread_mutex_lock(&self->f.lock);
    self->f.max_read = max_pages * PAGE_SIZE;
    self->f.initialized = 1;
    pthread_mutex_unlock(&self->f.lock);
    Py_RETURN_NONE;
}

static PyObject *Pump_stop(Pump *self, PyObject *unused) {
    if (!usable(self))
        return NULL;
    Py_BEGIN_ALLOW_THREADS stop(&self->f);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

/* close(): let go of the ring and the pools (they can be unmapped); the pump is done. Only
 * once its reader and reaper have returned. */
static PyObject *Pump_close(Pump *self, PyObject *unused) {
    front_t *f = &self->f;
    if (self->reading || self->reaping) {
        PyErr_SetString(PyExc_RuntimeError, "close: the reader or the reaper still runs");
        return NULL;
    }
    if (f->mine.sem && !f->stopping) {
        PyErr_SetString(PyExc_RuntimeError, "close: stop() first");
        return NULL;
    }
    bell_close(&f->mine);
    bell_close(&f->peer);
    views_release(&self->views);
    Py_RETURN_NONE;
}

static PyObject *Pump_get_spurious(Pump *self, void *unused) {
    return PyLong_FromUnsignedLongLong(self->f.eoi.spurious);
}

static PyObject *Pump_get_why(Pump *self, void *unused) {
    return PyUnicode_FromString(self->f.broken ? self->f.why : "");
}

static PyObject *Pump_get_in_flight(Pump *self, void *unused) {
    return PyLong_FromUnsignedLong(self->f.in_flight);
}

static PyObject *Pump_get_indices(Pump *self, void *unused) {
    ring_t *r = &self->f.ring;
    return Py_BuildValue("(III)", r->cons, r->prod_pvt, r->pushed);
}

static PyMethodDef Pump_methods[] = {
    {"read", (PyCFunction)Pump_read, METH_NOARGS, "serve /dev/fuse until Python's turn"},
    {"reap", (PyCFunction)Pump_reap, METH_NOARGS, "take responses until stopped or broken"},
    {"io", (PyCFunction)Pump_io, METH_VARARGS, "one transfer, waited for"},
    {"quiesce", (PyCFunction)Pump_quiesce, METH_NOARGS, "until nothing is in flight"},
    {"reset", (PyCFunction)Pump_reset, METH_NOARGS, "the backend restarted: replay"},
    {"configure", (PyCFunction)Pump_configure, METH_VARARGS, "INIT is done"},
    {"stop", (PyCFunction)Pump_stop, METH_NOARGS, "fail everything, end the reaper"},
    {"close", (PyCFunction)Pump_close, METH_NOARGS, "let go of the ring and pools"},
    {NULL},
};

static PyGetSetDef Pump_getset[] = {
    {"spurious", (getter)Pump_get_spurious, NULL, "wakeups that found no responses", NULL},
    {"why", (getter)Pump_get_why, NULL, "why the disk is broken ('' if it is not)", NULL},
    {"in_flight", (getter)Pump_get_in_flight, NULL, "requests on the ring", NULL},
    {"indices", (getter)Pump_get_indices, NULL, "(rsp_cons, req_prod_pvt, req_pushed)", NULL},
    {NULL},
};

static PyTypeObject PumpType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "channels._fusepump.Pump",
    .tp_basicsize = sizeof(Pump),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "blkfront's native pump: /dev/fuse to the blkif ring and back",
    .tp_new = Pump_new,
    .tp_init = (initproc)Pump_init,
    .tp_dealloc = (destructor)Pump_dealloc,
    .tp_methods = Pump_methods,
    .tp_getset = Pump_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "channels._fusepump",
    .m_doc = "blkfront's batch pump, native (see fusepump.c).", .m_size = -1};

PyMODINIT_FUNC PyInit__fusepump(void) {
    static const constant_t constants[] = {
        {"STOPPED", R_STOPPED}, {"PYTHON", R_PYTHON}, {"ENDED", R_ENDED},
        {"BROKEN", R_BROKEN}, {"ERROR", R_ERROR},
    };
    return pump_module(&module, &PumpType, constants, sizeof constants / sizeof constants[0]);
}
