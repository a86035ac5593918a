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

#include <sys/stat.h>

typedef struct {
    Py_buffer view[3 + MAX_POOLS * 4];
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

/* A backend ring's figures (RF_N u64s, channels/ring.py's RING_FIGURES) counted in `figures`
 * (a buffer held for the pump's life), by the ring and by its late EOI; None: not counted. */
static inline int figures_keep(views_t *v, PyObject *figures, ring_t *ring, late_eoi_t *eoi) {
    Py_buffer *view;
    if (figures == Py_None)
        return 0;
    if (views_keep(v, figures, 1, &view) < 0)
        return -1;
    if (view->len < (Py_ssize_t)(RF_N * 8) || (uintptr_t)view->buf % 8) {
        PyErr_SetString(PyExc_ValueError, "figures: too small or unaligned");
        return -1;
    }
    ring->fig = eoi->fig = view->buf;
    return 0;
}

/* A doorbell opened by name, as channels/doorbell.py's Doorbell opens it: 0, or -1 with an
 * exception set (and nothing left open). */
static int bell_open(PyObject *name, bell_t *bell) {
    const char *text = PyUnicode_AsUTF8(name);
    if (!text)
        return -1;
    char path[256];
    snprintf(path, sizeof path, "/%s", text);
    sem_t *sem = sem_open(path, 0);
    if (sem == SEM_FAILED) {
        PyErr_Format(PyExc_OSError, "doorbell %s: %s", text, strerror(errno));
        return -1;
    }
    snprintf(path, sizeof path, "/dev/shm/fifo.%s", text);
    int fd = open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC | O_NOFOLLOW);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0 || !S_ISFIFO(st.st_mode)) {
        PyErr_Format(PyExc_OSError, "doorbell %s: %s", text,
                     fd < 0 ? strerror(errno) : "not a FIFO");
        if (fd >= 0)
            close(fd);
        sem_close(sem);
        return -1;
    }
    bell->sem = sem;
    bell->fd = fd;
    int value = 0; /* Doorbell._rearm: a count pending without its byte gets it back */
    if (sem_getvalue(sem, &value) == 0 && value > 0)
        (void)!write(fd, "\1", 1);
    return 0;
}

/* Close what bell_open opened (idempotent; a bell never opened has sem NULL, fd -1). */
static void bell_close(bell_t *bell) {
    if (bell->sem)
        sem_close(bell->sem);
    if (bell->fd >= 0)
        close(bell->fd);
    bell->sem = NULL;
    bell->fd = -1;
}

static void grants_free(grants_t *g) {
    for (int i = 0; i < g->n; i++)
        for (int w = 0; w < 2; w++)
            free(g->pool[i].checked[w]);
    g->n = 0;
}

/* The mappings of the pools a pump looks refs up in (grants_t's pool[i] lies in view[i]), and
 * of replaced pools in which the pump still holds a page (netback rx's posted buffers). */
typedef struct {
    Py_buffer view[MAX_POOLS];
    int n;
    Py_buffer old[MAX_POOLS];
    int n_old;
} pool_views_t;

/* Does the pump still hold a page in [lo, lo + len)? (NULL: it never holds one between runs) */
typedef int (*holds_fn)(const void *pump, const uint8_t *lo, size_t len);

static inline void pool_views_release(pool_views_t *pv) {
    for (int i = 0; i < pv->n; i++)
        PyBuffer_Release(&pv->view[i]);
    for (int i = 0; i < pv->n_old; i++)
        PyBuffer_Release(&pv->old[i]);
    pv->n = pv->n_old = 0;
}

/* Keep `view` among the old mappings if the pump holds a page in it, else let it go. */
static int pool_view_retire(pool_views_t *pv, Py_buffer *view, holds_fn holds, const void *pump) {
    if (!holds || !holds(pump, view->buf, (size_t)view->len)) {
        PyBuffer_Release(view);
        return 0;
    }
    if (pv->n_old >= MAX_POOLS) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "pages held in too many released pools");
        return -1;
    }
    pv->old[pv->n_old++] = *view;
    return 0;
}

/* pools: a sequence of (buffer, gref_base, pages, data_offset) (GrantMapper.native_pools).
 * They replace g's pools only if every one is good. A pool mapped before keeps the refs
 * already checked in it (as GrantMapper's cache does); a replaced pool's mapping is let go
 * unless the pump still holds a page in it (`holds`), and such old ones are let go as soon as
 * it holds none. */
static inline int grants_set(grants_t *g, pool_views_t *pv, PyObject *pools, holds_fn holds,
                      const void *pump) {
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
    Py_buffer views[MAX_POOLS];
    int nviews = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *buf;
        unsigned int base, pages, data_off;
        Py_buffer *view = &views[nviews];
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "OIII", &buf, &base, &pages,
                              &data_off) ||
            PyObject_GetBuffer(buf, view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
            goto fail;
        nviews++;
        if ((uint64_t)pages * 8 > data_off ||
            (uint64_t)data_off + (uint64_t)pages * PAGE_SIZE > (uint64_t)view->len) {
            PyErr_Format(PyExc_ValueError, "pool at gref %u: %u pages do not fit", base, pages);
            goto fail;
        }
        pool_t *pool = &fresh.pool[fresh.n++];
        *pool = (pool_t){view->buf, base, pages, data_off, {NULL, NULL}};
        for (int j = 0; j < g->n; j++) { /* the same pool, still mapped: its checks stand */
            pool_t *was = &g->pool[j];
            if (was->base == pool->base && was->gref_base == base && was->pages == pages &&
                was->data_off == data_off && was->checked[0]) {
                pool->checked[0] = was->checked[0], pool->checked[1] = was->checked[1];
                was->checked[0] = was->checked[1] = NULL;
                break;
            }
        }
        for (int w = 0; w < 2; w++)
            if (!pool->checked[w] && !(pool->checked[w] = calloc(pages, 5))) {
                PyErr_NoMemory();
                goto fail;
            }
    }
    Py_DECREF(seq);
    grants_free(g);
    *g = fresh;
    int kept = 0, failed = 0;
    for (int i = 0; i < pv->n_old; i++) { /* old ones the pump no longer holds pages in go */
        if (holds && holds(pump, pv->old[i].buf, (size_t)pv->old[i].len))
            pv->old[kept++] = pv->old[i];
        else
            PyBuffer_Release(&pv->old[i]);
    }
    pv->n_old = kept;
    for (int i = 0; i < pv->n; i++)
        failed |= pool_view_retire(pv, &pv->view[i], holds, pump);
    memcpy(pv->view, views, sizeof views[0] * (size_t)nviews);
    pv->n = nviews;
    return failed ? -1 : 0;
fail:
    /* a pool carried over gave its checks to `fresh`: give them back before freeing */
    for (int i = 0; i < fresh.n; i++)
        for (int j = 0; j < g->n; j++)
            if (!g->pool[j].checked[0] && g->pool[j].base == fresh.pool[i].base &&
                g->pool[j].gref_base == fresh.pool[i].gref_base) {
                g->pool[j].checked[0] = fresh.pool[i].checked[0];
                g->pool[j].checked[1] = fresh.pool[i].checked[1];
                fresh.pool[i].checked[0] = fresh.pool[i].checked[1] = NULL;
            }
    grants_free(&fresh);
    for (int i = 0; i < nviews; i++)
        PyBuffer_Release(&views[i]);
    Py_DECREF(seq);
    return -1;
}

typedef struct {
    const char *name;
    int value;
} constant_t;

/* A pump module's init: `def` with its Pump `type` and its `n` integer constants (the numbers
 * channels/pumps.py mirrors). */
static inline PyObject *pump_module(PyModuleDef *def, PyTypeObject *type,
                                    const constant_t *constants, size_t n) {
    if (PyType_Ready(type) < 0)
        return NULL;
    PyObject *m = PyModule_Create(def);
    if (!m)
        return NULL;
    Py_INCREF(type);
    if (PyModule_AddObject(m, "Pump", (PyObject *)type) < 0) {
        Py_DECREF(type);
        Py_DECREF(m);
        return NULL;
    }
    for (size_t i = 0; i < n; i++)
        if (PyModule_AddIntConstant(m, constants[i].name, constants[i].value) < 0) {
            Py_DECREF(m);
            return NULL;
        }
    return m;
}

#endif
