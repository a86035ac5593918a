/* libFuzzer target for fusepump.c: its parsers of what it reads, under ASan and UBSan. Built by
 * channels/native/fuzz/run.sh as target FUSEFRONT.
 *
 * One call serves a few FUSE messages as the reader would after readv (serve_message: the
 * kernel's requests, trusted, but parsed all the same), which puts READs and WRITEs on the
 * ring, then takes the responses a hostile backend wrote (take_responses via reap_once: copied,
 * checked, their transfers answered) until none are left, and maybe resets the ring as after a
 * backend restart. Replies go to /dev/null.
 *
 * The input:
 *   u8 mode (bit 0: take rsp_prod from the input, else publish exactly the responses; bit 1:
 *      a read-only disk; bit 2: not initialised yet; bit 3: reset after the responses;
 *      bit 4: 11 segments per request, else 256 through indirect pages),
 *   u32 rsp_prod,
 *   u8 messages (at most MESSAGES), each: u16 length, then that many bytes (at most the header
 *      room and two pages: as if read into the head and the landing),
 *   u8 n, then n responses (16 bytes each) written from rsp_cons on.
 */
#define _GNU_SOURCE
#define HYPER_FUZZ 1
#include "../fusepump.c"

#define NR_ENTS 32 /* a one-page blkif ring */
#define POOL_PAGES 1024
#define MESSAGES 8
#define MAX_READ_PAGES 16 /* READs the pool can always hold, so begin never waits */
#define SECTORS 4096

static uint8_t ring_area[PAGE_SIZE] __attribute__((aligned(64)));
static uint8_t *data_pool, *indirect_pool;
static part_t parts[NR_ENTS];
static uint32_t free_ids[NR_ENTS], free_xfers[NR_ENTS];
static xfer_t xfers[NR_ENTS];
static uint16_t xfer_pages[NR_ENTS][MAX_PAGES];
static uint16_t free_pages[POOL_PAGES];
static sem_t bell_sems[2];
static bell_t bells[2] = {{&bell_sems[0], -1}, {&bell_sems[1], -1}}; /* FIFOs: pipes' write ends */
static bell_t drains[2] = {{&bell_sems[0], -1}, {&bell_sems[1], -1}}; /* their read ends */
static int sink = -1;

static size_t take(const uint8_t **data, size_t *size, void *out, size_t want) {
    size_t n = *size < want ? *size : want;
    memcpy(out, *data, n);
    *data += n, *size -= n;
    return n;
}

static void setup(front_t *f, uint8_t mode) {
    memset(f, 0, sizeof *f);
    memset(ring_area, 0, sizeof ring_area);
    ((uint32_t *)ring_area)[REQ_EVENT] = ((uint32_t *)ring_area)[RSP_EVENT] = 1;
    f->ring = (ring_t){(volatile uint32_t *)ring_area, ring_area + RING_HEADER, NR_ENTS,
                       NR_ENTS - 1, BLK_SLOT, 0, 0, 0, 0, NULL};
    f->data = data_pool;
    f->npages = POOL_PAGES;
    f->data_gref = 8;
    f->indirect = indirect_pool;
    f->indirect_gref = 8 + POOL_PAGES;
    f->size = (uint64_t)SECTORS * SECTOR_SIZE;
    f->max_segments = mode & 16 ? MAX_SEGMENTS : MAX_PAGES;
    f->readonly = !!(mode & 2);
    f->initialized = !(mode & 4);
    f->max_read = MAX_READ_PAGES * PAGE_SIZE;
    f->fuse_fd = f->stop_fd = sink;
    f->mine = bells[0];
    f->peer = bells[1];
    pthread_mutex_init(&f->lock, NULL);
    pthread_cond_init(&f->room, NULL);
    f->parts = parts;
    f->xfers = xfers;
    f->free_ids = free_ids;
    f->free_xfers = free_xfers;
    f->free_pages = free_pages;
    memset(parts, 0, sizeof parts);
    for (uint32_t i = 0; i < NR_ENTS; i++) {
        xfers[i] = (xfer_t){.pages = xfer_pages[i]};
        free_ids[i] = NR_ENTS - 1 - i;
        free_xfers[i] = i;
    }
    f->nfree_ids = f->nfree_xfers = NR_ENTS;
    for (uint32_t i = 0; i < POOL_PAGES; i++)
        free_pages[i] = (uint16_t)(POOL_PAGES - 1 - i);
    f->nfree_pages = POOL_PAGES;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (sink < 0) {
        sink = open("/dev/null", O_WRONLY | O_CLOEXEC);
        data_pool = malloc((size_t)POOL_PAGES * PAGE_SIZE); /* malloc: ASan guards both ends */
        indirect_pool = malloc((size_t)NR_ENTS * PAGE_SIZE);
        for (int i = 0; i < 2; i++) {
            int fifo[2];
            sem_init(&bell_sems[i], 0, 0);
            if (pipe2(fifo, O_NONBLOCK) == 0)
                bells[i].fd = fifo[1], drains[i].fd = fifo[0];
        }
    }
    front_t f;
    uint8_t mode = 0, messages = 0, n = 0;
    uint32_t rsp_prod = 0;
    take(&data, &size, &mode, 1);
    take(&data, &size, &rsp_prod, 4);
    setup(&f, mode);
    take(&data, &size, &messages, 1);
    for (uint32_t m = 0; m < messages % (MESSAGES + 1); m++) {
        uint16_t length = 0;
        take(&data, &size, &length, 2);
        length %= HEAD_ROOM + 2 * PAGE_SIZE + 1;
        landing_fill(&f);
        uint32_t head = length < HEAD_ROOM ? length : HEAD_ROOM;
        uint32_t got = (uint32_t)take(&data, &size, f.head, head);
        for (uint32_t i = 0, more = 1; got < length && more; i++)
            got += more = (uint32_t)take(&data, &size, page_at(&f, f.landing[i]),
                                         length - got < PAGE_SIZE ? length - got : PAGE_SIZE);
        if (got)
            serve_message(&f, got);
    }
    take(&data, &size, &n, 1);
    for (uint32_t i = 0; i < n; i++)
        take(&data, &size, ring_slot(&f.ring, f.ring.cons + i), BLK_RSP);
    ((uint32_t *)ring_area)[RSP_PROD] = mode & 1 ? rsp_prod : f.ring.cons + n;
    for (int round = 0; round < 4 && reap_once(&f) > 0; round++)
        ;
    if (mode & 8)
        reset(&f);
    uint32_t done[1024];
    uint32_t failed = fail_all(&f, "end of input", done);
    finish(&f, done, failed);
    bell_consume(&drains[0]);
    bell_consume(&drains[1]);
    pthread_mutex_destroy(&f.lock);
    pthread_cond_destroy(&f.room);
    return 0;
}
