/* blkfront's batch pump, native: /dev/fuse to the blkif ring and back (domu/blkfront).
 *
 * Why native: the Python server (domu/blkfront/server.py over datapath.py's DiskPath) costs
 * 20 us of Python for a 4 KiB read and 40 us for a write, on two threads that hand one GIL back
 * and forth, and each of its doorbell posts holds the GIL through a futex wake across the two
 * vCPUs (20 us here). This pump takes the common requests, READ and WRITE of whole sectors,
 * from /dev/fuse onto the ring and answers them from the responses, with the GIL released: the
 * reader (`reader`) on the session's thread, the reaper (`reap_loop`) on the reaper's, which
 * after work keeps looking at the ring for a short adaptive window before it sleeps
 * (pump.h), so a busy disk is answered without a wakeup per response.
 *
 * The Python server stays the reference: each step here follows its Python twin (named in its
 * comment), and tests/unit/test_native_fusepump.py serves the same FUSE requests with both,
 * against the same backend (honest and hostile), and requires the same replies and the same
 * disk. What the reader leaves to Python (it returns the message): everything before INIT is
 * done, every other opcode (INIT, GETATTR, FSYNC, FALLOCATE, ...), a READ or WRITE that is not
 * of whole sectors (a read-modify-write), and any message that is not a well-formed READ or
 * WRITE (Python's fuse_wire.parse answers it). Python does its part with `io` (one blocking
 * transfer over this pump's ring and pages) and `quiesce`; the pump owns the ring, its ids and
 * the data pages, so nothing is shared with a Python DiskPath.
 *
 * The backend is not trusted (xen-split-driver.md §1.8): a response is copied out of its slot
 * once and checked on the copy (an id in flight, the operation it was posted with, a known
 * status); an impossible rsp_prod or a bad response breaks the disk: every request in flight
 * or to come is answered EIO, and the reaper returns the reason for Python to report.
 *
 * Built with HYPER_FUZZ defined, only the pure parts are compiled (no Python), for the
 * libFuzzer harness in channels/native/fuzz/fusepump_fuzz.c.
 */
#ifndef HYPER_FUZZ
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#endif

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/eventfd.h>

#include "blkif.h"
#include "pump.h"

/* -- FUSE (linux/fuse.h; domu/blkfront/fuse_wire.py) -------------------------------------- */

#define IN_HEADER 40u
#define OUT_HEADER 16u
#define RW_IN 40u /* fuse_read_in and fuse_write_in: fh, offset, size, flags, lock_owner, ... */
#define HEAD_ROOM (IN_HEADER + RW_IN)
#define FUSE_READ 15
#define FUSE_WRITE 16
#define MAX_PAGES 256u /* fuse_wire.MAX_PAGES: the most one READ or WRITE carries */
#define O_DSYNC_FLAG 010000u /* os.O_DSYNC on Linux */

/* What reader() and reap_loop() end with (domu/blkfront/native.py's numbers). */
enum { R_STOPPED, R_PYTHON, R_ENDED, R_BROKEN, R_ERROR };


/* One transfer: a FUSE READ or WRITE being answered, or one `io` call of Python's. */
enum { X_READ = 1, X_WRITE, X_IO };

typedef struct {
    int kind;
    uint64_t unique;  /* the FUSE request to answer */
    uint32_t size;    /* READ: bytes to answer; WRITE: what write_out reports */
    int left;         /* parts not answered yet */
    int16_t status;   /* the first that is not OKAY (_gather) */
    int dsync;        /* a WRITE with O_DSYNC: flushed before it is answered */
    uint32_t npages;
    uint16_t *pages;  /* MAX_PAGES of them: the data pages it holds until answered */
} xfer_t;

/* One request on the ring (DiskPath's _InFlight): as posted (replayed after a reset). */
typedef struct {
    int used;
    uint32_t xfer;
    uint8_t op, inner; /* the operations its response may name (inner: an INDIRECT's) */
    uint64_t seq;      /* post order */
    uint8_t slot[BLK_SLOT];
} part_t;

typedef struct {
    ring_t ring;
    uint8_t *data;         /* the data pool's pages, contiguous; page i is gref data_gref + i */
    uint32_t npages, data_gref;
    uint8_t *indirect;     /* one indirect page per request id, or NULL */
    uint32_t indirect_gref;
    uint64_t size;         /* bytes */
    uint32_t max_segments; /* per request: 11, or what the backend takes through indirect */
    int readonly;
    int fuse_fd, stop_fd;
    bell_t mine, peer;
    volatile int stopping;
    int initialized;      /* Python answered INIT: READ and WRITE are ours from now on */
    uint32_t max_read;
    pthread_mutex_t lock; /* everything below, and the ring's producer and consumer */
    pthread_cond_t room;  /* ids, transfers or pages were freed, an io was answered */
    part_t *parts;        /* by request id */
    uint32_t *free_ids, nfree_ids, in_flight;
    xfer_t *xfers;
    uint32_t *free_xfers, nfree_xfers;
    uint16_t *free_pages;
    uint32_t nfree_pages;
    uint16_t landing[MAX_PAGES]; /* where the next request's data lands (server.py Landing) */
    uint32_t nlanding;
    uint8_t head[HEAD_ROOM];
    struct iovec iov[1 + MAX_PAGES];
    uint64_t seq;
    int broken;
    char why[160];
    late_eoi_t eoi;
    spin_t spin;
} front_t;

static uint8_t *page_at(front_t *f, uint16_t page) { return f->data + (size_t)page * PAGE_SIZE; }

/* -- answers (server.py's _send, _error, _answer) ------------------------------------------ */

static int status_errno(int16_t status) {
    return status == BLKIF_RSP_EOPNOTSUPP ? EOPNOTSUPP : EIO;
}

/* One reply in one writev: the out_header (written into iov[0]), then iov[1..n], `bytes` in
 * all. ENOENT (the kernel no longer waits: interrupted), ENODEV (unmounted) and EBADF are
 * nobody's business; Python logs others, here there is no one to tell: the program sees its
 * request fail. */
static void send_reply(front_t *f, uint64_t unique, int error, struct iovec *iov, int n,
                       uint32_t bytes) {
    uint8_t out[OUT_HEADER];
    put32(out, OUT_HEADER + bytes);
    put32(out + 4, (uint32_t)-error);
    put64(out + 8, unique);
    iov[0] = (struct iovec){out, OUT_HEADER};
    while (writev(f->fuse_fd, iov, 1 + n) < 0 && errno == EINTR)
        ;
}

static void send_error(front_t *f, uint64_t unique, int code) {
    struct iovec iov[1];
    send_reply(f, unique, code, iov, 0, 0);
}

/* fuse_wire.write_out(size) */
static void send_written(front_t *f, uint64_t unique, uint32_t size) {
    uint8_t out[8] = {0};
    put32(out, size);
    struct iovec iov[2] = {{0}, {out, sizeof out}};
    send_reply(f, unique, 0, iov, 1, sizeof out);
}

/* A finished READ or WRITE: its answer (server.py's `answered` closures). */
static void answer(front_t *f, xfer_t *x) {
    if (x->status != BLKIF_RSP_OKAY) {
        send_error(f, x->unique, status_errno(x->status));
    } else if (x->kind == X_WRITE) {
        send_written(f, x->unique, x->size);
    } else {
        struct iovec iov[1 + MAX_PAGES];
        uint32_t left = x->size, n = 0;
        for (; left; n++) {
            uint32_t chunk = left < PAGE_SIZE ? left : PAGE_SIZE;
            iov[1 + n] = (struct iovec){page_at(f, x->pages[n]), chunk};
            left -= chunk;
        }
        send_reply(f, x->unique, 0, iov, (int)n, x->size);
    }
}

/* -- transfers, ids and pages (lock held) -------------------------------------------------- */

static void pages_give(front_t *f, const uint16_t *pages, uint32_t n) {
    for (uint32_t i = 0; i < n; i++)
        f->free_pages[f->nfree_pages++] = pages[i];
}

static void xfer_free(front_t *f, uint32_t index) {
    xfer_t *x = &f->xfers[index];
    pages_give(f, x->pages, x->npages);
    x->npages = 0;
    f->free_xfers[f->nfree_xfers++] = index;
}

static uint32_t pages_of(uint64_t bytes) { return (uint32_t)((bytes + PAGE_SIZE - 1) / PAGE_SIZE); }

/* Requests a transfer of `nbytes` becomes: at most max_segments pages each (_post); a FLUSH or
 * DISCARD (0) is one. */
static uint32_t parts_of(const front_t *f, uint32_t nbytes) {
    uint32_t npages = pages_of(nbytes);
    return npages ? (npages + f->max_segments - 1) / f->max_segments : 1;
}

/* A free request id (begin made sure there is one for each part). */
static uint32_t take_id(front_t *f) { return f->free_ids[--f->nfree_ids]; }

/* Put request `id` (built in `p->slot`) on the ring for transfer `xi`. */
static void post_part(front_t *f, uint32_t id, uint32_t xi, uint8_t op, uint8_t inner) {
    part_t *p = &f->parts[id];
    p->used = 1;
    p->xfer = xi;
    p->op = op;
    p->inner = inner;
    p->seq = f->seq++;
    put64(p->slot + 8, id);
    memcpy(ring_slot(&f->ring, f->ring.prod_pvt), p->slot, BLK_SLOT);
    f->ring.prod_pvt++;
    f->in_flight++;
}

/* The requests of a READ or WRITE of `nbytes` at `offset` over the transfer's first pages
 * (_post and _post_rw): each a whole page but the last; up to 11 segments in the request
 * itself, else in the request id's indirect page. */
static void post_rw(front_t *f, uint32_t xi, uint8_t op, uint64_t offset, uint32_t nbytes) {
    const uint16_t *pages = f->xfers[xi].pages;
    uint32_t step = f->max_segments, npages = pages_of(nbytes);
    for (uint32_t first = 0; first < npages; first += step) {
        uint32_t count = npages - first < step ? npages - first : step;
        uint32_t id = take_id(f);
        uint8_t *slot = f->parts[id].slot;
        memset(slot, 0, BLK_SLOT);
        uint8_t *segs = count <= MAX_SEGMENTS ? slot + 24 : f->indirect + (size_t)id * PAGE_SIZE;
        for (uint32_t i = 0; i < count; i++) {
            uint8_t *seg = segs + i * SEG_SIZE; /* gref, first_sect, last_sect, pad */
            put32(seg, f->data_gref + pages[first + i]);
            put32(seg + 4, (SECTORS_PER_PAGE - 1) << 8);
        }
        uint32_t bytes = nbytes - first * PAGE_SIZE; /* of this request's last page: its sectors */
        segs[(count - 1) * SEG_SIZE + 5] = (uint8_t)((bytes / SECTOR_SIZE - 1) % SECTORS_PER_PAGE);
        put64(slot + 16, (offset + (uint64_t)first * PAGE_SIZE) / SECTOR_SIZE);
        if (count <= MAX_SEGMENTS) {
            slot[0] = op;
            slot[1] = (uint8_t)count;
            post_part(f, id, xi, op, op);
        } else {
            slot[0] = BLKIF_OP_INDIRECT;
            slot[1] = op;
            put16(slot + 2, (uint16_t)count);
            put32(slot + 28, f->indirect_gref + id);
            post_part(f, id, xi, BLKIF_OP_INDIRECT, op);
        }
    }
}

/* A FLUSH_DISKCACHE (post_flush) or a DISCARD of `count` sectors from `sector` (post_discard). */
static void post_other(front_t *f, uint32_t xi, uint8_t op, uint64_t sector, uint64_t count) {
    uint32_t id = take_id(f);
    uint8_t *slot = f->parts[id].slot;
    memset(slot, 0, BLK_SLOT);
    slot[0] = op;
    if (op == BLKIF_OP_DISCARD) {
        put64(slot + 16, sector);
        put64(slot + 24, count);
    }
    post_part(f, id, xi, op, op);
}

/* Publish what was posted; 1 if the backend asked to be told. */
static int push(front_t *f) { return ring_push(&f->ring, REQ_PROD, REQ_EVENT); }

/* Publish, let go of the lock, and tell the backend if it asked. */
static void publish(front_t *f) {
    int notify = push(f);
    pthread_mutex_unlock(&f->lock);
    if (notify)
        bell_ring(&f->peer);
}

/* Take the lock and wait until a transfer, an id for each of its requests (they cover
 * `nbytes`: parts_of) and `npages` pages of the pool are free: the transfer's index, its pages
 * taken, the lock held. -1, the lock let go, if the disk is broken (a broken disk answers at
 * once: DiskPath._submit). */
static int64_t begin(front_t *f, int kind, uint64_t unique, uint32_t size, uint32_t nbytes,
                     uint32_t npages) {
    uint32_t parts = parts_of(f, nbytes);
    pthread_mutex_lock(&f->lock);
    while (!f->broken && (!f->nfree_xfers || f->nfree_ids < parts || f->nfree_pages < npages))
        pthread_cond_wait(&f->room, &f->lock);
    if (f->broken) {
        pthread_mutex_unlock(&f->lock);
        return -1;
    }
    uint32_t xi = f->free_xfers[--f->nfree_xfers];
    xfer_t *x = &f->xfers[xi];
    *x = (xfer_t){kind, unique, size, (int)parts, BLKIF_RSP_OKAY, 0, npages, x->pages};
    for (uint32_t i = 0; i < npages; i++)
        x->pages[i] = f->free_pages[--f->nfree_pages];
    return xi;
}

/* Every transfer in flight is answered BLKIF_RSP_ERROR (DiskPath._fail_all); the disk stays
 * broken with the first reason. FUSE transfers go on `done` for their answer; an io's caller
 * is waiting for its `left` to reach 0. */
static uint32_t fail_all(front_t *f, const char *why, uint32_t *done) {
    uint32_t n = 0;
    if (!f->broken) {
        f->broken = 1;
        snprintf(f->why, sizeof f->why, "%s", why);
    }
    for (uint32_t id = 0; id < f->ring.nr; id++) {
        part_t *p = &f->parts[id];
        if (!p->used)
            continue;
        p->used = 0;
        f->in_flight--;
        xfer_t *x = &f->xfers[p->xfer];
        if (x->left <= 0)
            continue;
        x->left = 0;
        x->status = BLKIF_RSP_ERROR;
        if (x->kind != X_IO) /* an io's caller sees left at 0 */
            done[n++] = p->xfer;
    }
    pthread_cond_broadcast(&f->room);
    return n;
}

/* -- the reaper (DiskPath._reap and _take_responses) --------------------------------------- */

/* Take every response on the ring, checking each on its copy. Finished FUSE transfers go on
 * `done` (answered by the caller, without the lock); a WRITE with O_DSYNC that is done gets
 * its flush posted instead. Returns the responses taken, or -1 if the backend broke the disk
 * (every transfer failed and on `done`). `*notify`: the backend asked to be told of a post. */
static int64_t take_responses(front_t *f, uint32_t *done, uint32_t *ndone, int *notify) {
    int64_t avail = front_unconsumed(&f->ring);
    char why[160];
    if (avail < 0) {
        snprintf(why, sizeof why, "impossible rsp_prod (rsp_cons %u, %u requests outstanding)",
                 f->ring.cons, f->ring.pushed - f->ring.cons);
        *ndone += fail_all(f, why, done + *ndone);
        return -1;
    }
    for (int64_t i = 0; i < avail; i++) {
        uint8_t rsp[BLK_RSP];
        memcpy(rsp, ring_slot(&f->ring, f->ring.cons), BLK_RSP); /* one copy */
        f->ring.cons++;
        uint64_t id = get64(rsp);
        uint8_t op = rsp[8];
        int16_t status = (int16_t)get16(rsp + 10);
        part_t *p = id < f->ring.nr ? &f->parts[id] : NULL;
        if (!p || !p->used)
            snprintf(why, sizeof why, "response for id %llu, which is not in flight",
                     (unsigned long long)id);
        else if (op != p->op && op != p->inner)
            snprintf(why, sizeof why, "response for id %llu names operation %u",
                     (unsigned long long)id, op);
        else if (status != BLKIF_RSP_OKAY && status != BLKIF_RSP_ERROR &&
                 status != BLKIF_RSP_EOPNOTSUPP)
            snprintf(why, sizeof why, "response for id %llu has unknown status %d",
                     (unsigned long long)id, status);
        else
            why[0] = 0;
        if (why[0]) {
            *ndone += fail_all(f, why, done + *ndone);
            return -1;
        }
        p->used = 0;
        f->in_flight--;
        f->free_ids[f->nfree_ids++] = (uint32_t)id;
        xfer_t *x = &f->xfers[p->xfer];
        if (x->status == BLKIF_RSP_OKAY)
            x->status = status;
        if (--x->left > 0 || x->kind == X_IO) /* an io's caller sees left at 0 */
            continue;
        if (x->kind == X_WRITE && x->dsync && x->status == BLKIF_RSP_OKAY) {
            x->dsync = 0; /* written: now the flush, then the answer (server.py's _flushed) */
            x->left = 1;
            post_other(f, p->xfer, BLKIF_OP_FLUSH_DISKCACHE, 0, 0);
            *notify |= push(f);
        } else {
            done[(*ndone)++] = p->xfer;
        }
    }
    if (avail)
        pthread_cond_broadcast(&f->room);
    return avail;
}

/* Answer the finished FUSE transfers, then free them (and their pages). */
static void finish(front_t *f, const uint32_t *done, uint32_t n) {
    for (uint32_t i = 0; i < n; i++)
        answer(f, &f->xfers[done[i]]);
    if (!n)
        return;
    pthread_mutex_lock(&f->lock);
    for (uint32_t i = 0; i < n; i++)
        xfer_free(f, done[i]);
    pthread_cond_broadcast(&f->room);
    pthread_mutex_unlock(&f->lock);
}

/* One round of the reaper: 1 if it took responses, 0 if none, -1 if the disk broke. */
static int reap_once(front_t *f) {
    uint32_t done[1024];
    uint32_t n = 0;
    int notify = 0;
    pthread_mutex_lock(&f->lock);
    int64_t taken = take_responses(f, done, &n, &notify);
    pthread_mutex_unlock(&f->lock);
    if (notify)
        bell_ring(&f->peer);
    finish(f, done, n);
    return taken < 0 ? -1 : taken > 0;
}

static int has_responses(void *arg) {
    front_t *f = arg;
    return load32(&f->ring.sring[RSP_PROD]) != f->ring.cons;
}

/* RING_FINAL_CHECK_FOR_RESPONSES under the lock: 1 if there is work. */
static int final_check(front_t *f) {
    pthread_mutex_lock(&f->lock);
    int64_t more = f->broken ? 0 : ring_final_check(&f->ring, RSP_EVENT, front_unconsumed);
    pthread_mutex_unlock(&f->lock);
    return more != 0; /* an impossible index: the next round breaks the disk */
}

/* DiskPath._serve: LateEoi.serve over the responses, until stopped or broken. */
static int reap_loop(front_t *f) {
    int rung = 0, worked = 0;
    while (!f->stopping) {
        int r = reap_once(f);
        if (r < 0)
            return R_BROKEN;
        if (r > 0) {
            f->eoi.run = 0;
            rung = 0;
            worked = 1;
            continue;
        }
        if (f->stopping)
            break;
        if (f->broken)
            return R_BROKEN; /* broken by reset() */
        if (rung)
            pause_unless(f->stop_fd, late_eoi_idle(&f->eoi));
        if (final_check(f)) {
            rung = 0;
            continue;
        }
        rung = !f->stopping && spin_then_wait(&f->spin, worked, &f->stopping, has_responses, f,
                                               &f->mine, f->stop_fd);
        worked = 0;
    }
    return R_STOPPED;
}

/* -- the reader (server.py's FuseSession._serve_one, _read and _write) ---------------------- */

/* Back to MAX_PAGES landing pages, waiting for the pool (Landing.fill). 0 if the disk broke
 * while waiting and no page is free (the reader then lands in what it has). */
static void landing_fill(front_t *f) {
    pthread_mutex_lock(&f->lock);
    while (f->nlanding < MAX_PAGES) {
        while (!f->nfree_pages && !f->stopping)
            pthread_cond_wait(&f->room, &f->lock);
        if (!f->nfree_pages)
            break;
        f->landing[f->nlanding++] = f->free_pages[--f->nfree_pages];
    }
    pthread_mutex_unlock(&f->lock);
}

/* A READ of whole sectors (FuseSession._read). */
static void fast_read(front_t *f, uint64_t unique, uint64_t offset, uint32_t size) {
    int64_t xi = begin(f, X_READ, unique, size, size, pages_of(size));
    if (xi < 0) {
        send_error(f, unique, EIO);
        return;
    }
    post_rw(f, (uint32_t)xi, BLKIF_OP_READ, offset, size);
    publish(f);
}

/* A WRITE of whole sectors (FuseSession._write): its data landed in the first pages of the
 * landing, which go to the ring as they are. A write cut at the end of the disk (`size` below
 * `landed`) puts fewer of them on the ring; all come back together when it is answered. */
static void fast_write(front_t *f, uint64_t unique, uint64_t offset, uint32_t size,
                       uint32_t landed, int dsync) {
    int64_t xi = begin(f, X_WRITE, unique, size, size, 0);
    if (xi < 0) {
        send_error(f, unique, EIO);
        return;
    }
    xfer_t *x = &f->xfers[xi];
    x->dsync = dsync;
    x->npages = pages_of(landed); /* Landing.take */
    memcpy(x->pages, f->landing, x->npages * sizeof f->landing[0]);
    f->nlanding -= x->npages;
    memmove(f->landing, f->landing + x->npages, f->nlanding * sizeof f->landing[0]);
    post_rw(f, (uint32_t)xi, BLKIF_OP_WRITE, offset, size);
    publish(f);
}

/* The message just read, `length` bytes: 1 if done here, 0 if it is Python's. */
static int serve_message(front_t *f, uint32_t length) {
    const uint8_t *h = f->head;
    if (!f->initialized || length < HEAD_ROOM)
        return 0;
    uint32_t opcode = get32(h + 4);
    if (get32(h) != length || (opcode != FUSE_READ && opcode != FUSE_WRITE))
        return 0;
    int64_t body = (int64_t)length - IN_HEADER - (int64_t)get16(h + 36) * 8;
    uint64_t unique = get64(h + 8), offset = get64(h + 48);
    uint32_t size = get32(h + 56), flags = get32(h + 72);
    if (body < RW_IN)
        return 0;
    if (opcode == FUSE_READ) {
        if (size > f->max_read)
            return 0;
        uint64_t sz = offset >= f->size ? 0 : f->size - offset < size ? f->size - offset : size;
        if (!sz) {
            send_error(f, unique, 0); /* an empty reply */
            return 1;
        }
        if (offset % SECTOR_SIZE || sz % SECTOR_SIZE)
            return 0;
        fast_read(f, unique, offset, (uint32_t)sz);
        return 1;
    }
    if ((int64_t)size != body - RW_IN || size > MAX_PAGES * PAGE_SIZE)
        return 0;
    if (f->readonly) {
        send_error(f, unique, EROFS);
        return 1;
    }
    if (offset >= f->size) {
        send_error(f, unique, ENOSPC);
        return 1;
    }
    uint64_t sz = f->size - offset < size ? f->size - offset : size;
    if (!sz) {
        send_written(f, unique, 0);
        return 1;
    }
    if (offset % SECTOR_SIZE || sz % SECTOR_SIZE)
        return 0;
    fast_write(f, unique, offset, (uint32_t)sz, size, (flags & O_DSYNC_FLAG) != 0);
    return 1;
}

/* Read and serve requests until one is Python's (R_PYTHON, its length in *length: the header
 * room then the landing pages hold it), the file system is gone (R_ENDED) or reading fails
 * (R_ERROR, errno in *length). */
static int reader(front_t *f, uint32_t *length) {
    for (;;) {
        landing_fill(f);
        if (f->stopping)
            return R_ENDED;
        f->iov[0] = (struct iovec){f->head, HEAD_ROOM};
        for (uint32_t i = 0; i < f->nlanding; i++)
            f->iov[1 + i] = (struct iovec){page_at(f, f->landing[i]), PAGE_SIZE};
        ssize_t n = readv(f->fuse_fd, f->iov, 1 + (int)f->nlanding);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == ENOENT)
                continue; /* ENOENT: interrupted before it was read */
            if (errno == ENODEV)
                return R_ENDED;
            *length = (uint32_t)errno;
            return R_ERROR;
        }
        if (n == 0)
            return R_ENDED;
        if (!serve_message(f, (uint32_t)n)) {
            *length = (uint32_t)n;
            return R_PYTHON;
        }
    }
}

/* -- Python's transfers (NativeDisk's blocking calls) --------------------------------------- */

/* One READ, WRITE (of whole sectors, at most MAX_PAGES pages), FLUSH or DISCARD, waited for.
 * `buf` holds a WRITE's data and receives a READ's. Returns the status. */
static int16_t io(front_t *f, uint8_t op, uint64_t offset, uint64_t nbytes, uint8_t *buf) {
    int rw = op == BLKIF_OP_READ || op == BLKIF_OP_WRITE;
    uint32_t npages = rw ? pages_of(nbytes) : 0;
    int64_t xi = begin(f, X_IO, 0, 0, rw ? (uint32_t)nbytes : 0, npages);
    if (xi < 0)
        return BLKIF_RSP_ERROR;
    xfer_t *x = &f->xfers[xi];
    if (op == BLKIF_OP_WRITE)
        for (uint32_t i = 0, at = 0; i < npages; i++, at += PAGE_SIZE)
            memcpy(page_at(f, x->pages[i]), buf + at,
                   nbytes - at < PAGE_SIZE ? nbytes - at : PAGE_SIZE);
    if (rw)
        post_rw(f, (uint32_t)xi, op, offset, (uint32_t)nbytes);
    else
        post_other(f, (uint32_t)xi, op, offset / SECTOR_SIZE, nbytes / SECTOR_SIZE);
    publish(f);
    pthread_mutex_lock(&f->lock);
    while (x->left) /* answered, or failed with the disk */
        pthread_cond_wait(&f->room, &f->lock);
    int16_t status = x->status;
    if (op == BLKIF_OP_READ && status == BLKIF_RSP_OKAY)
        for (uint32_t i = 0, at = 0; i < npages; i++, at += PAGE_SIZE)
            memcpy(buf + at, page_at(f, x->pages[i]),
                   nbytes - at < PAGE_SIZE ? nbytes - at : PAGE_SIZE);
    xfer_free(f, (uint32_t)xi);
    pthread_cond_broadcast(&f->room);
    pthread_mutex_unlock(&f->lock);
    return status;
}

/* Until nothing is on the ring (or the disk is broken): a read-modify-write then has its
 * sectors to itself, as SectorGate gives it (only the reader, which waits here, posts). */
static void quiesce(front_t *f) {
    pthread_mutex_lock(&f->lock);
    while (f->in_flight && !f->broken)
        pthread_cond_wait(&f->room, &f->lock);
    pthread_mutex_unlock(&f->lock);
}

static int by_seq(const void *a, const void *b, void *parts) {
    uint64_t x = ((part_t *)parts)[*(const uint32_t *)a].seq;
    uint64_t y = ((part_t *)parts)[*(const uint32_t *)b].seq;
    return (x > y) - (x < y);
}

/* The backend restarted (DiskPath.reset): take what it answered, start the ring over and post
 * every request still in flight again, in the order first posted. Returns how many, or -1 if
 * the disk is (or just became) broken. */
static int64_t reset(front_t *f) {
    uint32_t done[1024];
    uint32_t n = 0;
    int notify = 0;
    int64_t replayed = -1;
    pthread_mutex_lock(&f->lock);
    if (!f->broken && take_responses(f, done, &n, &notify) >= 0) {
        ring_t *r = &f->ring;
        memset((void *)r->sring, 0, RING_HEADER + (size_t)r->nr * r->slot);
        r->sring[REQ_EVENT] = r->sring[RSP_EVENT] = 1;
        r->cons = r->prod_pvt = r->pushed = 0;
        uint32_t order[1024];
        replayed = 0;
        for (uint32_t id = 0; id < r->nr; id++)
            if (f->parts[id].used)
                order[replayed++] = id;
        qsort_r(order, (size_t)replayed, sizeof order[0], by_seq, f->parts);
        for (int64_t i = 0; i < replayed; i++)
            memcpy(ring_slot(r, r->prod_pvt++), f->parts[order[i]].slot, BLK_SLOT);
        push(f); /* nobody to notify: the new backend looks when it starts */
    }
    pthread_mutex_unlock(&f->lock);
    finish(f, done, n);
    bell_ring(&f->mine); /* the reaper looks at the new ring (or sees the disk broken) */
    return replayed;
}

/* The disk is going away (DiskPath.stop): everything in flight, or to come, fails. */
static void stop(front_t *f) {
    uint32_t done[1024];
    f->stopping = 1;
    pthread_mutex_lock(&f->lock);
    uint32_t n = fail_all(f, "the disk was disconnected", done);
    pthread_mutex_unlock(&f->lock);
    finish(f, done, n);
    uint64_t one = 1;
    if (write(f->stop_fd, &one, sizeof one) < 0) { /* a full eventfd is already set */
    }
}

#ifndef HYPER_FUZZ
#include "fusepump_py.h"
#endif
