/* libFuzzer targets for netpump.c: every parser of memory a peer writes, under ASan and UBSan.
 *
 * Built by channels/native/fuzz/run.sh, once per pump (-DTARGET=...):
 *   NETBACK_TX   tx slots, grant entries and page contents a frontend wrote
 *   NETBACK_RX   rx slots and grant entries a frontend wrote; a frame the host TAP gave
 *   NETFRONT_TX  tx responses a backend wrote
 *   NETFRONT_RX  rx responses and page contents a backend wrote
 * The input is what the peer wrote (below); one call of the pump's batch step runs over it, as
 * after a wakeup; the "TAP" is /dev/null for writes and a socket pair holding the input's tail
 * for reads.
 */
#define _GNU_SOURCE
#define HYPER_FUZZ 1
#include "../netpump.c"

#include <sys/socket.h>

#define POOL_PAGES 1 /* one page: a read past it meets ASan's redzone at once */
#define GREF_BASE 8

static uint8_t ring_area[PAGE_SIZE] __attribute__((aligned(64)));
static uint8_t pool[(1 + POOL_PAGES) * PAGE_SIZE] __attribute__((aligned(4096)));
static uint8_t front_pages[32 * PAGE_SIZE];
static uint32_t front_grefs[32], free_stack[33 + 256], slot_page[256];
static uint8_t in_flight[33], checked[2][POOL_PAGES * 5];
static sem_t bell_sem;
static bell_t bell = {&bell_sem, -1}; /* its FIFO: a pipe's write end */
static bell_t drain = {&bell_sem, -1}; /* the same, through the read end */
static int devnull = -1, tap[2] = {-1, -1};

static size_t take(const uint8_t **data, size_t *size, void *out, size_t want) {
    size_t n = *size < want ? *size : want;
    memcpy(out, *data, n);
    *data += n, *size -= n;
    return n;
}

/* The input, compact so that the fuzzer reaches deep states quickly:
 *   u8 mode (bit 0: take the producer index from the input, else publish exactly the slots),
 *   u32 cons, prod_pvt, pushed (where our side is), u32 producer index,
 *   backends: POOL_PAGES grant entries (8 bytes each),
 *   u8 n, then n slots of the ring's slot size, written from the consumer index on,
 *   the rest: the pages' first bytes, in turns of up to 256 bytes (and, for netback rx, the
 *   frame the host TAP gives, virtio-net header first). */
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (devnull < 0) {
        devnull = open("/dev/null", O_WRONLY);
        sem_init(&bell_sem, 0, 0);
        int fifo[2];
        if (pipe2(fifo, O_NONBLOCK) == 0)
            bell.fd = fifo[1], drain.fd = fifo[0];
        socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK, 0, tap);
    }
    memset(ring_area, 0, sizeof ring_area);
    memset(checked, 0, sizeof checked);
    pump_t p;
    memset(&p, 0, sizeof p);
    uint64_t figures[RF_N] = {0}; /* the ring's figures, counted as a worker's are */
    int kind = TARGET;
    uint32_t slot = kind == NETBACK_TX || kind == NETFRONT_TX ? TX_SLOT : RX_SLOT, nr = 256;
    uint8_t mode = 0, n = 0;
    uint32_t idx[4] = {0, 0, 0, 0};
    take(&data, &size, &mode, 1);
    take(&data, &size, idx, sizeof idx);
    p.ring = (ring_t){(volatile uint32_t *)ring_area, ring_area + RING_HEADER, nr, nr - 1, slot,
                      idx[0], idx[1], idx[2], 0, figures};
    p.eoi.fig = figures;
    p.counters = p.scratch;
    p.mine = p.peer = bell;
    p.stop_fd = devnull;
    p.tap_fd = devnull;
    memcpy(p.mac, "\x00\x16\x3e\x00\x00\x01", 6);
    memcpy(p.ipv4, "\x0a\x00\x00\x02", 4);
    p.has_ipv4 = p.check_sources = 1;
    p.gso = 1;
    int backend = kind == NETBACK_TX || kind == NETBACK_RX;
    uint8_t *pages;
    uint32_t npages;
    if (backend) {
        memset(pool, 0, PAGE_SIZE);
        take(&data, &size, pool, POOL_PAGES * 8);
        p.grants.n = 1;
        p.grants.pool[0] = (pool_t){pool, GREF_BASE, POOL_PAGES, PAGE_SIZE,
                                    {checked[0], checked[1]}};
        pages = pool + PAGE_SIZE, npages = POOL_PAGES;
    } else {
        for (uint32_t i = 0; i < 32; i++)
            front_grefs[i] = GREF_BASE + i, free_stack[i] = i;
        for (uint32_t i = 0; i < 256; i++)
            slot_page[i] = i % 32;
        memset(in_flight, 1, sizeof in_flight); /* every page is out: any id may be answered */
        p.pages = front_pages, p.npages = 32, p.grefs = front_grefs;
        p.free_stack = free_stack, p.nfree = 0, p.in_flight = in_flight;
        p.slot_page = slot_page;
        pages = front_pages, npages = 32;
    }
    take(&data, &size, &n, 1);
    for (uint32_t i = 0; i < n; i++)
        take(&data, &size, ring_area + RING_HEADER + ((idx[0] + i) & (nr - 1)) * slot, slot);
    uint32_t prod = mode & 1 ? idx[3] : idx[0] + n;
    uint32_t *header = (uint32_t *)ring_area;
    header[backend ? REQ_PROD : RSP_PROD] = prod;
    if (!backend) /* a frontend published as many requests as the backend may answer */
        p.ring.pushed = mode & 2 ? idx[2] : idx[0] + n, p.ring.prod_pvt = p.ring.pushed;
    for (uint32_t i = 0; size && i < npages; i++) {
        memset(pages + (size_t)i * PAGE_SIZE, 0xab, PAGE_SIZE);
        take(&data, &size, pages + (size_t)i * PAGE_SIZE, kind == NETBACK_RX ? 0 : 256);
    }
    switch (kind) {
    case NETBACK_TX:
        netback_tx_work(&p);
        break;
    case NETBACK_RX:
        if (size) /* the rest is one frame from the host TAP, virtio-net header first */
            (void)!send(tap[1], data, size > 65536 ? 65536 : size, 0);
        p.tap_fd = tap[0];
        if (netback_rx_fill(&p) == 0 && p.held_len >= RX_NEED)
            netback_rx_receive(&p);
        while (recv(tap[0], pool + PAGE_SIZE, PAGE_SIZE, MSG_DONTWAIT) > 0) /* empty the TAP */
            ;
        break;
    case NETFRONT_TX:
        netfront_tx_reap(&p);
        break;
    default:
        netfront_rx_batch(&p);
    }
    bell_consume(&drain);
    return 0;
}
