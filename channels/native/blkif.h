/* blkif's wire format (io/blkif.h; channels/blkif.py), for blkback's pump and blkfront's. */
#ifndef HYPER_BLKIF_H
#define HYPER_BLKIF_H

#define BLK_SLOT 112
#define BLK_RSP 16 /* id u64, operation u8, pad, status s16, pad u32 */
#define BLKIF_OP_READ 0
#define BLKIF_OP_WRITE 1
#define BLKIF_OP_FLUSH_DISKCACHE 3
#define BLKIF_OP_DISCARD 5
#define BLKIF_OP_INDIRECT 6
#define BLKIF_RSP_EOPNOTSUPP (-2)
#define BLKIF_RSP_ERROR (-1)
#define BLKIF_RSP_OKAY 0
#define MAX_SEGMENTS 11
#define SEG_SIZE 8 /* gref u32, first_sect u8, last_sect u8, pad u16 */
#define SECTOR_SIZE 512u
#define SECTORS_PER_PAGE 8u

#endif
