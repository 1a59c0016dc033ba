/*
 * disk.c - the built-in disk guest: a polling virtio-blk driver (virtio-mmio, version 2,
 * one split virtqueue) and a write/verify workload, all at CPL3.
 *
 * disk_main finds the first virtio-blk device among the command line's
 * `virtio_mmio.device=SIZE@BASE:IRQ` entries, negotiates VERSION_1 (and FLUSH when offered),
 * sets up queue 0 and then loops: it writes 4 KiB blocks round-robin over the disk (sequence
 * number s goes to block (s - 1) % blocks), each with a header (magic, generation, block,
 * sequence, block count, CRC-32) and a payload derived from them, with `inflight` requests in
 * flight; it flushes every `flush` writes and reads back one older block every `verify`
 * writes, checking it carries the last sequence seen complete there. Progress goes to the
 * status page (disk.h) and, every `progress` writes, to the UART.
 *
 * Ordering rules that the host's verifier relies on:
 * - a request is never submitted for a block that has another request in flight, so each
 *   block has at most one write the guest has not yet seen complete: the one of sequence
 *   seq_table[block] + blocks (or block + 1 if the table holds 0);
 * - seq_table[block] is stored before writes_completed counts the write;
 * - durable: a flush covers the writes seen complete before it was submitted.
 *
 * The hot loop makes no MMIO reads: it polls the used ring in memory and writes QueueNotify
 * once per batch, and only when the device has not set VIRTQ_USED_F_NO_NOTIFY.
 *
 * Gaps (for measuring a pause from inside): the largest TSC difference between two reaps that
 * found completions (the I/O blackout as the guest saw it) and between two turns of the main
 * loop (its vCPU's own stall). The host may zero either at any time to measure from then on;
 * the guest re-reads them every time.
 *
 * bench=1 (random writes) or bench=2 (random reads) replaces the workload with 4 KiB requests
 * to random blocks, `inflight` at a time, counted in writes_completed or reads_completed; the
 * data is whatever the buffers hold, and nothing is verified.
 */
#define GUEST_PREFIX "disk: "
#define GUEST_STATUS_ADDR DISK_STATUS_ADDR
#define GUEST_STATE_FAILED DISK_STATE_FAILED
#include "disk.h"
#include "cguest.h"

int disk_main(u32 mbi);

/* --- virtio-blk ----------------------------------------------------------------------- */

#define DEVICE_ID_BLOCK         2u
#define F_BLK_RO                (1ull << 5)
#define F_BLK_FLUSH             (1ull << 9)

#define BLK_T_IN                0u
#define BLK_T_OUT               1u
#define BLK_T_FLUSH             4u
#define BLK_S_OK                0u

#define DESCS_PER_SLOT          3u
#define MAX_INFLIGHT            (MAX_QUEUE / DESCS_PER_SLOT)
#define SECTORS_PER_BLOCK       (BLOCK_SIZE / 512)

struct request {
    u32 type;
    u32 reserved;
    u64 sector;
    u8 status;
};

static struct queue vq; /* queue 0, at DISK_QUEUE_ADDR */

#define REQUEST(slot) \
    ((volatile struct request *)(DISK_REQUESTS_ADDR + (u64)(slot) * DISK_REQUEST_SIZE))
#define BUFFER(slot) ((u64 *)(DISK_BUFFERS_ADDR + (u64)(slot) * BLOCK_SIZE))
#define SEQ_TABLE ((volatile u64 *)DISK_SEQ_TABLE_ADDR)

/* --- CRC-32 (zlib's: reflected polynomial 0xEDB88320), slicing by 8 --------------------- */

static u32 crc_table[8][256];

static void crc_init(void)
{
    for (u32 i = 0; i < 256; i++) {
        u32 c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[0][i] = c;
    }
    for (u32 i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xFF];
}

/* CRC-32 of a 4 KiB block (8-byte aligned). */
static u32 crc32_block(const u64 *words)
{
    u32 c = 0xFFFFFFFFu;
    for (int i = 0; i < BLOCK_SIZE / 8; i++) {
        u64 w = words[i];
        u32 one = (u32)w ^ c;
        u32 two = (u32)(w >> 32);
        c = crc_table[7][one & 0xFF] ^ crc_table[6][(one >> 8) & 0xFF] ^
            crc_table[5][(one >> 16) & 0xFF] ^ crc_table[4][one >> 24] ^
            crc_table[3][two & 0xFF] ^ crc_table[2][(two >> 8) & 0xFF] ^
            crc_table[1][(two >> 16) & 0xFF] ^ crc_table[0][two >> 24];
    }
    return ~c;
}

/* --- command line --------------------------------------------------------------------- */

static struct {
    u64 inflight, flush, verify, limit, progress, blocks, generation, bench;
    struct mmio_entry devices[MAX_DEVICES];
    int ndevices;
} cfg = {DEFAULT_INFLIGHT, DEFAULT_FLUSH, DEFAULT_VERIFY, 0, DEFAULT_PROGRESS, 0, 0, BENCH_NONE,
         {{0}}, 0};

/* parse_cmdline's handler for this guest's keys; every value is a number. */
static int cmdline_key(const char *key, u64 klen, const char *v)
{
    u64 value;
    if (!parse_value(v, &value))
        return KEY_BAD;
    if (key_is(key, klen, "inflight")) {
        cfg.inflight = value;
        return value >= 1 && value <= MAX_INFLIGHT ? KEY_OK : KEY_BAD;
    } else if (key_is(key, klen, "flush")) {
        cfg.flush = value;
    } else if (key_is(key, klen, "verify")) {
        cfg.verify = value;
    } else if (key_is(key, klen, "limit")) {
        cfg.limit = value;
    } else if (key_is(key, klen, "progress")) {
        cfg.progress = value;
        return value >= 1 ? KEY_OK : KEY_BAD;
    } else if (key_is(key, klen, "blocks")) {
        cfg.blocks = value;
    } else if (key_is(key, klen, "generation")) {
        cfg.generation = value;
    } else if (key_is(key, klen, "bench")) {
        cfg.bench = value;
        return value <= BENCH_RANDREAD ? KEY_OK : KEY_BAD;
    } else {
        return KEY_UNKNOWN;
    }
    return KEY_OK;
}

static int read_cmdline(const char *s)
{
    static const char unknown[] = "disk: error: unknown command line key (use inflight, flush, "
                                  "verify, limit, progress, blocks, generation, bench, "
                                  "virtio_mmio.device): ";
    static const char bad[] = "disk: error: bad value (inflight 1-85, progress >= 1, bench 0-2, "
                              "virtio_mmio.device=SIZE@BASE:IRQ below 4 GiB, at most 16): ";
    return parse_cmdline(s, cfg.devices, &cfg.ndevices, cmdline_key, unknown, bad);
}

/* --- the device ----------------------------------------------------------------------- */

static u64 dev;        /* MMIO base of the device in use */
static u64 features;   /* accepted */
static u32 queue_size; /* a power of two */

static u64 read_capacity(void)
{
    u32 generation, low, high;
    do {
        generation = mmio_read(dev, REG_CONFIG_GENERATION);
        low = mmio_read(dev, REG_CONFIG);
        high = mmio_read(dev, REG_CONFIG + 4);
    } while (generation != mmio_read(dev, REG_CONFIG_GENERATION));
    return ((u64)high << 32) | low;
}

/* Reset, negotiate and set up queue 0; 0 on success, else an exit code (reported). */
static int setup_device(void)
{
    u64 offered;
    const char *error = virtio_begin(dev, &offered);
    if (error)
        return fail(EXIT_DEVICE_ERROR, error);
    if (offered & F_BLK_RO)
        return fail(EXIT_DEVICE_ERROR, "the disk is read-only (VIRTIO_BLK_F_RO)");
    features = F_VERSION_1 | (offered & F_BLK_FLUSH);
    if ((error = virtio_accept(dev, features)) != 0 ||
        (error = virtio_queue_size(dev, 0, DESCS_PER_SLOT, &queue_size)) != 0)
        return fail(EXIT_DEVICE_ERROR, error);
    if (cfg.inflight > queue_size / DESCS_PER_SLOT)
        cfg.inflight = queue_size / DESCS_PER_SLOT;

    virtio_queue_setup(dev, &vq, 0, DISK_QUEUE_ADDR, queue_size);
    for (u32 slot = 0; slot < cfg.inflight; slot++) {
        volatile struct desc *d = &vq.desc[slot * DESCS_PER_SLOT];
        u64 request = DISK_REQUESTS_ADDR + slot * DISK_REQUEST_SIZE;
        d[0].addr = request;
        d[0].len = 16;
        d[0].flags = DESC_F_NEXT;
        d[0].next = (u16)(slot * DESCS_PER_SLOT + 1);
        d[1].addr = (u64)BUFFER(slot);
        d[1].len = BLOCK_SIZE;
        d[1].flags = DESC_F_NEXT;
        d[1].next = (u16)(slot * DESCS_PER_SLOT + 2);
        d[2].addr = request + 16;
        d[2].len = 1;
        d[2].flags = DESC_F_WRITE;
    }
    if ((error = virtio_driver_ok(dev)) != 0)
        return fail(EXIT_DEVICE_ERROR, error);
    return 0;
}

/* --- the workload --------------------------------------------------------------------- */

enum kind { FREE, WRITE, READ, FLUSH, BENCH_IO };

static struct {
    u8 kind;
    u64 block, seq; /* seq: the write's sequence; for a flush, the sequence it covers */
} slots[MAX_INFLIGHT];

static u32 free_slots[MAX_INFLIGHT];
static u32 nfree;
static u64 blocks, next_seq = 1, next_block, writes_since_flush, writes_since_verify;
static int flush_in_flight;
static u64 last_completion_tsc, last_loop_tsc, bench_counter = ST_WRITES_COMPLETED;

/* Record the time since *last in the status field `field` if it is the largest yet. */
static void note_gap(u64 field, u64 *last)
{
    u64 now = rdtsc();
    u64 gap = now - *last;
    if (gap > STATUS(field))
        STATUS(field) = gap;
    *last = now;
}

static int block_busy(u64 block)
{
    for (u32 i = 0; i < cfg.inflight; i++)
        if (slots[i].kind != FREE && slots[i].kind != FLUSH && slots[i].block == block)
            return 1;
    return 0;
}

/* Every write seen complete has a sequence number <= this (the oldest in flight - 1). */
static u64 completed_watermark(void)
{
    u64 low = next_seq;
    for (u32 i = 0; i < cfg.inflight; i++)
        if (slots[i].kind == WRITE && slots[i].seq < low)
            low = slots[i].seq;
    return low - 1;
}

static void fill_block(u64 *w, u64 block, u64 seq)
{
    u64 generation = cfg.generation;
    w[0] = BLOCK_MAGIC;
    w[1] = generation;
    w[2] = block;
    w[3] = seq;
    w[4] = blocks;
    w[5] = 0;
    w[6] = 0;
    w[7] = 0;
    u64 value = seq * PAYLOAD_MUL_SEQ + 8 * PAYLOAD_MUL_WORD;
    for (int i = 8; i < BLOCK_SIZE / 8; i++) {
        w[i] = generation ^ value;
        value += PAYLOAD_MUL_WORD;
    }
    w[5] = crc32_block(w);
}

/* Does the block read into w carry exactly what (block, seq) wrote? */
static int block_matches(u64 *w, u64 block, u64 seq)
{
    if (w[0] != BLOCK_MAGIC || w[1] != cfg.generation || w[2] != block || w[3] != seq ||
        w[4] != blocks || w[6] != 0 || w[7] != 0)
        return 0;
    u64 stored = w[5];
    if (stored >> 32)
        return 0;
    w[5] = 0;
    return crc32_block(w) == (u32)stored;
}

static void submit(u32 slot, u32 type, u64 block)
{
    volatile struct request *request = REQUEST(slot);
    volatile struct desc *head = &vq.desc[slot * DESCS_PER_SLOT];
    request->type = type;
    request->sector = block * SECTORS_PER_BLOCK;
    request->status = 0xFF;
    if (type == BLK_T_FLUSH) {
        request->sector = 0;
        head->next = (u16)(slot * DESCS_PER_SLOT + 2);
    } else {
        head->next = (u16)(slot * DESCS_PER_SLOT + 1);
        head[1].flags = (u16)(DESC_F_NEXT | (type == BLK_T_IN ? DESC_F_WRITE : 0));
    }
    queue_add(&vq, (u16)(slot * DESCS_PER_SLOT));
}

/* Make the batch visible to the device, and notify it unless it said it polls. */
static void kick(void)
{
    if (queue_kick(dev, &vq))
        STATUS(ST_KICKS)++;
}

static void verify_failed(u64 block, u64 seq, u64 *w)
{
    u64 failures = ++STATUS(ST_VERIFY_FAILURES);
    STATUS(ST_LAST_FAILURE) = block + 1;
    if (failures > 8)
        return;
    puts("disk: verify failure: block");
    put_dec(block);
    puts(" expected seq=");
    put_dec(seq);
    puts(", the disk has magic=");
    put_hex(w[0]);
    puts(" generation=");
    put_hex(w[1]);
    put_field("block", w[2]);
    put_field("seq", w[3]);
    putc('\n');
}

/* Take every completion the device has posted. Returns how many. */
static u32 reap(void)
{
    u32 n = 0;
    if (queue_has_used(&vq))
        note_gap(ST_MAX_COMPLETION_GAP, &last_completion_tsc);
    while (queue_has_used(&vq)) {
        u32 slot = queue_take_used(&vq).id / DESCS_PER_SLOT;
        if (slot >= cfg.inflight || slots[slot].kind == FREE) {
            STATUS(ST_DUPLICATES)++; /* completed twice, or never submitted */
            continue;
        }
        u8 status = REQUEST(slot)->status;
        u64 block = slots[slot].block, seq = slots[slot].seq;
        if (status != BLK_S_OK) {
            STATUS(ST_IO_ERRORS)++;
        } else if (slots[slot].kind == BENCH_IO) {
            STATUS(bench_counter)++;
        } else if (slots[slot].kind == WRITE) {
            SEQ_TABLE[block] = seq;
            barrier();
            STATUS(ST_WRITES_COMPLETED)++;
            if (seq > STATUS(ST_MAX_COMPLETED))
                STATUS(ST_MAX_COMPLETED) = seq;
        } else if (slots[slot].kind == READ) {
            u64 *w = BUFFER(slot);
            if (!block_matches(w, block, seq))
                verify_failed(block, seq, w);
            STATUS(ST_READS_COMPLETED)++;
        } else {
            STATUS(ST_FLUSHES)++;
            if (seq > STATUS(ST_DURABLE))
                STATUS(ST_DURABLE) = seq;
        }
        if (slots[slot].kind == FLUSH)
            flush_in_flight = 0;
        slots[slot].kind = FREE;
        free_slots[nfree++] = slot;
        n++;
    }
    return n;
}

static u32 take_slot(u8 kind, u64 block, u64 seq)
{
    u32 slot = free_slots[--nfree];
    slots[slot].kind = kind;
    slots[slot].block = block;
    slots[slot].seq = seq;
    return slot;
}

/* Submit what the free slots allow. Returns how many requests. */
static u32 submit_batch(int writing)
{
    u32 n = 0;
    while (nfree) {
        if (cfg.flush && writes_since_flush >= cfg.flush && !flush_in_flight) {
            u32 slot = take_slot(FLUSH, 0, completed_watermark());
            submit(slot, BLK_T_FLUSH, 0);
            flush_in_flight = 1;
            writes_since_flush = 0;
        } else if (cfg.verify && writes_since_verify >= cfg.verify) {
            /* The block half a round behind the write cursor, if it was written and is idle. */
            u64 block = next_block + blocks / 2;
            if (block >= blocks)
                block -= blocks;
            u64 seq = SEQ_TABLE[block];
            writes_since_verify = 0;
            if (seq && !block_busy(block)) {
                u32 slot = take_slot(READ, block, seq);
                submit(slot, BLK_T_IN, block);
            }
        } else if (writing && (!cfg.limit || next_seq <= cfg.limit)) {
            if (block_busy(next_block))
                break; /* its previous request is still in flight: wait for it */
            u32 slot = take_slot(WRITE, next_block, next_seq);
            fill_block(BUFFER(slot), next_block, next_seq);
            submit(slot, BLK_T_OUT, next_block);
            STATUS(ST_WRITES_SUBMITTED) = next_seq;
            next_seq++;
            if (++next_block == blocks)
                next_block = 0;
            writes_since_flush++;
            writes_since_verify++;
        } else {
            break;
        }
        n++;
    }
    kick();
    return n;
}

static void progress_line(const char *what)
{
    STATUS(ST_TSC_NOW) = rdtsc();
    puts("disk:");
    puts(what);
    put_field("writes", STATUS(ST_WRITES_COMPLETED));
    put_field("reads", STATUS(ST_READS_COMPLETED));
    put_field("verify_failures", STATUS(ST_VERIFY_FAILURES));
    put_field("flushes", STATUS(ST_FLUSHES));
    put_field("io_errors", STATUS(ST_IO_ERRORS));
    put_field("durable", STATUS(ST_DURABLE));
    put_field("kicks", STATUS(ST_KICKS));
    put_field("tsc", STATUS(ST_TSC_NOW) - STATUS(ST_TSC_START));
    putc('\n');
}

static void drain(void)
{
    while (nfree < cfg.inflight)
        if (!reap())
            cpu_relax();
}

static int finish(void)
{
    progress_line(" done");
    report(TAG_DISK_WRITES, STATUS(ST_WRITES_COMPLETED));
    report(TAG_DISK_READS, STATUS(ST_READS_COMPLETED));
    report(TAG_DISK_VERIFY_FAILURES, STATUS(ST_VERIFY_FAILURES));
    report(TAG_DISK_IO_ERRORS, STATUS(ST_IO_ERRORS));
    int code = STATUS(ST_VERIFY_FAILURES) ? EXIT_VERIFY_FAILED
               : STATUS(ST_IO_ERRORS)     ? EXIT_IO_ERROR
                                          : EXIT_OK;
    STATUS(ST_EXIT_CODE) = (u64)code;
    STATUS(ST_STATE) = DISK_STATE_FINISHED;
    return code;
}

static void start_workload(void)
{
    for (u32 i = 0; i < cfg.inflight; i++)
        free_slots[nfree++] = cfg.inflight - 1 - i;
    STATUS(ST_TSC_START) = rdtsc();
    last_completion_tsc = last_loop_tsc = STATUS(ST_TSC_START);
    STATUS(ST_STATE) = DISK_STATE_RUNNING;
}

/* bench=: random 4 KiB requests of one kind, `inflight` at a time, `limit` in all (0: forever). */
static int run_bench(void)
{
    u32 type = cfg.bench == BENCH_RANDWRITE ? BLK_T_OUT : BLK_T_IN;
    bench_counter = type == BLK_T_OUT ? ST_WRITES_COMPLETED : ST_READS_COMPLETED;
    u64 random = cfg.generation | 1, submitted = 0, next_progress = cfg.progress;
    start_workload();
    for (;;) {
        note_gap(ST_MAX_LOOP_GAP, &last_loop_tsc);
        u32 done = reap();
        if (cfg.limit && submitted >= cfg.limit && nfree == cfg.inflight)
            break;
        u32 sent = 0;
        while (nfree && (!cfg.limit || submitted < cfg.limit)) {
            random ^= random << 13; /* xorshift64 */
            random ^= random >> 7;
            random ^= random << 17;
            u64 block = random % blocks;
            submit(take_slot(BENCH_IO, block, 0), type, block);
            submitted++;
            sent++;
        }
        kick();
        if (STATUS(bench_counter) >= next_progress) {
            next_progress += cfg.progress;
            progress_line("");
        }
        if (!done && !sent)
            cpu_relax();
    }
    return finish();
}

static int run(void)
{
    if (cfg.bench)
        return run_bench();
    u64 next_progress = cfg.progress;
    start_workload();
    for (;;) {
        note_gap(ST_MAX_LOOP_GAP, &last_loop_tsc);
        u32 done = reap();
        if (cfg.limit && next_seq > cfg.limit && nfree == cfg.inflight)
            break;
        u32 sent = submit_batch(1);
        if (STATUS(ST_WRITES_COMPLETED) >= next_progress) {
            next_progress += cfg.progress;
            progress_line("");
        }
        if (!done && !sent)
            cpu_relax();
    }
    if (cfg.flush) { /* a final flush makes every write durable */
        writes_since_flush = cfg.flush;
        writes_since_verify = 0;
        submit_batch(0);
        drain();
    }
    return finish();
}

/* --- entry ---------------------------------------------------------------------------- */

int disk_main(u32 mbi)
{
    const u8 *info = (const u8 *)(u64)mbi;
    u32 flags = *(const u32 *)(info + MBI_FLAGS);

    memset((void *)DISK_STATUS_ADDR, 0, ST_SIZE);
    if (!read_cmdline(mbi_cmdline(mbi)))
        return fail(EXIT_BAD_CMDLINE, 0); /* read_cmdline named the word */
    if (!cfg.generation)
        cfg.generation = rdtsc() | 1;
    STATUS(ST_INFLIGHT) = cfg.inflight;
    STATUS(ST_VERIFY) = cfg.verify;
    STATUS(ST_LIMIT) = cfg.limit;
    STATUS(ST_PROGRESS) = cfg.progress;
    STATUS(ST_GENERATION) = cfg.generation;
    STATUS(ST_BENCH) = cfg.bench;
    STATUS(ST_MAGIC) = STATUS_MAGIC;

    if (!(dev = find_device(cfg.devices, cfg.ndevices, DEVICE_ID_BLOCK, "a disk", "virtio-blk")))
        return EXIT_NO_DEVICE;
    int code = setup_device();
    if (code)
        return code;
    if (!(features & F_BLK_FLUSH))
        cfg.flush = 0;
    u64 capacity = read_capacity();
    STATUS(ST_CAPACITY) = capacity;
    STATUS(ST_INFLIGHT) = cfg.inflight;
    STATUS(ST_FLUSH) = cfg.flush;
    STATUS(ST_QUEUE_SIZE) = queue_size;
    STATUS(ST_FEATURES) = features;

    blocks = capacity / SECTORS_PER_BLOCK;
    if (cfg.blocks) {
        if (cfg.blocks > blocks)
            return fail(EXIT_BAD_CMDLINE, "blocks= is larger than the disk");
        blocks = cfg.blocks;
    }
    if (!blocks)
        return fail(EXIT_DEVICE_ERROR, "the disk is smaller than one 4 KiB block");
    u64 ram_end = IMAGE_BASE + ((flags & MBI_HAS_MEM) ? (u64) * (const u32 *)(info + MBI_MEM_UPPER) << 10 : 0);
    if (flags & MBI_HAS_MEM && DISK_SEQ_TABLE_ADDR + 8 * blocks > ram_end) {
        if (cfg.blocks || ram_end <= DISK_SEQ_TABLE_ADDR + 8)
            return fail(EXIT_NO_MEMORY, "not enough guest RAM for the sequence table "
                                        "(8 bytes per 4 KiB block from 8 MiB on)");
        blocks = (ram_end - DISK_SEQ_TABLE_ADDR) / 8;
    }
    STATUS(ST_BLOCKS) = blocks;
    memset((void *)DISK_SEQ_TABLE_ADDR, 0, 8 * blocks);
    crc_init();

    puts("disk: device at ");
    put_hex(dev);
    put_field("capacity", capacity);
    put_field("blocks", blocks);
    put_field("queue", queue_size);
    put_field("inflight", cfg.inflight);
    put_field("flush", cfg.flush);
    put_field("verify", cfg.verify);
    put_field("limit", cfg.limit);
    puts(" generation=");
    put_hex(cfg.generation);
    putc('\n');
    return run();
}
