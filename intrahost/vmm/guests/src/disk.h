/*
 * disk.h - the disk guest's ABI: its memory layout, status page, block format, exit codes
 * and report tags. The host side mirrors these in intrahost/vmm/guests/layout.py and
 * docs/guests.md describes them; a test checks that the two agree. Change all three together.
 */
#ifndef DISK_H
#define DISK_H

/* Exit codes (common.inc has the guests' shared ones; these are the disk guest's). */
#define EXIT_OK             0
#define EXIT_BAD_CMDLINE    1
#define EXIT_NO_MEMORY      2
#define EXIT_NO_DEVICE      6
#define EXIT_DEVICE_ERROR   7
#define EXIT_IO_ERROR       8
#define EXIT_VERIFY_FAILED  9

/* Report tags. */
#define TAG_ERROR           7
#define TAG_DISK_WRITES     8
#define TAG_DISK_READS      9
#define TAG_DISK_VERIFY_FAILURES 10
#define TAG_DISK_IO_ERRORS  11

/* Memory layout (guest-physical). */
#define DISK_STATUS_ADDR    0x200000    /* the status page */
#define DISK_QUEUE_ADDR     0x300000    /* descriptor table; avail ring +0x1000; used ring +0x2000 */
#define DISK_REQUESTS_ADDR  0x303000    /* per slot: 16-byte request header, status byte at +16 */
#define DISK_REQUEST_SIZE   32
#define DISK_BUFFERS_ADDR   0x400000    /* per slot: one 4 KiB data buffer */
#define DISK_SEQ_TABLE_ADDR 0x800000    /* u64 per block: last sequence seen complete, 0 = none */

/* Status page: u64 fields at these offsets. */
#define ST_MAGIC            0           /* "IHDISK01", written last */
#define STATUS_MAGIC        0x31304B5349444849ull  /* "IHDISK01" */
#define ST_STATE            8           /* DISK_STATE_* */
#define ST_EXIT_CODE        16          /* the exit code, once finished or failed */
#define ST_DEVICE_BASE      24          /* the device's MMIO base */
#define ST_CAPACITY         32          /* device capacity, 512-byte sectors */
#define ST_BLOCKS           40          /* 4 KiB blocks written round-robin */
#define ST_INFLIGHT         48          /* inflight= */
#define ST_FLUSH            56          /* flush= (0 when the device has no flush) */
#define ST_VERIFY           64          /* verify= */
#define ST_LIMIT            72          /* limit= */
#define ST_PROGRESS         80          /* progress= */
#define ST_GENERATION       88          /* this run's generation, in every block it writes */
#define ST_QUEUE_SIZE       96          /* virtqueue size */
#define ST_FEATURES         104         /* features the driver accepted */
#define ST_WRITES_SUBMITTED 112         /* = the highest sequence number submitted */
#define ST_WRITES_COMPLETED 120
#define ST_READS_COMPLETED  128         /* verify reads */
#define ST_VERIFY_FAILURES  136
#define ST_FLUSHES          144         /* flushes completed */
#define ST_IO_ERRORS        152         /* requests completed with a status other than OK */
#define ST_MAX_COMPLETED    160         /* highest sequence number seen complete */
#define ST_DURABLE          168         /* every sequence <= this was complete before a flush completed */
#define ST_TSC_START        176         /* TSC when the workload started */
#define ST_TSC_NOW          184         /* TSC at the latest progress line / the end */
#define ST_KICKS            192         /* queue notifications written */
#define ST_LAST_FAILURE     200         /* block of the latest verify failure + 1; 0 = none */
#define ST_MAX_COMPLETION_GAP 208       /* largest TSC gap between two reaps that found completions */
#define ST_MAX_LOOP_GAP     216         /* largest TSC gap between two turns of the main loop */
#define ST_DUPLICATES       224         /* used-ring entries for a request not in flight */
#define ST_BENCH            232         /* bench= (BENCH_*) */
#define ST_SIZE             256

#define DISK_STATE_STARTING 0
#define DISK_STATE_RUNNING  1
#define DISK_STATE_FINISHED 2
#define DISK_STATE_FAILED   3

/* bench=: the verified workload, or random 4 KiB writes or reads (no verification). */
#define BENCH_NONE          0
#define BENCH_RANDWRITE     1
#define BENCH_RANDREAD      2

/* The 4 KiB block the guest writes: a header, then payload words. */
#define BLOCK_SIZE          4096
#define BLK_MAGIC           0           /* u64 "IHDSKBLK" */
#define BLOCK_MAGIC         0x4B4C424B53444849ull  /* "IHDSKBLK" */
#define BLK_GENERATION      8
#define BLK_BLOCK           16
#define BLK_SEQ             24
#define BLK_BLOCKS          32          /* the run's block count: seq s goes to block (s-1) % blocks */
#define BLK_CRC             40          /* u32: zlib CRC-32 of the block with these 4 bytes zero */
#define BLK_HEADER_SIZE     64          /* 44..63 are zero */
/* Payload word i (8 <= i < 512) = generation ^ (seq * PAYLOAD_MUL_SEQ + i * PAYLOAD_MUL_WORD). */
#define PAYLOAD_MUL_SEQ     0x9E3779B97F4A7C15ull
#define PAYLOAD_MUL_WORD    0xD6E8FEB86659FD93ull

/* Defaults of the command line keys. */
#define DEFAULT_INFLIGHT    8
#define DEFAULT_FLUSH       64
#define DEFAULT_VERIFY      1
#define DEFAULT_PROGRESS    65536

#endif
