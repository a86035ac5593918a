/* blkif's batch pump, native: blkback's loop for one vbd (backends/blkback/datapath.py VbdPath).
 *
 * Why native: a 4 KiB request costs about 44 us of Python, and the dispatcher and the I/O
 * threads hand one GIL between them on every syscall; this loop runs with the GIL released,
 * takes a whole batch of requests, checks each on one private copy, and puts the good ones on
 * the device at once (issue 13). VbdPath stays the reference: each step here follows its
 * Python twin (named in its comment), and tests/unit/test_native_blkpump.py feeds both the
 * same rings, hostile ones included, and requires the same answers, device and counters.
 *
 * What runs here: READ and WRITE, classic (up to 11 segments) or INDIRECT (up to 256 segments
 * in one granted page), and every refusal of them (unknown operations, bad segment counts or
 * sectors, ranges past the end or wrapping a u64, writes to a read-only vbd, grant refs the
 * granter does not allow). What goes back to Python before it is consumed (PUMP_FALLBACK):
 * FLUSH_DISKCACHE and DISCARD (rare, and their device calls are Python's: fdatasync,
 * fallocate, BLKDISCARD), and a request naming a grant ref in no pool we map (the mapper
 * refreshes, and counts and budgets bad refs). Python then does that one request and runs
 * this loop again; before returning, run() lets every request it put on the device complete
 * and answers it, so Python always takes over a quiet vbd.
 *
 * I/O: Linux AIO (io_submit / io_getevents, raw syscalls), not a pool of threads. dom0 opens
 * the loop device O_DIRECT over a loop device itself in direct-I/O mode (backends/blkback/loop.py),
 * where io_submit queues the request and returns: one thread puts a whole batch on the device
 * with one syscall, and at iodepth 32 all 32 are on the device, with no thread per request, no
 * hand-off (a futex wake across the two vCPUs costs 20-100 us here) and no GIL. Completions are
 * reaped by one more thread (io_getevents), which answers each request as it completes: the
 * doorbell is a semaphore, which no single wait can watch together with the AIO context. On a
 * buffered fd (tests' image files) io_submit does the I/O before it returns: still correct,
 * only serial. A lone request on an idle vbd (iodepth 1) is done inline with preadv/pwritev by
 * the dispatcher, as VbdPath does, saving the reaper's wakeup.
 *
 * Built with HYPER_FUZZ defined, only the pure parts are compiled (no Python, no threads), for
 * the libFuzzer harness in channels/native/fuzz/blkpump_fuzz.c.
 */
#ifndef HYPER_FUZZ
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#endif

#include <linux/aio_abi.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>

#include "blkif.h"
#include "pump.h"

#define MAX_INDIRECT_SEGMENTS 256 /* what blkback advertises: one indirect page holds them */
#define MAX_OUTSTANDING 512 /* a 16-page ring's worth; VbdPath's io_threads * 4 is below */

/* The vbd's counters page: backends/blkback/datapath.py's COUNTER_FIELDS, in that order (the last,
 * bad_grefs, is the grant mapper's: Python counts it). */
enum { RD_REQ, RD_SECT, WR_REQ, WR_SECT, FLUSH_REQ, DISCARD_REQ, OO_REQ, ERRORS, N_COUNTERS };

/* What run() ends with (channels/pumps.py's numbers, as netpump.c's). */
enum { PUMP_STOPPED, PUMP_FATAL, PUMP_FALLBACK, PUMP_MISS, PUMP_BROKEN };

enum { BLKBACK };


/* A request that passed every check: what its I/O and its answer need. */
typedef struct {
    uint64_t id, offset, nbytes;
    uint8_t op;   /* echoed in the response (an INDIRECT's indirect_op) */
    uint8_t kind; /* READ or WRITE */
    int niov;
    struct iovec iov[MAX_INDIRECT_SEGMENTS];
} job_t;

typedef struct {
    ring_t ring;
    grants_t grants;
    uint64_t *counters; /* N_COUNTERS u64 */
    uint64_t scratch[N_COUNTERS + 1];
    int fd, stop_fd;
    uint64_t sectors;
    int readonly;
    bell_t mine, peer;
    volatile int stopping;
    late_eoi_t eoi;
    spin_t spin;
    /* the I/O in flight: jobs[max], a stack of free ones, the AIO context and its reaper */
    job_t *jobs;
    uint32_t max, nfree, *free_jobs;
    uint32_t inflight;
    aio_context_t aio;
    pthread_mutex_t lock; /* the ring's response side, the counters, inflight, quit */
    pthread_cond_t room;  /* inflight went down (or stop) */
    pthread_cond_t work;  /* inflight went up (or quit): the reaper has something to wait for */
    int quit;
    char why[160];
    uint32_t detail;
} blk_t;

static void say(blk_t *b, const char *what) {
    strncpy(b->why, what, sizeof b->why - 1);
    b->why[sizeof b->why - 1] = 0;
}

/* -- checks (VbdPath._prepare*, on the private copy; nothing here touches the device) ------- */

/* What blk_prepare decided about one request. */
enum { REQ_GO, REQ_REFUSE, REQ_PYTHON };

typedef struct {
    uint32_t gref;
    uint8_t first, last;
} seg_t;

/* VbdPath._check_range: sector_number + nsect within the device, and no u64 wrap. */
static int range_ok(const blk_t *b, uint64_t sector, uint64_t nsect) {
    uint64_t end;
    return !__builtin_add_overflow(sector, nsect, &end) && end <= b->sectors;
}

/* VbdPath._prepare_data for READ and WRITE: `segs` are consecutive on the device from
 * `sector`. Resolves each gref in order (writable for a READ: we write into the page). */
static int prepare_data(blk_t *b, uint8_t op, uint64_t sector, const seg_t *segs, int n,
                        job_t *job) {
    if (op != BLKIF_OP_READ && b->readonly)
        return REQ_REFUSE;
    uint64_t nsect = 0;
    for (int i = 0; i < n; i++) {
        if (!(segs[i].first <= segs[i].last && segs[i].last < SECTORS_PER_PAGE))
            return REQ_REFUSE;
        nsect += (uint64_t)(segs[i].last - segs[i].first + 1);
    }
    if (!range_ok(b, sector, nsect))
        return REQ_REFUSE;
    for (int i = 0; i < n; i++) {
        uint8_t *page;
        int g = grant_page(&b->grants, segs[i].gref, op == BLKIF_OP_READ, &page);
        if (g != G_OK)
            return g == G_MISS ? REQ_PYTHON : REQ_REFUSE;
        job->iov[i].iov_base = page + (size_t)segs[i].first * SECTOR_SIZE;
        job->iov[i].iov_len = (size_t)(segs[i].last - segs[i].first + 1) * SECTOR_SIZE;
    }
    job->kind = op;
    job->niov = n;
    job->offset = sector * SECTOR_SIZE;
    job->nbytes = nsect * SECTOR_SIZE;
    return REQ_GO;
}

static void unpack_segments(const uint8_t *from, int n, seg_t *segs) {
    for (int i = 0; i < n; i++, from += SEG_SIZE)
        segs[i] = (seg_t){get32(from), from[4], from[5]};
}

/* VbdPath._prepare_indirect: the descriptors copied out of the indirect page once. */
static int prepare_indirect(blk_t *b, const uint8_t *raw, job_t *job, int16_t *status) {
    uint8_t op = raw[1];
    uint16_t n = get16(raw + 2);
    job->op = op;
    *status = BLKIF_RSP_ERROR;
    if (op != BLKIF_OP_READ && op != BLKIF_OP_WRITE)
        return REQ_REFUSE;
    if (n < 1 || n > MAX_INDIRECT_SEGMENTS)
        return REQ_REFUSE;
    if (op == BLKIF_OP_WRITE && b->readonly) /* before mapping anything */
        return REQ_REFUSE;
    uint8_t *page;
    int g = grant_page(&b->grants, get32(raw + 28), 0, &page); /* 256 fit indirect_grefs[0] */
    if (g != G_OK)
        return g == G_MISS ? REQ_PYTHON : REQ_REFUSE;
    uint8_t copy[MAX_INDIRECT_SEGMENTS * SEG_SIZE];
    memcpy(copy, page, (size_t)n * SEG_SIZE); /* the frontend may rewrite the page meanwhile */
    seg_t segs[MAX_INDIRECT_SEGMENTS];
    unpack_segments(copy, n, segs);
    return prepare_data(b, op, get64(raw + 16), segs, n, job);
}

/* VbdPath._prepare over one request's private copy `raw`: REQ_GO (job filled), REQ_REFUSE
 * (answer job->id, job->op with *status) or REQ_PYTHON (leave it in the ring for Python). */
static int blk_prepare(blk_t *b, const uint8_t raw[BLK_SLOT], job_t *job, int16_t *status) {
    uint8_t op = raw[0];
    job->id = get64(raw + 8);
    job->op = op;
    if (op == BLKIF_OP_FLUSH_DISKCACHE || op == BLKIF_OP_DISCARD)
        return REQ_PYTHON;
    if (op == BLKIF_OP_INDIRECT)
        return prepare_indirect(b, raw, job, status);
    if (op != BLKIF_OP_READ && op != BLKIF_OP_WRITE) {
        /* WRITE_BARRIER is not offered (no feature-barrier); RESERVED_1 and unknown codes */
        *status = BLKIF_RSP_EOPNOTSUPP;
        return REQ_REFUSE;
    }
    *status = BLKIF_RSP_ERROR;
    int n = raw[1];
    if (n < 1 || n > MAX_SEGMENTS)
        return REQ_REFUSE;
    seg_t segs[MAX_SEGMENTS];
    unpack_segments(raw + 24, n, segs);
    return prepare_data(b, op, get64(raw + 16), segs, n, job);
}

/* -- answers (VbdPath._respond, _count) ----------------------------------------------------- */

/* Pack one response into a zeroed slot (the caller holds the lock). */
static void blk_respond(blk_t *b, uint64_t id, uint8_t op, int16_t status) {
    uint8_t *slot = ring_slot(&b->ring, b->ring.prod_pvt++);
    memset(slot, 0, b->ring.slot);
    memcpy(slot, &id, 8); /* x86_64: little-endian, as the wire */
    slot[8] = op;
    memcpy(slot + 10, &status, 2);
}

/* VbdPath._complete's count and answer, for a request that reached the device. */
static void blk_complete(blk_t *b, const job_t *job, int64_t done) {
    int16_t status = done == (int64_t)job->nbytes ? BLKIF_RSP_OKAY : BLKIF_RSP_ERROR;
    if (status != BLKIF_RSP_OKAY)
        b->counters[ERRORS]++;
    else if (job->kind == BLKIF_OP_READ)
        b->counters[RD_REQ]++, b->counters[RD_SECT] += job->nbytes / SECTOR_SIZE;
    else
        b->counters[WR_REQ]++, b->counters[WR_SECT] += job->nbytes / SECTOR_SIZE;
    blk_respond(b, job->id, job->op, status);
}

/* One request's I/O, here and now (VbdPath._execute): bytes moved, or -errno. */
static int64_t blk_execute(blk_t *b, const job_t *job) {
    ssize_t n;
    do
        n = job->kind == BLKIF_OP_READ ? preadv(b->fd, job->iov, job->niov, (off_t)job->offset)
                                       : pwritev(b->fd, job->iov, job->niov, (off_t)job->offset);
    while (n < 0 && errno == EINTR);
    return n < 0 ? -errno : n;
}

/* Push what was answered, ringing the frontend if it asked (the caller holds the lock; the
 * bell is rung after it is let go). */
static int blk_push(blk_t *b) { return ring_push(&b->ring, RSP_PROD, RSP_EVENT); }

typedef struct {
    uint64_t id;
    uint8_t op;
    int16_t status;
} refusal_t;

/* VbdPath._work's loop over up to `avail` published requests, with a free job for each in
 * `slots` (taken off the free stack by the caller): each request copied out once and checked;
 * the good ones' jobs are slots[0 .. *ngo - 1], the bad ones' answers go in `refused`. It
 * stops before a request for Python (PUMP_FALLBACK), leaving it unconsumed; else 0. Touches
 * the ring's consumer side and its own jobs only: no lock needed. */
static int blk_take(blk_t *b, int64_t avail, const uint32_t *slots, int *ngo, refusal_t *refused,
                    int *nrefused) {
    *ngo = *nrefused = 0;
    for (int64_t taken = 0; taken < avail; taken++) {
        uint8_t raw[BLK_SLOT];
        memcpy(raw, ring_slot(&b->ring, b->ring.cons), BLK_SLOT); /* our one private copy */
        job_t *job = &b->jobs[slots[*ngo]];
        int16_t status = BLKIF_RSP_OKAY;
        int verdict = blk_prepare(b, raw, job, &status);
        if (verdict == REQ_PYTHON)
            return PUMP_FALLBACK;
        b->ring.cons++;
        if (verdict == REQ_GO)
            (*ngo)++;
        else
            refused[(*nrefused)++] = (refusal_t){job->id, job->op, status};
    }
    return 0;
}

#ifndef HYPER_FUZZ

/* -- the reaper: completions from the AIO context, answered as they come ------------------- */

static long io_setup_(unsigned nr, aio_context_t *ctx) { return syscall(SYS_io_setup, nr, ctx); }
static long io_destroy_(aio_context_t ctx) { return syscall(SYS_io_destroy, ctx); }
static long io_submit_(aio_context_t ctx, long n, struct iocb **iocbs) {
    return syscall(SYS_io_submit, ctx, n, iocbs);
}
static long io_getevents_(aio_context_t ctx, long min, long max, struct io_event *ev) {
    return syscall(SYS_io_getevents, ctx, min, max, ev, NULL);
}

/* A job done: answered, its slot free, room for the dispatcher (the caller holds the lock). */
static void job_done(blk_t *b, uint32_t index, int64_t done) {
    blk_complete(b, &b->jobs[index], done);
    b->free_jobs[b->nfree++] = index;
    b->inflight--;
    pthread_cond_signal(&b->room);
}

static void *reaper(void *arg) {
    pthread_setname_np(pthread_self(), "blkback-aio"); /* per-thread figures name it */
    blk_t *b = arg;
    struct io_event ev[MAX_OUTSTANDING];
    pthread_mutex_lock(&b->lock);
    for (;;) {
        while (!b->inflight && !b->quit)
            pthread_cond_wait(&b->work, &b->lock);
        if (!b->inflight)
            break;
        pthread_mutex_unlock(&b->lock);
        long n = io_getevents_(b->aio, 1, b->max, ev); /* some are in flight: it returns */
        pthread_mutex_lock(&b->lock);
        for (long i = 0; i < n; i++)
            job_done(b, (uint32_t)ev[i].data, ev[i].res);
        int notify = n > 0 && blk_push(b);
        if (notify) {
            pthread_mutex_unlock(&b->lock);
            bell_ring(&b->peer);
            pthread_mutex_lock(&b->lock);
        }
    }
    pthread_mutex_unlock(&b->lock);
    return NULL;
}

/* Put `n` jobs on the device in one io_submit; a job the kernel refuses is answered ERROR,
 * as VbdPath answers an OSError (the lock is not held). */
static void blk_submit(blk_t *b, const uint32_t *index, int n) {
    struct iocb cb[MAX_OUTSTANDING], *cbs[MAX_OUTSTANDING];
    for (int i = 0; i < n; i++) {
        const job_t *job = &b->jobs[index[i]];
        cb[i] = (struct iocb){.aio_data = index[i],
                              .aio_lio_opcode = job->kind == BLKIF_OP_READ ? IOCB_CMD_PREADV
                                                                           : IOCB_CMD_PWRITEV,
                              .aio_fildes = (uint32_t)b->fd,
                              .aio_buf = (uint64_t)(uintptr_t)job->iov,
                              .aio_nbytes = (uint64_t)job->niov,
                              .aio_offset = (int64_t)job->offset};
        cbs[i] = &cb[i];
    }
    pthread_mutex_lock(&b->lock);
    b->inflight += (uint32_t)n; /* before any can complete */
    pthread_cond_signal(&b->work);
    pthread_mutex_unlock(&b->lock);
    for (int at = 0; at < n;) {
        long done = io_submit_(b->aio, n - at, cbs + at);
        if (done > 0) {
            at += (int)done;
            continue;
        }
        if (done < 0 && errno == EINTR)
            continue;
        if (done < 0 && errno == EAGAIN) { /* the context is full for a moment */
            sched_yield();
            continue;
        }
        pthread_mutex_lock(&b->lock); /* refused (EBADF, EINVAL, ...): an error answer */
        job_done(b, index[at++], -errno);
        int notify = blk_push(b);
        pthread_mutex_unlock(&b->lock);
        if (notify)
            bell_ring(&b->peer);
    }
}

/* -- the dispatcher (VbdPath._work) --------------------------------------------------------- */

/* VbdPath._wait_for_room: free I/O slots, or 0 (sleep), or -1 (broken ring). */
static int64_t wait_for_room(blk_t *b) {
    pthread_mutex_lock(&b->lock);
    if (b->inflight >= b->max) {
        int64_t waiting = back_unconsumed(&b->ring);
        if (waiting <= 0) {
            pthread_mutex_unlock(&b->lock);
            return waiting;
        }
        b->counters[OO_REQ]++;
        while (b->inflight >= b->max && !b->stopping)
            pthread_cond_wait(&b->room, &b->lock);
    }
    int64_t room = b->stopping ? 0 : b->max - b->inflight;
    pthread_mutex_unlock(&b->lock);
    return room;
}

/* Take what the ring holds (up to the free I/O slots), refuse the bad requests, put the good
 * ones on the device. Returns requests taken (>= 0), or -PUMP_* to end run(). */
static int64_t blk_work(blk_t *b) {
    int64_t room = wait_for_room(b);
    if (room < 0) {
        say(b, "impossible req_prod");
        return -PUMP_BROKEN;
    }
    if (!room)
        return 0;
    uint32_t go[MAX_OUTSTANDING]; /* free jobs, one per request we may take */
    pthread_mutex_lock(&b->lock);
    int64_t avail = back_unconsumed(&b->ring);
    if (avail > room)
        avail = room; /* room <= nfree: every job not free is in flight */
    for (int64_t i = 0; i < avail; i++)
        go[i] = b->free_jobs[--b->nfree];
    pthread_mutex_unlock(&b->lock);
    if (avail < 0) {
        say(b, "impossible req_prod");
        return -PUMP_BROKEN;
    }
    refusal_t refused[MAX_OUTSTANDING];
    int ngo, nrefused;
    uint32_t start = b->ring.cons;
    int end = blk_take(b, avail, go, &ngo, refused, &nrefused);
    ring_took_since(&b->ring, start);
    pthread_mutex_lock(&b->lock);
    for (int i = 0; i < nrefused; i++)
        blk_respond(b, refused[i].id, refused[i].op, refused[i].status);
    b->counters[ERRORS] += (uint64_t)nrefused;
    for (int64_t i = avail - 1; i >= ngo; i--) /* the jobs not used go back */
        b->free_jobs[b->nfree++] = go[i];
    /* One request alone on an idle vbd (a program waiting on each I/O) is done here: the
       reaper would add a wakeup to its latency (VbdPath._hand_on's inline). */
    int inline_ = ngo == 1 && b->inflight == 0;
    int notify = nrefused && blk_push(b);
    pthread_mutex_unlock(&b->lock);
    if (notify)
        bell_ring(&b->peer);
    if (inline_) {
        int64_t done = blk_execute(b, &b->jobs[go[0]]);
        pthread_mutex_lock(&b->lock);
        blk_complete(b, &b->jobs[go[0]], done);
        b->free_jobs[b->nfree++] = go[0];
        notify = blk_push(b);
        pthread_mutex_unlock(&b->lock);
        if (notify)
            bell_ring(&b->peer);
    } else if (ngo) {
        blk_submit(b, go, ngo);
    }
    return end ? -end : ngo + nrefused;
}

/* -- the loop ------------------------------------------------------------------------------- */

static int has_requests(void *arg) {
    blk_t *b = arg;
    return load32(&b->ring.sring[REQ_PROD]) != b->ring.cons;
}

static int64_t final_check(blk_t *b) {
    pthread_mutex_lock(&b->lock);
    int64_t more = ring_final_check(&b->ring, REQ_EVENT, back_unconsumed);
    pthread_mutex_unlock(&b->lock);
    return more;
}

/* Every request put on the device completed and answered; the reaper gone. */
static void drain(blk_t *b, pthread_t thread) {
    pthread_mutex_lock(&b->lock);
    while (b->inflight)
        pthread_cond_wait(&b->room, &b->lock);
    b->quit = 1;
    pthread_cond_signal(&b->work);
    pthread_mutex_unlock(&b->lock);
    pthread_join(thread, NULL);
}

/* LateEoi.serve over blk_work, with the reaper beside it for as long as it runs. */
static int run_blkback(blk_t *b) {
    pthread_t thread;
    b->quit = 0;
    if (pthread_create(&thread, NULL, reaper, b) != 0) {
        say(b, "cannot start the reaper thread");
        return PUMP_FATAL;
    }
    int rung = 0, worked = 0, code = PUMP_STOPPED;
    while (!b->stopping) {
        int64_t done = blk_work(b);
        if (done < 0) {
            code = (int)-done;
            break;
        }
        if (done > 0) {
            b->eoi.run = 0;
            rung = 0;
            worked = 1;
            continue;
        }
        if (rung)
            pause_unless(b->stop_fd, late_eoi_idle(&b->eoi));
        int64_t more = final_check(b);
        if (more < 0) {
            say(b, "impossible req_prod");
            code = PUMP_BROKEN;
            break;
        }
        rung = !more && !b->stopping &&
               spin_then_wait(&b->spin, worked, &b->stopping, has_requests, b, &b->mine,
                              b->stop_fd);
        ring_count(&b->ring, RF_WAKEUPS, (uint64_t)rung);
        worked = 0;
    }
    drain(b, thread);
    return code;
}

#include "blkpump_py.h"
#endif
