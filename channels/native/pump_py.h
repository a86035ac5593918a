/* What every native pump's Python face shares: buffers held for the pump's life, doorbells
 * opened by name, the frontend's grant pools. Include after Python.h and pump.h.
 *
 * A pump holds the buffers it runs on (the ring area, the pools, the counters page) as buffer
 * exports for its whole life, so none can be unmapped under it (Python's mmap refuses to close
 * while an export is alive: the grant mapper then keeps a dropped pool mapped until the pump
 * goes, as it does for a page a Python data path still holds).
 */
#ifndef HYPER_PUMP_PY_H
#define HYPER_PUMP_PY_H

typedef struct {
    Py_buffer view[2 + MAX_POOLS * 4];
    int n;
} views_t;

static int views_keep(views_t *v, PyObject *obj, int writable, Py_buffer **out) {
    if (v->n >= (int)(sizeof v->view / sizeof v->view[0])) {
        PyErr_SetString(PyExc_ValueError, "too many buffers for one pump");
        return -1;
    }
    Py_buffer *b = &v->view[v->n];
    if (PyObject_GetBuffer(obj, b, (writable ? PyBUF_WRITABLE : 0) | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    v->n++;
    *out = b;
    return 0;
}

static void views_release(views_t *v) {
    for (int i = 0; i < v->n; i++)
        PyBuffer_Release(&v->view[i]);
    v->n = 0;
}

static sem_t *bell_open(PyObject *name) {
    const char *text = PyUnicode_AsUTF8(name);
    if (!text)
        return NULL;
    char path[256];
    snprintf(path, sizeof path, "/%s", text);
    sem_t *sem = sem_open(path, 0);
    if (sem == SEM_FAILED) {
        PyErr_Format(PyExc_OSError, "doorbell %s: %s", text, strerror(errno));
        return NULL;
    }
    return sem;
}

static void grants_free(grants_t *g) {
    for (int i = 0; i < g->n; i++)
        for (int w = 0; w < 2; w++)
            free(g->pool[i].checked[w]);
    g->n = 0;
}

/* pools: a sequence of (buffer, gref_base, pages, data_offset) (GrantMapper.native_pools);
 * they replace g's pools (the old buffers stay held) only if every one is good. */
static int grants_set(grants_t *g, views_t *views, PyObject *pools) {
    PyObject *seq = PySequence_Fast(pools, "pools must be a sequence");
    if (!seq)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > MAX_POOLS) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "%zd pools: at most %d", n, MAX_POOLS);
        return -1;
    }
    grants_t fresh = {.n = 0, .domid = g->domid};
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *buf;
        unsigned int base, pages, data_off;
        Py_buffer *view;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "OIII", &buf, &base, &pages,
                              &data_off) ||
            views_keep(views, buf, 0, &view) < 0)
            goto fail;
        if ((uint64_t)pages * 8 > data_off ||
            (uint64_t)data_off + (uint64_t)pages * PAGE_SIZE > (uint64_t)view->len) {
            PyErr_Format(PyExc_ValueError, "pool at gref %u: %u pages do not fit", base, pages);
            goto fail;
        }
        pool_t *pool = &fresh.pool[fresh.n++];
        *pool = (pool_t){view->buf, base, pages, data_off, {NULL, NULL}};
        for (int w = 0; w < 2; w++)
            if (!(pool->checked[w] = calloc(pages, 5))) {
                PyErr_NoMemory();
                goto fail;
            }
    }
    Py_DECREF(seq);
    grants_free(g);
    *g = fresh;
    return 0;
fail:
    grants_free(&fresh);
    Py_DECREF(seq);
    return -1;
}

#endif
