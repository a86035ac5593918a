/* netif's batch pumps, native: the four loops that move frames between a TAP and the rings.
 *
 *   netback tx:  tx ring (guest's requests)  -> host TAP     backends/netback/datapath.py TxPath
 *   netback rx:  host TAP -> rx ring (pages the guest posted)                          RxPath
 *   netfront tx: the domain's eth0 TAP -> tx ring            domu/netfront/datapath.py TxPath
 *   netfront rx: rx ring (the backend's answers) -> eth0 TAP                           RxPath
 *
 * Why native: the Python loops cost about 1.5 us per slot and hand one GIL between threads on
 * every syscall; these run a whole batch, and sleep, with the GIL released (issue 13). The
 * Python classes named above stay the reference: each loop here follows its Python twin step
 * for step, and tests/unit/test_native_pumps.py feeds both the same rings, hostile ones
 * included, and requires the same answers.
 *
 * The netback tx pump takes the common case (a frame whose extras are GSO, whose grant refs
 * lie in pools already mapped, from an IPv4 address or any address) and hands every other
 * frame back to Python before consuming it (PUMP_FALLBACK): multicast control, IPv6 and ARP
 * under an address check, a grant ref that misses (the mapper refreshes and counts bad refs),
 * a vif with a rate limit (never run natively). So a hostile frontend meets today's checked
 * path for anything unusual, and this code for the rest, with the same checks.
 *
 * Built with HYPER_FUZZ defined, only the loops' pure parts are compiled (no Python), for the
 * libFuzzer harness in channels/native/fuzz/.
 */
#ifndef HYPER_FUZZ
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#endif

#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/eventfd.h>

#include "pump.h"

/* -- netif (io/netif.h; channels/netif.py) ------------------------------------------------ */

#define TX_SLOT 12 /* tx request: gref u32, offset u16, flags u16, id u16, size u16 */
#define RX_SLOT 8  /* rx request: id u16, pad u16, gref u32; response: id, offset, flags, status */

#define NETTXF_csum_blank 1
#define NETTXF_data_validated 2
#define NETTXF_more_data 4
#define NETTXF_extra_info 8
#define NETRXF_data_validated 1
#define NETRXF_csum_blank 2
#define NETRXF_more_data 4
#define NETRXF_extra_info 8
#define NETIF_RSP_ERROR (-1)
#define NETIF_RSP_OKAY 0
#define NETIF_RSP_NULL 1
#define EXTRA_TYPE_GSO 1
#define EXTRA_TYPE_MCAST_ADD 2
#define EXTRA_TYPE_MCAST_DEL 3
#define EXTRA_TYPE_MAX 5
#define EXTRA_FLAG_MORE 1
#define GSO_NONE 0
#define GSO_TCPV4 1
#define GSO_TCPV6 2
#define NR_SLOTS_MIN 18
#define ETH_HLEN 14
#define VNET_HDR_SIZE 10
#define VNET_NEEDS_CSUM 1
#define VNET_DATA_VALID 2
#define VNET_GSO_TCPV4 1
#define VNET_GSO_TCPV6 4
#define VNET_GSO_ECN 0x80

/* backends/netback/datapath.py's constants */
#define FATAL_SLOTS 20
#define MAX_FRAME_PAGES 17
#define BUDGET 64
#define BUDGET_SLOTS 256
#define HEAD_COPY 128
#define MIN_GSO_SIZE 88
#define GSO_BY_FRAGS 0xFFFF
#define RX_NEED (MAX_FRAME_PAGES + 1)

/* The vif's counters page: backends/netback/datapath.py's COUNTER_FIELDS, in that order. */
enum { TX_PACKETS, TX_BYTES, TX_ERRORS, TX_DROPPED, TX_SPOOFED, RX_PACKETS, RX_BYTES, RX_ERRORS,
       RX_DROPPED, N_COUNTERS };

/* What a pump's run() ends with. */
enum { PUMP_STOPPED, PUMP_FATAL, PUMP_FALLBACK, PUMP_MISS, PUMP_BROKEN, PUMP_IOERROR };

enum { NETBACK_TX, NETBACK_RX, NETFRONT_TX, NETFRONT_RX };


typedef struct {
    ring_t ring;
    grants_t grants; /* backends: the frontend's pools */
    uint8_t *pages;  /* frontends: our own pool's pages, and their grant refs */
    uint32_t npages;
    uint32_t *grefs;
    uint64_t *counters; /* backends: N_COUNTERS u64 */
    uint64_t scratch[N_COUNTERS];
    int tap_fd, stop_fd;
    bell_t mine, peer;
    volatile int stopping;
    late_eoi_t eoi;
    spin_t spin;
    int gso;                            /* the peer takes GSO frames */
    int check_sources, any_address;     /* netback tx's source filter (antispoof.py) */
    int has_ipv4;
    uint8_t mac[6], ipv4[4];
    /* netback rx: posted buffers taken off the ring, oldest first */
    uint32_t held_head, held_len;
    uint16_t held_id[512];
    uint8_t *held_page[512];
    /* netfront tx: a stack of free pages and which pages a request holds */
    uint32_t *free_stack, nfree;
    uint8_t *in_flight;
    /* netfront rx: ring slot -> the page posted in it */
    uint32_t *slot_page;
    /* netback tx: slots of a packet whose last slot is not published yet */
    uint32_t tx_pending;
    /* what ended run() */
    char why[160];
    uint32_t detail;
} pump_t;

static void say(pump_t *p, const char *what) {
    strncpy(p->why, what, sizeof p->why - 1);
    p->why[sizeof p->why - 1] = 0;
}

/* -- frame headers (channels/netif.py's frame_layout, l4_layout, vnet_from_offload) ------- */

#define NO_L4 (-1)

typedef struct {
    int ethertype, l3, proto, l4;
} layout_t;

static layout_t frame_layout(const uint8_t *f, size_t len) {
    layout_t l = {f[12] << 8 | f[13], ETH_HLEN, NO_L4, 0};
    if (l.ethertype == 0x8100 && len >= 18) {
        l.ethertype = f[16] << 8 | f[17];
        l.l3 = 18;
    }
    const uint8_t *ip = f + l.l3;
    if (l.ethertype == 0x0800) {
        if (len >= (size_t)l.l3 + 20 && ip[0] >= 0x45 && ip[0] <= 0x4F) {
            l.proto = ip[9];
            l.l4 = l.l3 + (ip[0] & 0x0F) * 4;
        }
    } else if (l.ethertype == 0x86DD && len >= (size_t)l.l3 + 40 && ip[0] >> 4 == 6) {
        l.proto = ip[6];
        l.l4 = l.l3 + 40;
    }
    return l;
}

typedef struct {
    int csum_blank, data_validated, gso_type, gso_size;
} offload_t;

static void vnet_from_offload(const offload_t *o, const uint8_t *head, size_t len,
                              const layout_t *l, uint8_t out[VNET_HDR_SIZE]) {
    memset(out, 0, VNET_HDR_SIZE);
    if (!o->csum_blank && o->gso_type == GSO_NONE) {
        out[0] = o->data_validated ? VNET_DATA_VALID : 0;
        return;
    }
    int start, csum, hdr_len;
    if (l->proto == 6 && (size_t)l->l4 + 12 < len) {
        int doff = (head[l->l4 + 12] >> 4) * 4;
        start = l->l4, csum = 16, hdr_len = l->l4 + (doff > 20 ? doff : 20);
    } else if (l->proto == 17) {
        start = l->l4, csum = 6, hdr_len = l->l4 + 8;
    } else {
        return;
    }
    int gso = o->gso_type == GSO_TCPV4 ? VNET_GSO_TCPV4
              : o->gso_type == GSO_TCPV6 ? VNET_GSO_TCPV6
                                          : 0;
    out[0] = VNET_NEEDS_CSUM;
    out[1] = (uint8_t)gso;
    put16(out + 2, (uint16_t)hdr_len);
    put16(out + 4, gso ? (uint16_t)o->gso_size : 0);
    put16(out + 6, (uint16_t)start);
    put16(out + 8, (uint16_t)csum);
}

/* channels/netif.py's offload_from_vnet: -1 for a GSO kind netif cannot carry. */
static int offload_from_vnet(const uint8_t h[VNET_HDR_SIZE], offload_t *o) {
    int base = h[1] & ~VNET_GSO_ECN;
    if (base != 0 && base != VNET_GSO_TCPV4 && base != VNET_GSO_TCPV6)
        return -1;
    o->csum_blank = !!(h[0] & VNET_NEEDS_CSUM);
    o->data_validated = !!(h[0] & (VNET_NEEDS_CSUM | VNET_DATA_VALID));
    o->gso_type = base == VNET_GSO_TCPV4 ? GSO_TCPV4 : base == VNET_GSO_TCPV6 ? GSO_TCPV6 : 0;
    o->gso_size = base ? get16(h + 4) : 0;
    return 0;
}

/* The peer's producer index, validated: how much there is to take, or -PUMP_BROKEN with the
 * reason said (an impossible index). */
static int64_t requests_or_broken(pump_t *p) {
    int64_t n = back_unconsumed(&p->ring);
    if (n < 0)
        say(p, "impossible req_prod");
    return n < 0 ? -PUMP_BROKEN : n;
}

static int64_t responses_or_broken(pump_t *p) {
    int64_t n = front_unconsumed(&p->ring);
    if (n < 0)
        say(p, "impossible rsp_prod");
    return n < 0 ? -PUMP_BROKEN : n;
}

/* -- netback tx ----------------------------------------------------------------------------- */

typedef struct {
    uint32_t gref;
    uint16_t offset, flags, id, size;
} tx_req_t;

static tx_req_t tx_req(const uint8_t *s) {
    return (tx_req_t){get32(s), get16(s + 4), get16(s + 6), get16(s + 8), get16(s + 10)};
}

/* antispoof.py's SourceFilter.refusal for the cases it can decide alone: 0 (may go), 1
 * (spoofed), or -1 (Python decides: IPv6, ARP and other EtherTypes under an address check). */
static int source_check(const pump_t *p, const uint8_t *head, const layout_t *l) {
    if (memcmp(head + 6, p->mac, 6) != 0)
        return 1;
    if (l->l3 != ETH_HLEN || l->ethertype == 0x8100 || l->ethertype == 0x88A8)
        return 1;
    if (p->any_address)
        return 0;
    if (l->ethertype != 0x0800)
        return -1;
    if (l->proto == NO_L4 || !p->has_ipv4)
        return 1;
    return memcmp(head + 26, p->ipv4, 4) == 0 ? 0 : 1;
}

/* The outcome of one packet (TxPath._transmit's status). */
enum { TX_SENT, TX_REFUSED, TX_BAD, TX_FALLBACK, TX_IOERROR };

/* TxPath._offload: GSO extras read, multicast control left to Python, others refused. */
static int tx_offload(const tx_req_t *s, int extras, offload_t *o) {
    o->gso_type = GSO_NONE;
    o->gso_size = 0;
    for (int i = 1; i <= extras; i++) {
        uint32_t word = s[i].gref;
        int type = word & 0xFF, gso_size = word >> 16, gso_type = s[i].offset & 0xFF;
        if (type == EXTRA_TYPE_GSO) {
            if (gso_size < MIN_GSO_SIZE || gso_size >= GSO_BY_FRAGS)
                return TX_BAD;
            if (gso_type != GSO_TCPV4 && gso_type != GSO_TCPV6)
                return TX_BAD;
            o->gso_type = gso_type, o->gso_size = gso_size;
        } else if (type == EXTRA_TYPE_MCAST_ADD || type == EXTRA_TYPE_MCAST_DEL) {
            return TX_FALLBACK; /* counted in Python as sent, nothing sent: rare; Python does it */
        } else if (!(type > 0 && type < EXTRA_TYPE_MAX)) {
            return TX_BAD;
        }
    }
    o->csum_blank = !!(s[0].flags & NETTXF_csum_blank);
    o->data_validated = !!(s[0].flags & NETTXF_data_validated);
    return TX_SENT;
}

/* TxPath._send for one complete packet of `k` slots (copies in `s`), `extras` of them extras. */
static int tx_send(pump_t *p, const tx_req_t *s, int k, int extras, uint32_t *total_out) {
    offload_t o;
    int verdict = tx_offload(s, extras, &o);
    if (verdict != TX_SENT)
        return verdict;
    uint32_t total = s[0].size;
    if (k - extras > NR_SLOTS_MIN || total < ETH_HLEN)
        return TX_BAD;
    /* iov: vnet header, the head's private copy, the rest of the first slot, the fragments */
    struct iovec iov[3 + NR_SLOTS_MIN];
    uint8_t vnet[VNET_HDR_SIZE], head[HEAD_COPY];
    int n = 3;
    uint32_t rest = 0;
    for (int i = 1 + extras; i < k; i++) {
        uint8_t *page;
        if (s[i].size == 0 || (uint32_t)s[i].offset + s[i].size > PAGE_SIZE)
            return TX_BAD;
        int g = grant_page(&p->grants, s[i].gref, 0, &page);
        if (g != G_OK)
            return g == G_MISS ? TX_FALLBACK : TX_BAD;
        iov[n].iov_base = page + s[i].offset;
        iov[n++].iov_len = s[i].size;
        rest += s[i].size;
    }
    if (rest > total || total - rest < ETH_HLEN)
        return TX_BAD;
    uint32_t size = total - rest, start = s[0].offset;
    if (start + size > PAGE_SIZE)
        return TX_BAD;
    uint8_t *page;
    int g = grant_page(&p->grants, s[0].gref, 0, &page);
    if (g != G_OK)
        return g == G_MISS ? TX_FALLBACK : TX_BAD;
    /* The head: copied once; every check reads the copy, and the copy is what goes out. */
    size_t head_len;
    if (size >= HEAD_COPY) {
        memcpy(head, page + start, HEAD_COPY);
        head_len = HEAD_COPY;
        iov[2].iov_base = page + start + HEAD_COPY;
        iov[2].iov_len = size - HEAD_COPY;
    } else {
        memcpy(head, page + start, size);
        head_len = size;
        iov[2].iov_base = NULL;
        iov[2].iov_len = 0;
        /* _gather: the rest of the head from the fragments, which are trimmed to what is left */
        size_t want = (total < HEAD_COPY ? total : HEAD_COPY) - size;
        for (int i = 3; want && i < n; i++) {
            size_t take = iov[i].iov_len < want ? iov[i].iov_len : want;
            memcpy(head + head_len, iov[i].iov_base, take);
            head_len += take, want -= take;
            iov[i].iov_base = (uint8_t *)iov[i].iov_base + take;
            iov[i].iov_len -= take;
        }
    }
    layout_t l = frame_layout(head, head_len);
    if (p->check_sources) {
        int refused = source_check(p, head, &l);
        if (refused < 0)
            return TX_FALLBACK;
        if (refused)
            return TX_REFUSED;
    }
    vnet_from_offload(&o, head, head_len, &l, vnet);
    iov[0].iov_base = vnet;
    iov[0].iov_len = VNET_HDR_SIZE;
    iov[1].iov_base = head;
    iov[1].iov_len = head_len;
    if (writev(p->tap_fd, iov, n) < 0) {
        if (errno == EAGAIN)
            p->counters[TX_DROPPED]++;
        else if (errno == EIO || errno == EINVAL)
            return TX_BAD;
        else {
            say(p, strerror(errno)); /* our TAP, not the frontend: a local error */
            return TX_IOERROR;
        }
    }
    *total_out = total;
    return TX_SENT;
}

static void tx_respond(pump_t *p, uint16_t id, int16_t status) {
    uint8_t *slot = ring_slot(&p->ring, p->ring.prod_pvt++);
    memset(slot, 0, TX_SLOT);
    put16(slot, id);
    put16(slot + 2, (uint16_t)status);
}

/* How many slots the packet at `cons` spans (copied into `s`), 0 if not all published yet,
 * -1 past FATAL_SLOTS. TxPath._collect's state machine, over whole packets only. */
static int tx_packet(pump_t *p, uint32_t cons, uint32_t avail, tx_req_t *s, int *extras) {
    enum { FIRST, EXTRA, FRAGMENT, DONE } state = FIRST;
    *extras = 0;
    for (uint32_t k = 0; k < avail; k++) {
        s[k] = tx_req(ring_slot(&p->ring, cons + k));
        if (state == EXTRA) {
            (*extras)++;
            if (!((s[k].gref >> 8) & EXTRA_FLAG_MORE))
                state = s[0].flags & NETTXF_more_data ? FRAGMENT : DONE;
        } else if (state == FIRST && (s[k].flags & NETTXF_extra_info)) {
            state = EXTRA;
        } else {
            state = s[k].flags & NETTXF_more_data ? FRAGMENT : DONE;
        }
        if (state == DONE)
            return (int)k + 1;
        if (k + 1 > FATAL_SLOTS)
            return -1;
    }
    return 0;
}

/* TxPath._work: every whole packet published (up to BUDGET_SLOTS), answered and pushed.
 * Returns slots handled (>= 0), or -PUMP_* to end run(). */
static int64_t netback_tx_work(pump_t *p) {
    uint32_t start = p->ring.cons;
    p->tx_pending = 0;
    int64_t avail = requests_or_broken(p);
    if (avail < 0)
        return avail;
    if (avail > BUDGET_SLOTS)
        avail = BUDGET_SLOTS;
    int64_t done = 0, end = 0;
    tx_req_t s[FATAL_SLOTS + 1];
    while (done < avail) {
        int extras, k = tx_packet(p, p->ring.cons, (uint32_t)(avail - done), s, &extras);
        if (k < 0) {
            say(p, "a packet of more than 20 slots");
            end = -PUMP_FATAL;
            break;
        }
        if (k == 0) {
            p->tx_pending = (uint32_t)(avail - done); /* the rest is not published yet */
            break;
        }
        p->tx_pending = 0;
        uint32_t total = 0;
        int verdict = tx_send(p, s, k, extras, &total);
        if (verdict == TX_FALLBACK) {
            p->detail = (uint32_t)k;
            end = -PUMP_FALLBACK;
            break;
        }
        if (verdict == TX_IOERROR) {
            end = -PUMP_IOERROR;
            break;
        }
        int16_t status = verdict == TX_BAD ? NETIF_RSP_ERROR : NETIF_RSP_OKAY;
        if (verdict == TX_SENT) {
            p->counters[TX_PACKETS]++;
            p->counters[TX_BYTES] += total;
        } else if (verdict == TX_REFUSED) {
            p->counters[TX_SPOOFED]++;
        } else {
            p->counters[TX_ERRORS]++;
        }
        p->ring.cons += (uint32_t)k;
        tx_respond(p, s[0].id, status);
        for (int i = 0; i < extras; i++)
            tx_respond(p, 0, NETIF_RSP_NULL);
        for (int i = 1 + extras; i < k; i++)
            tx_respond(p, s[i].id, status);
        done += k;
        /* Answered at once, not at the end of the batch: a frontend waiting for room refills
           the ring while we send the rest (the push rings only if it asked). */
    }
    ring_took_since(&p->ring, start);
    if (ring_push(&p->ring, RSP_PROD, RSP_EVENT))
        bell_ring(&p->peer);
    return end ? end : done;
}

/* -- netback rx ----------------------------------------------------------------------------- */

/* RxPath._fill's batch (netback_rx_fill counts what it took). */
static int netback_rx_take(pump_t *p) {
    if (p->held_len >= RX_NEED)
        return 0;
    int64_t avail = requests_or_broken(p);
    if (avail < 0)
        return avail;
    if (avail > BUDGET)
        avail = BUDGET;
    for (int64_t i = 0; i < avail; i++) {
        uint8_t slot[RX_SLOT];
        memcpy(slot, ring_slot(&p->ring, p->ring.cons), RX_SLOT);
        uint32_t gref = get32(slot + 4);
        uint8_t *page;
        int g = grant_page(&p->grants, gref, 1, &page);
        if (g == G_MISS) {
            p->detail = gref; /* Python resolves it (a refresh) and runs us again */
            return -PUMP_MISS;
        }
        if (g == G_BAD) {
            snprintf(p->why, sizeof p->why, "rx buffer gref %u: not granted for writing", gref);
            return -PUMP_FATAL;
        }
        uint32_t at = (p->held_head + p->held_len++) % 512;
        p->held_id[at] = get16(slot);
        p->held_page[at] = page;
        p->ring.cons++;
    }
    return 0;
}

/* RxPath._fill: posted buffers off the ring until a whole frame fits. */
static int netback_rx_fill(pump_t *p) {
    uint32_t start = p->ring.cons;
    int r = netback_rx_take(p);
    ring_took_since(&p->ring, start);
    return r;
}

#define HELD(p, i) ((p)->held_page[((p)->held_head + (i)) % 512])

static void rx_respond(pump_t *p, uint16_t id, uint16_t offset, uint16_t flags, int16_t status) {
    uint8_t *slot = ring_slot(&p->ring, p->ring.prod_pvt++);
    put16(slot, id);
    put16(slot + 2, offset);
    put16(slot + 4, flags);
    put16(slot + 6, (uint16_t)status);
}

static uint16_t held_pop(pump_t *p) {
    uint16_t id = p->held_id[p->held_head];
    p->held_head = (p->held_head + 1) % 512;
    p->held_len--;
    return id;
}

/* RxPath._receive: 1 if a frame was read (or refused), 0 if the TAP had none, <0 fatal. */
static int netback_rx_receive(pump_t *p) {
    uint8_t hdr[VNET_HDR_SIZE];
    struct iovec iov[1 + MAX_FRAME_PAGES];
    iov[0].iov_base = hdr, iov[0].iov_len = VNET_HDR_SIZE;
    iov[1].iov_base = HELD(p, 0), iov[1].iov_len = PAGE_SIZE;
    for (int i = 2; i < RX_NEED; i++)
        iov[i].iov_base = HELD(p, i), iov[i].iov_len = PAGE_SIZE;
    ssize_t n = readv(p->tap_fd, iov, 1 + MAX_FRAME_PAGES);
    if (n < 0) {
        if (errno == EAGAIN || errno == EINTR)
            return 0;
        say(p, strerror(errno));
        return -PUMP_IOERROR;
    }
    int64_t length = n - VNET_HDR_SIZE;
    if (length <= 0) {
        p->counters[RX_ERRORS]++;
        return 1;
    }
    uint32_t used = (uint32_t)((length + PAGE_SIZE - 1) / PAGE_SIZE);
    offload_t o;
    if (offload_from_vnet(hdr, &o) < 0) {
        p->counters[RX_DROPPED]++;
        return 1;
    }
    int gso = o.gso_type != GSO_NONE;
    if (gso && !p->gso) {
        p->counters[RX_DROPPED]++;
        return 1;
    }
    if (!gso)
        for (uint32_t i = 1; i < used; i++)
            memmove(HELD(p, i), HELD(p, i + 1), PAGE_SIZE); /* a page posted twice */
    uint16_t flags = (o.csum_blank ? NETRXF_csum_blank : 0) |
                     (o.data_validated ? NETRXF_data_validated : 0);
    uint16_t first = flags | (used > 1 ? NETRXF_more_data : 0) | (gso ? NETRXF_extra_info : 0);
    rx_respond(p, held_pop(p), 0, first, (int16_t)(length < PAGE_SIZE ? length : PAGE_SIZE));
    if (gso) {
        held_pop(p); /* its slot carries the GSO extra, overlaid on the response */
        rx_respond(p, EXTRA_TYPE_GSO, (uint16_t)o.gso_size, (uint16_t)o.gso_type, 0);
    }
    for (uint32_t i = 0; i + 2 < used; i++)
        rx_respond(p, held_pop(p), 0, NETRXF_more_data, PAGE_SIZE);
    if (used > 1)
        rx_respond(p, held_pop(p), 0, 0, (int16_t)(length - (int64_t)(used - 1) * PAGE_SIZE));
    p->counters[RX_PACKETS]++;
    p->counters[RX_BYTES] += (uint64_t)length;
    return 1;
}

/* -- netfront tx ---------------------------------------------------------------------------- */

/* TxPath._reap: 1 if responses were taken, 0 if none, <0 broken. */
static int netfront_tx_reap(pump_t *p) {
    int64_t n = responses_or_broken(p);
    if (n < 0)
        return (int)n;
    for (int64_t i = 0; i < n; i++) {
        uint8_t slot[4];
        memcpy(slot, ring_slot(&p->ring, p->ring.cons), 4);
        p->ring.cons++;
        uint16_t id = get16(slot);
        if ((int16_t)get16(slot + 2) == NETIF_RSP_NULL)
            continue;
        if (id >= p->npages || !p->in_flight[id]) {
            snprintf(p->why, sizeof p->why, "tx response for id %u, which is not in flight", id);
            return -PUMP_FATAL;
        }
        p->in_flight[id] = 0;
        p->free_stack[p->nfree++] = id;
    }
    return n > 0;
}

static void tx_request(pump_t *p, uint32_t gref, uint16_t offset, uint16_t flags, uint16_t id,
                       uint16_t size) {
    uint8_t *slot = ring_slot(&p->ring, p->ring.prod_pvt++);
    put32(slot, gref);
    put16(slot + 4, offset);
    put16(slot + 6, flags);
    put16(slot + 8, id);
    put16(slot + 10, size);
}

/* TxPath._send_batch: frames from eth0 straight into free pages, queued as requests. */
static int netfront_tx_send(pump_t *p) {
    int sent = 0;
    while (sent < BUDGET && p->nfree > MAX_FRAME_PAGES && front_free(&p->ring) >= RX_NEED + 1) {
        uint32_t *ids = p->free_stack + p->nfree - MAX_FRAME_PAGES;
        uint8_t hdr[VNET_HDR_SIZE];
        struct iovec iov[1 + MAX_FRAME_PAGES];
        iov[0].iov_base = hdr, iov[0].iov_len = VNET_HDR_SIZE;
        for (int i = 0; i < MAX_FRAME_PAGES; i++)
            iov[1 + i].iov_base = p->pages + (size_t)ids[i] * PAGE_SIZE,
                     iov[1 + i].iov_len = PAGE_SIZE;
        ssize_t n = readv(p->tap_fd, iov, 1 + MAX_FRAME_PAGES);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                break; /* nothing more to send */
            say(p, strerror(errno));
            return -PUMP_IOERROR;
        }
        int64_t length = n - VNET_HDR_SIZE;
        offload_t o;
        if (length <= 0 || length > 0xFFFF || offload_from_vnet(hdr, &o) < 0)
            continue; /* nothing netif can carry (a size is 16 bits) */
        uint32_t used = (uint32_t)((length + PAGE_SIZE - 1) / PAGE_SIZE);
        int gso = o.gso_type != GSO_NONE && p->gso;
        uint16_t flags = (o.csum_blank ? NETTXF_csum_blank : 0) |
                         (o.data_validated ? NETTXF_data_validated : 0) |
                         (used > 1 ? NETTXF_more_data : 0);
        tx_request(p, p->grefs[ids[0]], 0, flags | (gso ? NETTXF_extra_info : 0),
                   (uint16_t)ids[0], (uint16_t)length);
        if (gso)
            tx_request(p, EXTRA_TYPE_GSO | (uint32_t)o.gso_size << 16, (uint16_t)o.gso_type,
                       0, 0, 0);
        for (uint32_t i = 1; i + 1 < used; i++)
            tx_request(p, p->grefs[ids[i]], 0, NETTXF_more_data, (uint16_t)ids[i], PAGE_SIZE);
        if (used > 1)
            tx_request(p, p->grefs[ids[used - 1]], 0, 0, (uint16_t)ids[used - 1],
                       (uint16_t)(length - (int64_t)(used - 1) * PAGE_SIZE));
        for (uint32_t i = 0; i < used; i++)
            p->in_flight[ids[i]] = 1;
        /* the pages used leave the stack; the unused ones above them move down */
        memmove(ids, ids + used, (MAX_FRAME_PAGES - used) * sizeof *ids);
        p->nfree -= used;
        sent++;
    }
    if (sent && ring_push(&p->ring, REQ_PROD, REQ_EVENT))
        bell_ring(&p->peer);
    return sent;
}

/* -- netfront rx ---------------------------------------------------------------------------- */

typedef struct {
    uint16_t id, offset, flags;
    int16_t status;
} rx_rsp_t;

/* RxPath._deliver: one frame (a chain of filled pages) to eth0. */
static int netfront_rx_deliver(pump_t *p, const rx_rsp_t *r, const uint32_t *pages, int len,
                               const offload_t *gso) {
    struct iovec iov[1 + RX_NEED + 1];
    uint8_t vnet[VNET_HDR_SIZE];
    for (int i = 0; i < len; i++) {
        int size = r[i].status;
        if (size < 0)
            return 0; /* an error response: the backend dropped the frame */
        if (r[i].offset + size > (int)PAGE_SIZE) {
            snprintf(p->why, sizeof p->why, "rx response offset %u + size %d past the page",
                     r[i].offset, size);
            return -PUMP_FATAL;
        }
        iov[1 + i].iov_base = p->pages + (size_t)pages[i] * PAGE_SIZE + r[i].offset;
        iov[1 + i].iov_len = (size_t)size;
    }
    if (!len || iov[1].iov_len < ETH_HLEN)
        return 0;
    offload_t o = {!!(r[0].flags & NETRXF_csum_blank), !!(r[0].flags & NETRXF_data_validated),
                   gso->gso_type, gso->gso_size};
    size_t head = iov[1].iov_len < HEAD_COPY ? iov[1].iov_len : HEAD_COPY;
    uint8_t copy[HEAD_COPY];
    memcpy(copy, iov[1].iov_base, head); /* the backend may rewrite the page meanwhile */
    layout_t l = frame_layout(copy, head);
    vnet_from_offload(&o, copy, head, &l, vnet);
    iov[0].iov_base = vnet, iov[0].iov_len = VNET_HDR_SIZE;
    (void)!writev(p->tap_fd, iov, 1 + len); /* a full eth0 drops it, as a NIC would */
    return 0;
}

/* RxPath._receive_batch: 1 if responses were taken, 0 if none, <0 to end run(). */
static int netfront_rx_batch(pump_t *p) {
    int64_t n = responses_or_broken(p);
    if (n < 0)
        return (int)n;
    if (!n)
        return 0;
    if (n > 256)
        n = 256; /* a batch at most (a 4 KiB netif ring has 256 slots); the rest comes next */
    uint32_t first = p->ring.cons;
    rx_rsp_t r[256];
    uint32_t pages[256];
    for (int64_t i = 0; i < n; i++) {
        uint8_t slot[RX_SLOT];
        memcpy(slot, ring_slot(&p->ring, first + (uint32_t)i), RX_SLOT);
        r[i] = (rx_rsp_t){get16(slot), get16(slot + 2), get16(slot + 4), (int16_t)get16(slot + 6)};
        pages[i] = p->slot_page[(first + (uint32_t)i) & p->ring.mask];
    }
    p->ring.cons += (uint32_t)n;
    int64_t i = 0;
    int end = 0;
    while (i < n && !end) {
        int64_t start = i++;
        offload_t gso = {0, 0, GSO_NONE, 0};
        rx_rsp_t chain[RX_NEED + 1];
        uint32_t chain_pages[RX_NEED + 1];
        int len = 1;
        chain[0] = r[start], chain_pages[0] = pages[start];
        if (r[start].flags & NETRXF_extra_info) {
            if (i >= n) {
                say(p, "a packet's extra slot is missing");
                end = -PUMP_FATAL;
                break;
            }
            if ((r[i].id & 0xFF) == EXTRA_TYPE_GSO)
                gso.gso_type = r[i].flags & 0xFF, gso.gso_size = r[i].offset;
            i++;
        }
        int more = r[start].flags & NETRXF_more_data;
        while (more) {
            if (i >= n) {
                say(p, "a packet's response chain is cut short");
                end = -PUMP_FATAL;
                break;
            }
            chain[len] = r[i], chain_pages[len++] = pages[i];
            more = r[i++].flags & NETRXF_more_data;
            if (len > MAX_FRAME_PAGES + 1) {
                say(p, "an rx chain longer than any frame");
                end = -PUMP_FATAL;
                break;
            }
        }
        if (!end)
            end = netfront_rx_deliver(p, chain, chain_pages, len, &gso);
    }
    if (end)
        return end;
    /* repost every page consumed, each in the slot it is posted in (RxPath._post) */
    for (int64_t k = 0; k < n; k++) {
        uint32_t at = p->ring.prod_pvt++;
        uint8_t *slot = ring_slot(&p->ring, at);
        p->slot_page[at & p->ring.mask] = pages[k];
        memset(slot, 0, RX_SLOT);
        put16(slot, (uint16_t)pages[k]);
        put32(slot + 4, p->grefs[pages[k]]);
    }
    if (ring_push(&p->ring, REQ_PROD, REQ_EVENT))
        bell_ring(&p->peer);
    return 1;
}

/* -- the loops ------------------------------------------------------------------------------ */

/* Sleep on our doorbell, spinning first on `has_work` if the last round worked (pump.h's
 * spin_then_wait). Returns 1 if rung, 0 on timeout or when work turned up during the spin. */
static int sleep_on_bell(pump_t *p, int worked, int (*has_work)(void *)) {
    int rung = spin_then_wait(&p->spin, worked, &p->stopping, has_work, p, &p->mine, p->stop_fd);
    ring_count(&p->ring, RF_WAKEUPS, (uint64_t)rung);
    return rung;
}

/* Wait for the TAP, spinning first after work; 1 when readable, 0 when told to stop, -1 when
 * poll fails. */
static int wait_tap(pump_t *p, int worked) {
    if (worked && p->spin.window) {
        uint64_t until = now_ns() + p->spin.window;
        while (now_ns() < until && !p->stopping) {
            if (readable(p->tap_fd)) {
                spin_grow(&p->spin);
                return 1;
            }
            cpu_relax();
        }
    }
    struct pollfd fds[2] = {{.fd = p->tap_fd, .events = POLLIN}, {.fd = p->stop_fd, .events = POLLIN}};
    uint64_t t0 = now_ns();
    while (poll(fds, 2, -1) < 0)
        if (errno != EINTR) {
            say(p, strerror(errno));
            return -1;
        }
    spin_slept(&p->spin, now_ns() - t0);
    return !(fds[1].revents & POLLIN);
}

static int back_has_requests(void *arg) {
    pump_t *p = arg;
    return load32(&p->ring.sring[REQ_PROD]) != p->ring.cons;
}

/* netback tx's final check: work is a slot beyond the packet still being published. */
static int64_t tx_unconsumed(ring_t *r) {
    pump_t *p = (pump_t *)((char *)r - offsetof(pump_t, ring));
    int64_t n = back_unconsumed(r);
    return n < 0 ? n : n > p->tx_pending ? n - p->tx_pending : 0;
}

static int tx_has_requests(void *arg) {
    pump_t *p = arg;
    return load32(&p->ring.sring[REQ_PROD]) != p->ring.cons + p->tx_pending;
}

static int front_has_responses(void *arg) {
    pump_t *p = arg;
    return load32(&p->ring.sring[RSP_PROD]) != p->ring.cons;
}

/* netback tx's final check: arm req_event past the packet being published, look again. */
static int64_t tx_final_check(pump_t *p) {
    int64_t more = tx_unconsumed(&p->ring);
    if (more)
        return more;
    store32(&p->ring.sring[REQ_EVENT], p->ring.cons + p->tx_pending + 1);
    mb();
    return tx_unconsumed(&p->ring);
}

static int64_t front_final_check(pump_t *p) {
    return ring_final_check(&p->ring, RSP_EVENT, front_unconsumed);
}

static int64_t netfront_rx_work(pump_t *p) { return netfront_rx_batch(p); }

/* LateEoi.serve: `work` while it finds some (> 0; < 0 ends the loop with that code); then
 * `final_check` (arms our event index; < 0: the peer broke the ring) and sleep on our
 * doorbell, spinning first on `has_work` after work; a rung wakeup that finds nothing is
 * slowed down. */
static int serve(pump_t *p, int64_t (*work)(pump_t *), int64_t (*final_check)(pump_t *),
                 int (*has_work)(void *), const char *broken) {
    int rung = 0, worked = 0;
    while (!p->stopping) {
        int64_t done = work(p);
        if (done < 0)
            return (int)-done;
        if (done > 0) {
            p->eoi.run = 0;
            rung = 0;
            worked = 1;
            continue;
        }
        if (rung)
            pause_unless(p->stop_fd, late_eoi_idle(&p->eoi));
        int64_t more = final_check(p);
        if (more < 0) {
            say(p, broken);
            return PUMP_BROKEN;
        }
        rung = !more && !p->stopping && sleep_on_bell(p, worked, has_work);
        worked = 0;
    }
    return PUMP_STOPPED;
}

static int run_netback_tx(pump_t *p) {
    return serve(p, netback_tx_work, tx_final_check, tx_has_requests, "impossible req_prod");
}

/* RxPath._loop_once, looped. */
static int run_netback_rx(pump_t *p) {
    int worked = 0, rung = 0;
    while (!p->stopping) {
        uint32_t taken = p->ring.cons;
        int r = netback_rx_fill(p);
        if (r < 0)
            return -r;
        if (p->held_len < RX_NEED) {
            if (p->ring.cons != taken)
                p->eoi.run = 0;
            else if (rung) /* woken for no new buffer */
                pause_unless(p->stop_fd, late_eoi_idle(&p->eoi));
            int64_t more = ring_final_check(&p->ring, REQ_EVENT, back_unconsumed);
            if (more < 0) {
                say(p, "impossible req_prod");
                return PUMP_BROKEN;
            }
            rung = !more && !p->stopping && sleep_on_bell(p, worked, back_has_requests);
            worked = 0;
            continue;
        }
        rung = 0;
        int ready = wait_tap(p, worked);
        if (ready < 0)
            return PUMP_IOERROR;
        if (!ready)
            continue;
        int frames = 0;
        while (frames < BUDGET && !p->stopping) {
            if ((r = netback_rx_fill(p)) < 0)
                break;
            if (p->held_len < RX_NEED || (r = netback_rx_receive(p)) <= 0)
                break;
            frames++;
        }
        if (frames && ring_push(&p->ring, RSP_PROD, RSP_EVENT))
            bell_ring(&p->peer);
        if (r < 0)
            return -r;
        worked = frames > 0;
    }
    return PUMP_STOPPED;
}

/* TxPath._run (netfront). */
static int run_netfront_tx(pump_t *p) {
    int rung = 0, worked = 0;
    while (!p->stopping) {
        int r = netfront_tx_reap(p);
        if (r < 0)
            return -r;
        if (r)
            p->eoi.run = 0;
        else if (rung)
            pause_unless(p->stop_fd, late_eoi_idle(&p->eoi));
        rung = 0;
        if (p->nfree < RX_NEED || front_free(&p->ring) < RX_NEED + 1) {
            int64_t more = ring_final_check(&p->ring, RSP_EVENT, front_unconsumed);
            if (more < 0) {
                say(p, "impossible rsp_prod");
                return PUMP_BROKEN;
            }
            if (!more)
                rung = sleep_on_bell(p, worked, front_has_responses);
            continue;
        }
        int ready = wait_tap(p, worked);
        if (ready < 0)
            return PUMP_IOERROR;
        if (!ready)
            continue;
        int sent = netfront_tx_send(p);
        if (sent < 0)
            return -sent;
        worked = sent > 0;
    }
    return PUMP_STOPPED;
}

static int run_netfront_rx(pump_t *p) {
    return serve(p, netfront_rx_work, front_final_check, front_has_responses,
                 "impossible rsp_prod");
}

/* -- one loop per queue: tx and rx served by one thread (issue 13) -------------------------
 *
 * A queue's two pumps of one side (netback tx and rx, or netfront tx and rx) share the TAP
 * queue, and each half's work makes the other's: netback tx's write of the frontend's frames
 * to the TAP makes the peer's ACKs in the same softirq, and netfront rx's write of received
 * frames makes the workload's next transmission. With a thread per pump, each such frame
 * wakes the other thread (20-100 us across the two vCPUs here). One loop does both halves in
 * turn, reading the TAP whenever the other half has worked, and sleeps in one poll on both
 * doorbells' FIFOs and the TAP (channels/doorbell.py); it wakes only when neither half has
 * work. Each pump keeps its own ring, counters, late EOI and stop descriptor; the loop returns
 * when either ends, saying which (`*which`: 0 tx, 1 rx), and Python carries on from there
 * (channels/pumps.py's QueueLoop).
 *
 * Late EOI here masks a doorbell instead of pausing: a rung wakeup that found no work for its
 * half keeps that doorbell out of the poll for LateEoi's wait, so a peer storming one doorbell
 * slows down only what that doorbell announces, and the other half and the TAP are served. */

typedef struct {
    int rung;       /* the last poll found this doorbell rung */
    uint64_t until; /* out of the poll until then (0: in it) */
} mask_t;

/* After a half's turn: work resets its late EOI (LateEoi.worked); a rung wakeup that found none
 * keeps its doorbell out of the poll for LateEoi.idle's wait. */
static void mask_after(mask_t *m, late_eoi_t *eoi, int worked) {
    if (worked) {
        eoi->run = 0;
        m->rung = 0;
    } else if (m->rung) {
        uint64_t ns = late_eoi_idle(eoi);
        m->until = ns ? now_ns() + ns : 0;
        m->rung = 0;
    }
}

/* Add `bell` to the poll unless masked (then shorten the timeout to the mask's end). */
static int poll_bell(struct pollfd *fds, int *n, const bell_t *bell, const mask_t *m,
                     uint64_t now, uint64_t *timeout) {
    if (m->until > now) {
        if (m->until - now < *timeout)
            *timeout = m->until - now;
        return -1;
    }
    fds[*n] = (struct pollfd){.fd = bell->fd, .events = POLLIN};
    return (*n)++;
}

typedef struct {
    pump_t *tx, *rx;
    mask_t txm, rxm;
    int need_bell[2]; /* which doorbells the idle half waits on */
    int tap;          /* and whether it waits for the TAP */
} queue_t;

/* Sleep until a doorbell the halves wait on rings, the TAP is readable (if waited for), or a
 * stop; the spin window is tx's. -1 (and why in tx) if poll fails. */
static int queue_wait(queue_t *q) {
    struct pollfd fds[5];
    int n = 0, itx = -1, irx = -1;
    uint64_t now = now_ns(), timeout = HEAL_NS;
    if (q->need_bell[0])
        itx = poll_bell(fds, &n, &q->tx->mine, &q->txm, now, &timeout);
    if (q->need_bell[1])
        irx = poll_bell(fds, &n, &q->rx->mine, &q->rxm, now, &timeout);
    if (q->tap)
        fds[n++] = (struct pollfd){.fd = q->rx->tap_fd, .events = POLLIN};
    fds[n++] = (struct pollfd){.fd = q->tx->stop_fd, .events = POLLIN};
    fds[n++] = (struct pollfd){.fd = q->rx->stop_fd, .events = POLLIN};
    int got = poll(fds, (nfds_t)n, (int)((timeout + 999999) / 1000000));
    if (got < 0 && errno != EINTR) {
        say(q->tx, strerror(errno));
        return -1;
    }
    spin_slept(&q->tx->spin, now_ns() - now);
    if (got == 0) { /* a count left without its byte goes (channels/doorbell.py) */
        if (itx >= 0)
            bell_consume(&q->tx->mine);
        if (irx >= 0)
            bell_consume(&q->rx->mine);
    }
    if (got > 0 && itx >= 0 && fds[itx].revents & POLLIN) {
        bell_consume(&q->tx->mine);
        q->txm.rung = 1;
        ring_count(&q->tx->ring, RF_WAKEUPS, 1);
    }
    if (got > 0 && irx >= 0 && fds[irx].revents & POLLIN) {
        bell_consume(&q->rx->mine);
        q->rxm.rung = 1;
        ring_count(&q->rx->ring, RF_WAKEUPS, 1);
    }
    return 0;
}

/* Spin up to the window after work (spin_then_wait's, before arming: nothing need ring for
 * what the spin finds); 1 if `has_work(q)` turned true. */
static int queue_spin(queue_t *q, int (*has_work)(queue_t *)) {
    spin_t *s = &q->tx->spin;
    uint64_t until = now_ns() + s->window;
    while (now_ns() < until && !q->tx->stopping && !q->rx->stopping) {
        if (has_work(q)) {
            spin_grow(s);
            return 1;
        }
        cpu_relax();
    }
    return 0;
}

static int netback_queue_has_work(queue_t *q) {
    return tx_has_requests(q->tx) ||
           (q->rx->held_len < RX_NEED ? back_has_requests(q->rx) : readable(q->rx->tap_fd));
}

/* Both halves of a netback queue: run_netback_tx's serve and run_netback_rx, in one loop. */
static int run_netback_queue(pump_t *tx, pump_t *rx, int *which) {
    queue_t q = {.tx = tx, .rx = rx};
    int worked = 0;
    while (!tx->stopping && !rx->stopping) {
        int64_t sent = netback_tx_work(tx);
        if (sent < 0)
            return *which = 0, (int)-sent;
        mask_after(&q.txm, &tx->eoi, sent > 0);
        uint32_t taken = rx->ring.cons;
        int r = netback_rx_fill(rx), frames = 0;
        while (r >= 0 && frames < BUDGET && rx->held_len >= RX_NEED &&
               (r = netback_rx_receive(rx)) > 0) {
            frames++;
            r = netback_rx_fill(rx);
        }
        if (frames && ring_push(&rx->ring, RSP_PROD, RSP_EVENT))
            bell_ring(&rx->peer);
        if (r < 0)
            return *which = 1, -r;
        int filled = rx->ring.cons != taken;
        mask_after(&q.rxm, &rx->eoi, filled || frames);
        if (sent > 0 || filled || frames) {
            worked = 1;
            continue;
        }
        int need_buffers = rx->held_len < RX_NEED;
        if (worked && tx->spin.window && queue_spin(&q, netback_queue_has_work)) {
            worked = 0;
            continue;
        }
        worked = 0;
        int64_t more = tx_final_check(tx);
        if (more < 0) {
            say(tx, "impossible req_prod");
            return *which = 0, PUMP_BROKEN;
        }
        if (!more && need_buffers &&
            (more = ring_final_check(&rx->ring, REQ_EVENT, back_unconsumed)) < 0) {
            say(rx, "impossible req_prod");
            return *which = 1, PUMP_BROKEN;
        }
        if (more || tx->stopping || rx->stopping)
            continue;
        q.need_bell[0] = 1;
        q.need_bell[1] = need_buffers;
        q.tap = !need_buffers;
        if (queue_wait(&q) < 0)
            return *which = 0, PUMP_IOERROR;
    }
    return *which = tx->stopping ? 0 : 1, PUMP_STOPPED;
}

static int netfront_tx_has_room(const pump_t *tx) {
    return tx->nfree >= RX_NEED && front_free(&tx->ring) >= RX_NEED + 1;
}

static int netfront_queue_has_work(queue_t *q) {
    return front_has_responses(q->rx) || front_has_responses(q->tx) ||
           (netfront_tx_has_room(q->tx) && readable(q->tx->tap_fd));
}

/* Both halves of a netfront queue: run_netfront_tx and run_netfront_rx, in one loop. */
static int run_netfront_queue(pump_t *tx, pump_t *rx, int *which) {
    queue_t q = {.tx = tx, .rx = rx};
    int worked = 0;
    while (!tx->stopping && !rx->stopping) {
        int reaped = netfront_tx_reap(tx), sent = 0;
        if (reaped < 0)
            return *which = 0, -reaped;
        mask_after(&q.txm, &tx->eoi, reaped);
        if (netfront_tx_has_room(tx) && (sent = netfront_tx_send(tx)) < 0)
            return *which = 0, -sent;
        int got = netfront_rx_batch(rx);
        if (got < 0)
            return *which = 1, -got;
        mask_after(&q.rxm, &rx->eoi, got);
        if (reaped || sent || got) {
            worked = 1;
            continue;
        }
        int room = netfront_tx_has_room(tx);
        if (worked && tx->spin.window && queue_spin(&q, netfront_queue_has_work)) {
            worked = 0;
            continue;
        }
        worked = 0;
        int64_t more = front_final_check(rx);
        if (more < 0) {
            say(rx, "impossible rsp_prod");
            return *which = 1, PUMP_BROKEN;
        }
        if (!more && !room && (more = front_final_check(tx)) < 0) {
            say(tx, "impossible rsp_prod");
            return *which = 0, PUMP_BROKEN;
        }
        if (more || tx->stopping || rx->stopping)
            continue;
        q.need_bell[0] = !room; /* with room, tx waits for eth0, not for its answers */
        q.need_bell[1] = 1;
        q.tap = room;
        if (queue_wait(&q) < 0)
            return *which = 0, PUMP_IOERROR;
    }
    return *which = tx->stopping ? 0 : 1, PUMP_STOPPED;
}

#ifndef HYPER_FUZZ
#include "netpump_py.h"
#endif
