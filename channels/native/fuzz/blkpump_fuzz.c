/* libFuzzer target for blkpump.c: every parser of memory a frontend writes (request slots,
 * grant entries, indirect pages), under ASan and UBSan. Built by channels/native/fuzz/run.sh
 * as target BLKBACK.
 *
 * One call is one batch of the dispatcher, as after a wakeup: the requests published are taken
 * (blk_take: copied, checked, their grefs looked up), the refused ones answered, and the good
 * ones' I/O done at once with preadv/pwritev (blk_execute, what the inline path and AIO do with
 * the same iovecs) on a memfd standing for the device, then answered. The pool is one granted
 * page, so an iovec or a descriptor read past it meets ASan's redzone.
 *
 * The input, compact so that the fuzzer reaches deep states quickly:
 *   u8 mode (bit 0: take req_prod from the input, else publish exactly the slots; bit 1: a
 *      read-only vbd; bit 2: a device of 2**64 - 1 sectors, else 64),
 *   u32 req_cons, rsp_prod_pvt, rsp_prod (where our side is), u32 req_prod,
 *   POOL_PAGES grant entries (8 bytes each),
 *   u8 n, then n request slots (112 bytes each) written from req_cons on,
 *   the rest: the pool page's first bytes (an indirect page's descriptors), up to 2048.
 */
#define _GNU_SOURCE
#define HYPER_FUZZ 1
#include "../blkpump.c"

#include <sys/mman.h>

#define POOL_PAGES 1
#define GREF_BASE 8
#define NR_ENTS 32 /* a one-page blkif ring */
#define JOBS 32
#define DEVICE_SECTORS 64

static uint8_t ring_area[PAGE_SIZE] __attribute__((aligned(64)));
static uint8_t *pool; /* its grant table page, then its one data page: mapped exactly */
static uint8_t checked[2][POOL_PAGES * 5];
static job_t jobs[JOBS];
static int device = -1;

static size_t take(const uint8_t **data, size_t *size, void *out, size_t want) {
    size_t n = *size < want ? *size : want;
    memcpy(out, *data, n);
    *data += n, *size -= n;
    return n;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (device < 0) {
        device = memfd_create("blkpump-fuzz-device", MFD_CLOEXEC);
        pool = malloc((1 + POOL_PAGES) * PAGE_SIZE); /* malloc: ASan guards both ends */
    }
    if (ftruncate(device, 0) < 0 || ftruncate(device, DEVICE_SECTORS * SECTOR_SIZE) < 0)
        abort(); /* a fresh device each run: no write far out keeps its pages */
    memset(ring_area, 0, sizeof ring_area);
    memset(checked, 0, sizeof checked);
    memset(pool, 0, (1 + POOL_PAGES) * PAGE_SIZE);
    blk_t b;
    memset(&b, 0, sizeof b);
    uint64_t figures[RF_N] = {0}; /* the ring's figures, counted as a worker's are */
    uint8_t mode = 0, n = 0;
    uint32_t idx[4] = {0, 0, 0, 0};
    take(&data, &size, &mode, 1);
    take(&data, &size, idx, sizeof idx);
    b.ring = (ring_t){(volatile uint32_t *)ring_area, ring_area + RING_HEADER, NR_ENTS,
                      NR_ENTS - 1, BLK_SLOT, idx[0], idx[1], idx[2], 0, figures};
    b.eoi.fig = figures;
    b.counters = b.scratch;
    b.fd = device;
    b.readonly = !!(mode & 2);
    b.sectors = mode & 4 ? UINT64_MAX : DEVICE_SECTORS;
    b.jobs = jobs;
    take(&data, &size, pool, POOL_PAGES * 8);
    b.grants.n = 1;
    b.grants.pool[0] = (pool_t){pool, GREF_BASE, POOL_PAGES, PAGE_SIZE, {checked[0], checked[1]}};
    take(&data, &size, &n, 1);
    for (uint32_t i = 0; i < n; i++)
        take(&data, &size, ring_slot(&b.ring, idx[0] + i), BLK_SLOT);
    ((uint32_t *)ring_area)[REQ_PROD] = mode & 1 ? idx[3] : idx[0] + n;
    take(&data, &size, pool + PAGE_SIZE, 2048);

    int64_t avail = back_unconsumed(&b.ring);
    if (avail <= 0)
        return 0;
    uint32_t go[JOBS];
    refusal_t refused[JOBS];
    int ngo, nrefused;
    for (uint32_t i = 0; i < JOBS; i++)
        go[i] = i;
    blk_take(&b, avail < JOBS ? avail : JOBS, go, &ngo, refused, &nrefused);
    for (int i = 0; i < nrefused; i++)
        blk_respond(&b, refused[i].id, refused[i].op, refused[i].status);
    for (int i = 0; i < ngo; i++)
        blk_complete(&b, &jobs[go[i]], blk_execute(&b, &jobs[go[i]]));
    blk_push(&b);
    return 0;
}
