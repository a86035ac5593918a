/* What every native pump shares: Xen's shared ring header, grant lookups, doorbells, waiting.
 *
 * The Python modules are the reference (channels/ring.py, channels/gnttab.py,
 * channels/doorbell.py, channels/evtchn.py's LateEoi); each function here says which Python
 * code it mirrors, and tests/unit/test_native_pumps.py feeds both the same rings.
 *
 * Everything the peer can write (ring indices, slots, grant entries) is read once into a local
 * and checked there: a peer that rewrites shared memory meanwhile changes nothing we decided.
 * The functions run with the GIL released: they touch no Python object.
 */
#ifndef HYPER_PUMP_H
#define HYPER_PUMP_H

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <semaphore.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define PAGE_SIZE 4096u
#define RING_HEADER 64u
#define HEAL_NS (10ull * 1000000000ull) /* a sleep re-checks its ring this often anyway */

/* -- little-endian fields of a slot or a message (the rings' byte order: channels/ring.py) -- */

static inline uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static inline uint32_t get32(const uint8_t *p) { return get16(p) | (uint32_t)get16(p + 2) << 16; }
static inline uint64_t get64(const uint8_t *p) { return get32(p) | (uint64_t)get32(p + 4) << 32; }
static inline void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v, p[1] = (uint8_t)(v >> 8); }
static inline void put32(uint8_t *p, uint32_t v) { put16(p, (uint16_t)v), put16(p + 2, v >> 16); }
static inline void put64(uint8_t *p, uint64_t v) { put32(p, (uint32_t)v), put32(p + 4, v >> 32); }

/* -- memory ordering (channels/ring.py's mb) ---------------------------------------------- */

static inline void mb(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

static inline uint32_t load32(const volatile uint32_t *p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

static inline void store32(volatile uint32_t *p, uint32_t v) {
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* -- the shared ring (io/ring.h; channels/ring.py's FrontRing and BackRing) ----------------- */

enum { REQ_PROD, REQ_EVENT, RSP_PROD, RSP_EVENT };

/* A backend ring's figures (channels/ring.py's RING_FIGURES, in that order): requests taken,
 * responses pushed, pushes that rang the peer and pushes its event index let pass, rung
 * wakeups, those that found no work, and the late-EOI waits that followed them. */
enum { RF_REQUESTS, RF_RESPONSES, RF_NOTIFY_SENT, RF_NOTIFY_SUPPRESSED, RF_WAKEUPS,
       RF_SPURIOUS, RF_BACKOFFS, RF_N };

typedef struct {
    volatile uint32_t *sring; /* the header's four indices */
    uint8_t *slots;
    uint32_t nr, mask, slot; /* RING_SIZE, RING_SIZE - 1, bytes per slot */
    /* back end: req_cons, rsp_prod_pvt, rsp_pushed; front end: req_prod_pvt, rsp_cons,
       req_pushed. The same three words, named by the end that uses them. */
    uint32_t cons, prod_pvt, pushed;
    int broken;
    uint64_t *fig; /* RF_N u64, a backend's page dom0 reads (NULL: not counted) */
} ring_t;

static inline void ring_count(ring_t *r, int figure, uint64_t n) {
    if (r->fig)
        r->fig[figure] += n;
}

/* A back end's batch took the requests from `start` to its req_cons: counted once a batch. */
static inline void ring_took_since(ring_t *r, uint32_t start) {
    ring_count(r, RF_REQUESTS, r->cons - start);
}

static inline uint8_t *ring_slot(const ring_t *r, uint32_t idx) {
    return r->slots + (size_t)(idx & r->mask) * r->slot;
}

/* BackRing._snapshot: requests we may consume, or -1 (broken) for an impossible req_prod. */
static inline int64_t back_unconsumed(ring_t *r) {
    uint32_t req_prod = load32(&r->sring[REQ_PROD]);
    if ((uint32_t)(req_prod - r->prod_pvt) > r->nr) { /* RING_REQUEST_PROD_OVERFLOW */
        r->broken = 1;
        return -1;
    }
    uint32_t ahead = req_prod - r->cons;
    if (ahead > r->nr) {
        r->broken = 1;
        return -1;
    }
    uint32_t room = r->nr - (r->cons - r->prod_pvt); /* RING_REQUEST_CONS_OVERFLOW */
    return ahead < room ? ahead : room;
}

/* FrontRing._snapshot: responses we may consume, or -1 (broken). */
static inline int64_t front_unconsumed(ring_t *r) {
    uint32_t rsp_prod = load32(&r->sring[RSP_PROD]);
    uint32_t ahead = rsp_prod - r->cons;
    if (ahead > (uint32_t)(r->pushed - r->cons)) { /* more answers than requests published */
        r->broken = 1;
        return -1;
    }
    return ahead;
}

/* _Ring._push: publish prod_pvt at index `prod`; 1 if the peer's event index asks a kick. */
static inline int ring_push(ring_t *r, int prod, int event) {
    uint32_t old = r->pushed, new_ = r->prod_pvt;
    if (old == new_)
        return 0;
    r->pushed = new_;
    store32(&r->sring[prod], new_);
    mb();
    int notify = (uint32_t)(new_ - load32(&r->sring[event])) < (uint32_t)(new_ - old);
    if (prod == RSP_PROD)
        ring_count(r, RF_RESPONSES, new_ - old);
    ring_count(r, notify ? RF_NOTIFY_SENT : RF_NOTIFY_SUPPRESSED, 1);
    return notify;
}

/* final_check_for_*: 1 if there is work; else arm our event index and look once more. */
static inline int64_t ring_final_check(ring_t *r, int event, int64_t (*unconsumed)(ring_t *)) {
    int64_t n = unconsumed(r);
    if (n)
        return n;
    store32(&r->sring[event], r->cons + 1);
    mb();
    return unconsumed(r);
}

/* Free request slots at the front (RING_FREE_REQUESTS). */
static inline uint32_t front_free(const ring_t *r) { return r->nr - (r->prod_pvt - r->cons); }

/* -- doorbells (channels/doorbell.py) ----------------------------------------------------- */

/* A doorbell: its semaphore (the pending bit) and the FIFO beside it that the waiter polls. */
typedef struct {
    sem_t *sem;
    int fd;
} bell_t;

/* Doorbell.ring: post and write only if nobody has been told yet. */
static inline void bell_ring(bell_t *b) {
    int value = 1;
    mb();
    if (sem_getvalue(b->sem, &value) != 0 || value != 0)
        return;
    if (sem_post(b->sem) != 0)
        return; /* EOVERFLOW: already rung */
    (void)!write(b->fd, "\1", 1); /* EAGAIN: full, so readable already */
}

/* Doorbell.consume: the FIFO's bytes, then the semaphore's counts (this order: doorbell.py). */
static inline void bell_consume(bell_t *b) {
    char sink[4096];
    (void)!read(b->fd, sink, sizeof sink);
    for (int i = 0; i < 64 && sem_trywait(b->sem) == 0; i++) /* DRAIN_LIMIT */
        ;
}

/* Doorbell.wait, also woken by `stop_fd`: 1 if rung (and consumed), 0 on timeout or stop. */
static inline int bell_wait(bell_t *b, int stop_fd, uint64_t timeout_ns) {
    struct pollfd fds[2] = {{.fd = b->fd, .events = POLLIN}, {.fd = stop_fd, .events = POLLIN}};
    int ms = (int)((timeout_ns + 999999) / 1000000);
    uint64_t until = now_ns() + timeout_ns;
    for (;;) {
        int n = poll(fds, 2, ms);
        if (n >= 0)
            break;
        if (errno != EINTR)
            return 0; /* an fd closed under us: the caller's stop flag ends the loop */
        uint64_t now = now_ns();
        if (now >= until)
            return 0;
        ms = (int)((until - now + 999999) / 1000000);
    }
    bell_consume(b); /* on a timeout too: a count left without its byte goes (doorbell.py) */
    return !!(fds[0].revents & POLLIN);
}

/* -- late EOI (channels/evtchn.py's LateEoi) ---------------------------------------------- */

typedef struct {
    uint32_t run;      /* spurious wakeups in a row */
    uint64_t spurious; /* all of them */
    uint64_t *fig;     /* the ring's figures (RF_*), or NULL */
} late_eoi_t;

/* LateEoi.idle: nanoseconds to hold off before sleeping on the channel again. */
static inline uint64_t late_eoi_idle(late_eoi_t *l) {
    l->run++;
    l->spurious++;
    if (l->fig)
        l->fig[RF_SPURIOUS]++;
    if (l->run < 2)
        return 0;
    if (l->fig)
        l->fig[RF_BACKOFFS]++;
    uint32_t shift = l->run - 2 < 30 ? l->run - 2 : 30;
    uint64_t ns = 1000000ull << shift; /* 1 ms, 2, 4, ... */
    return ns < 1000000000ull ? ns : 1000000000ull;
}

/* Sleep up to `ns` unless `stop_fd` becomes readable first. */
static inline void pause_unless(int stop_fd, uint64_t ns) {
    if (!ns)
        return;
    struct pollfd p = {.fd = stop_fd, .events = POLLIN};
    poll(&p, 1, (int)((ns + 999999) / 1000000));
}

/* -- adaptive polling after activity (haltpoll's window) ---------------------------------
 *
 * A pump that has just done work looks again for up to `window` nanoseconds before it sleeps:
 * a wakeup across the two vCPUs costs 20-100 us here, more than most gaps in a busy stream.
 * The window grows (doubling, up to SPIN_MAX) when work turned up during the spin or soon after
 * the sleep began, and shrinks (halving) when the sleep was long: a pump that keeps finding
 * nothing stops spinning. An idle pump never spins: the spin follows work only. */

#define SPIN_MAX 50000ull
#define SPIN_START 10000ull

typedef struct {
    uint64_t window;
} spin_t;

static inline void spin_grow(spin_t *s) {
    s->window = s->window ? s->window * 2 : 2000;
    if (s->window > SPIN_MAX)
        s->window = SPIN_MAX;
}

/* After a sleep that lasted `slept` ns: short sleeps mean the window was just too short. */
static inline void spin_slept(spin_t *s, uint64_t slept) {
    if (slept <= SPIN_MAX)
        spin_grow(s);
    else
        s->window /= 2;
}

/* One turn of a spin: give the CPU to any other runnable thread (the peer we wait for may be
   one), so that polling only ever uses a CPU that would otherwise idle, as haltpoll does. */
static inline void cpu_relax(void) { sched_yield(); }

/* Sleep on `bell` (Doorbell.wait), after spinning up to the window on `has_work(arg)` if the
 * last round worked. 1 if rung, 0 on timeout, stop, or when work turned up during the spin. */
static inline int spin_then_wait(spin_t *s, int worked, volatile int *stopping,
                                 int (*has_work)(void *), void *arg, bell_t *bell, int stop_fd) {
    if (worked && s->window) {
        uint64_t until = now_ns() + s->window;
        while (now_ns() < until && !*stopping) {
            if (has_work(arg)) {
                spin_grow(s);
                /* The peer may have rung for what we found: that ring must not wake us later
                   as if for nothing (late EOI would count it against the peer). */
                bell_consume(bell);
                return 0;
            }
            cpu_relax();
        }
    }
    uint64_t t0 = now_ns();
    int rung = bell_wait(bell, stop_fd, HEAL_NS);
    spin_slept(s, now_ns() - t0);
    return rung;
}

/* Is `fd` readable now? (no wait) */
static inline int readable(int fd) {
    struct pollfd p = {.fd = fd, .events = POLLIN};
    return poll(&p, 1, 0) > 0 && (p.revents & (POLLIN | POLLERR | POLLHUP));
}

/* -- grants (channels/gnttab.py's MappedPool.resolve, channels/grants.py's cache) ---------- */

#define GTF_permit_access 1u
#define GTF_type_mask 3u
#define GTF_readonly (1u << 2)
/* The pools one pump looks refs up in: a vif's three per queue, for netif.MAX_QUEUES queues,
 * and room for some being replaced. */
#define MAX_POOLS 32

typedef struct {
    uint8_t *base;       /* the pool's mapping: its grant table, then its pages */
    uint32_t gref_base;  /* grant ref of entry 0 */
    uint32_t pages;      /* entries, and pages */
    uint32_t data_off;   /* where page 0 starts */
    uint8_t *checked[2]; /* per entry: already checked for read-only, for writable use */
} pool_t;

typedef struct {
    pool_t pool[MAX_POOLS];
    int n;
    uint16_t domid; /* who we are: entries must be granted to us */
} grants_t;

enum { G_OK, G_MISS, G_BAD };

/* The page behind `gref` (G_OK), or G_MISS (in no pool we map: Python refreshes) or G_BAD (the
 * granter does not allow it: an error response). A ref checked once stays usable while its
 * pool is mapped (persistent grants; GrantMapper._checked). */
static inline int grant_page(grants_t *g, uint32_t gref, int write, uint8_t **page) {
    for (int i = 0; i < g->n; i++) {
        pool_t *p = &g->pool[i];
        uint32_t index = gref - p->gref_base;
        if (gref < p->gref_base || index >= p->pages)
            continue;
        if (!p->checked[write][index]) {
            uint64_t entry = __atomic_load_n((uint64_t *)(p->base + (size_t)index * 8),
                                             __ATOMIC_RELAXED); /* one copy of the entry */
            uint32_t flags = entry & 0xFFFF, domid = (entry >> 16) & 0xFFFF;
            uint32_t frame = (uint32_t)(entry >> 32);
            if ((flags & GTF_type_mask) != GTF_permit_access || domid != g->domid ||
                frame >= p->pages || (write && (flags & GTF_readonly)))
                return G_BAD;
            p->checked[write][index] = 1;
            /* The frame is remembered with the check (the granter cannot move it later). */
            memcpy(p->checked[write] + p->pages + (size_t)index * 4, &frame, 4);
        }
        uint32_t frame;
        memcpy(&frame, p->checked[write] + p->pages + (size_t)index * 4, 4);
        *page = p->base + p->data_off + (size_t)frame * PAGE_SIZE;
        return G_OK;
    }
    return G_MISS;
}

#endif
