/*
 * cguest.h - the run-time the C guests (disk, net) share, all at CPL3: port I/O, the UART,
 * debug-port reports, the TSC, number and `virtio_mmio.device=` parsing, and a polling
 * virtio-mmio (version 2) driver's building blocks: finding a device by its DeviceID,
 * negotiating features and setting up a split virtqueue.
 *
 * Include it from exactly one .c file per guest, after the guest's ABI header (disk.h, net.h),
 * which defines TAG_ERROR, EXIT_NO_DEVICE and the status page's ST_STATE, ST_EXIT_CODE and
 * ST_DEVICE_BASE offsets (the tests check those headers, with this file's port numbers,
 * against layout.py). Define first GUEST_PREFIX ("disk: ", "net: "), which messages start
 * with, GUEST_STATUS_ADDR (the status page) and GUEST_STATE_FAILED (its state after a
 * failure). Everything here is static inline (unused pieces cost nothing), except memset and
 * memcpy, which gcc may call.
 */
#ifndef CGUEST_H
#define CGUEST_H

#include <stddef.h>
#include <stdint.h>

#if !defined(TAG_ERROR) || !defined(GUEST_PREFIX) || !defined(GUEST_STATUS_ADDR) || \
    !defined(GUEST_STATE_FAILED)
#error "include the guest's ABI header and define GUEST_PREFIX, GUEST_STATUS_ADDR and GUEST_STATE_FAILED before cguest.h"
#endif

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;
typedef int64_t s64;

/* Debug port and UART (as in common.inc). */
#define UART_DATA           0x3F8
#define UART_LSR            0x3FD
#define UART_LSR_THRE       0x20
#define DEBUG_TAG           0x500
#define DEBUG_VALUE_LO      0x504
#define DEBUG_VALUE_HI      0x508

/* --- CPU, ports, output --------------------------------------------------------------- */

#define barrier() __asm__ volatile("" ::: "memory")

static inline void outb(u16 port, u8 value)
{
    __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port));
}

static inline void outl(u16 port, u32 value)
{
    __asm__ volatile("outl %0, %1" : : "a"(value), "Nd"(port));
}

static inline u8 inb(u16 port)
{
    u8 value;
    __asm__ volatile("inb %1, %0" : "=a"(value) : "Nd"(port));
    return value;
}

static inline u64 rdtsc(void)
{
    u32 low, high;
    __asm__ volatile("rdtsc" : "=a"(low), "=d"(high));
    return ((u64)high << 32) | low;
}

static inline void cpu_relax(void)
{
    __asm__ volatile("pause" ::: "memory");
}

/* A full fence: the device must see avail->idx before the driver reads used->flags. */
static inline void mb(void)
{
    __asm__ volatile("mfence" ::: "memory");
}

static inline u32 mmio_read(u64 base, u32 reg)
{
    return *(volatile u32 *)(base + reg);
}

static inline u8 mmio_read8(u64 base, u32 reg)
{
    return *(volatile u8 *)(base + reg);
}

static inline void mmio_write(u64 base, u32 reg, u32 value)
{
    *(volatile u32 *)(base + reg) = value;
}

/* gcc may emit calls to these even in freestanding code. */
void *memset(void *dst, int value, size_t n);
void *memcpy(void *dst, const void *src, size_t n);

void *memset(void *dst, int value, size_t n)
{
    u8 *d = dst;
    while (n--)
        *d++ = (u8)value;
    return dst;
}

void *memcpy(void *dst, const void *src, size_t n)
{
    u8 *d = dst;
    const u8 *s = src;
    while (n--)
        *d++ = *s++;
    return dst;
}

static inline void putc(char c)
{
    while (!(inb(UART_LSR) & UART_LSR_THRE))
        ;
    outb(UART_DATA, (u8)c);
}

static inline void puts(const char *s)
{
    while (*s)
        putc(*s++);
}

static inline void put_dec(u64 value)
{
    char digits[24];
    int n = 0;
    do {
        digits[n++] = (char)('0' + value % 10);
        value /= 10;
    } while (value);
    while (n)
        putc(digits[--n]);
}

static inline void put_hex(u64 value)
{
    static const char hex[] = "0123456789abcdef";
    int shift = 60;
    puts("0x");
    while (shift > 0 && !(value >> shift))
        shift -= 4;
    for (; shift >= 0; shift -= 4)
        putc(hex[(value >> shift) & 15]);
}

/* "<key>=<value>" in decimal, with a leading space. */
static inline void put_field(const char *key, u64 value)
{
    putc(' ');
    puts(key);
    putc('=');
    put_dec(value);
}

static inline void report(u32 tag, u64 value)
{
    outl(DEBUG_TAG, tag);
    outl(DEBUG_VALUE_LO, (u32)value);
    outl(DEBUG_VALUE_HI, (u32)(value >> 32));
}

/* --- status page and failure ------------------------------------------------------------ */

/* The u64 field at byte offset `field` of the status page. */
#define STATUS(field) (*(volatile u64 *)(GUEST_STATUS_ADDR + (field)))

/*
 * Print GUEST_PREFIX "error: <message>" (unless the message was printed already: 0), then
 * store the exit code and GUEST_STATE_FAILED on the status page (in that order: a host that
 * sees the state sees the code) and report ERROR with the code; the code, for the guest's
 * main function to return.
 */
static inline int fail(int code, const char *message)
{
    if (message) {
        puts(GUEST_PREFIX "error: ");
        puts(message);
        putc('\n');
    }
    STATUS(ST_EXIT_CODE) = (u64)code;
    STATUS(ST_STATE) = GUEST_STATE_FAILED;
    report(TAG_ERROR, (u64)code);
    return code;
}

/* --- command line --------------------------------------------------------------------- */

#define MAX_DEVICES 16

/* One `virtio_mmio.device=SIZE@BASE:IRQ[:ID]` entry. */
struct mmio_entry {
    u64 size;
    u64 base;
    u64 irq;
};

static inline int is_end(char c)
{
    return c == 0 || c == ' ' || c == '\t' || c == '\n';
}

/* Parse a decimal or 0x-hex number at *p; 0 if malformed or too large. */
static inline int parse_number(const char **p, u64 *value)
{
    const char *s = *p;
    u64 base = 10, v = 0;
    int digits = 0;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        s += 2;
    }
    for (;; s++) {
        u64 d;
        if (*s >= '0' && *s <= '9')
            d = (u64)(*s - '0');
        else if (base == 16 && (*s | 0x20) >= 'a' && (*s | 0x20) <= 'f')
            d = (u64)((*s | 0x20) - 'a' + 10);
        else
            break;
        if (v > (~0ull - d) / base)
            return 0;
        v = v * base + d;
        digits++;
    }
    *p = s;
    *value = v;
    return digits > 0;
}

/* SIZE@BASE:IRQ[:ID], as Linux's virtio_mmio parses it (SIZE may end in K, M or G). */
static inline int parse_mmio_entry(const char *s, struct mmio_entry *entry)
{
    if (!parse_number(&s, &entry->size))
        return 0;
    if (*s == 'K' || *s == 'k') {
        entry->size <<= 10;
        s++;
    } else if (*s == 'M' || *s == 'm') {
        entry->size <<= 20;
        s++;
    } else if (*s == 'G' || *s == 'g') {
        entry->size <<= 30;
        s++;
    }
    if (*s++ != '@' || !parse_number(&s, &entry->base) || *s++ != ':' ||
        !parse_number(&s, &entry->irq))
        return 0;
    if (*s == ':') {
        u64 id;
        s++;
        if (!parse_number(&s, &id))
            return 0;
    }
    return is_end(*s) && entry->size >= 0x100 + 24 && entry->base + entry->size <= (1ull << 32);
}

static inline int key_is(const char *word, u64 length, const char *key)
{
    u64 i = 0;
    for (; i < length; i++)
        if (key[i] != word[i])
            return 0;
    return key[i] == 0;
}

/* Print the word at `word` (up to the next blank) and a newline. */
static inline void put_word(const char *word)
{
    while (!is_end(*word))
        putc(*word++);
    putc('\n');
}

/* The value at `v` as a number (parse_number) that ends the word; 0 if it is not one. */
static inline int parse_value(const char *v, u64 *value)
{
    return parse_number(&v, value) && is_end(*v);
}

/* What a guest's key handler says of one key=value word (see parse_cmdline). */
enum { KEY_BAD = 0, KEY_OK = 1, KEY_UNKNOWN = 2 };

/*
 * Parse the command line's blank-separated key=value words in order; words without '=' are
 * skipped (a loader passes the image path first). `virtio_mmio.device=` entries go to
 * devices[*ndevices] on (at most MAX_DEVICES); `cpus=` must be a number and is otherwise
 * ignored (the VMM passes its vCPU count; these guests use vCPU 0 only); every other word
 * goes to handle(key, key length, value), which stores it and says KEY_OK, KEY_BAD or
 * KEY_UNKNOWN. At the first bad or unknown word, print `bad` or `unknown` and the word and
 * return 0; 1 when every word was good.
 */
static inline int parse_cmdline(const char *s, struct mmio_entry *devices, int *ndevices,
                                int (*handle)(const char *key, u64 klen, const char *value),
                                const char *unknown, const char *bad)
{
    while (*s) {
        const char *word, *eq = 0;
        while (is_end(*s) && *s)
            s++;
        word = s;
        while (!is_end(*s)) {
            if (*s == '=' && !eq)
                eq = s;
            s++;
        }
        if (!eq)
            continue; /* no '=': e.g. the image path a loader passes first */
        u64 klen = (u64)(eq - word);
        const char *v = eq + 1;
        u64 value;
        int result;
        if (key_is(word, klen, "virtio_mmio.device")) {
            result = *ndevices < MAX_DEVICES && parse_mmio_entry(v, &devices[*ndevices]);
            *ndevices += result;
        } else if (key_is(word, klen, "cpus")) {
            result = parse_value(v, &value);
        } else {
            result = handle(word, klen, v);
        }
        if (result == KEY_UNKNOWN) {
            puts(unknown);
            put_word(word);
            return 0;
        }
        if (result == KEY_BAD) {
            puts(bad);
            put_word(word);
            return 0;
        }
    }
    return 1;
}

/* --- multiboot ------------------------------------------------------------------------ */

#define MBI_FLAGS 0
#define MBI_MEM_UPPER 8
#define MBI_CMDLINE 16
#define MBI_HAS_MEM 0x001u
#define MBI_HAS_CMDLINE 0x004u
#define IMAGE_BASE 0x100000ull

/* The command line the multiboot information at `mbi` points to ("" if none). */
static inline const char *mbi_cmdline(u32 mbi)
{
    const u8 *info = (const u8 *)(u64)mbi;
    if (*(const u32 *)(info + MBI_FLAGS) & MBI_HAS_CMDLINE)
        return (const char *)(u64) * (const u32 *)(info + MBI_CMDLINE);
    return "";
}

/* --- virtio-mmio (version 2) ---------------------------------------------------------- */

#define VIRTIO_MAGIC            0x74726976u /* "virt" */
#define REG_MAGIC               0x000
#define REG_VERSION             0x004
#define REG_DEVICE_ID           0x008
#define REG_DEVICE_FEATURES     0x010
#define REG_DEVICE_FEATURES_SEL 0x014
#define REG_DRIVER_FEATURES     0x020
#define REG_DRIVER_FEATURES_SEL 0x024
#define REG_QUEUE_SEL           0x030
#define REG_QUEUE_NUM_MAX       0x034
#define REG_QUEUE_NUM           0x038
#define REG_QUEUE_READY         0x044
#define REG_QUEUE_NOTIFY        0x050
#define REG_STATUS              0x070
#define REG_QUEUE_DESC_LOW      0x080
#define REG_QUEUE_DESC_HIGH     0x084
#define REG_QUEUE_DRIVER_LOW    0x090
#define REG_QUEUE_DRIVER_HIGH   0x094
#define REG_QUEUE_DEVICE_LOW    0x0A0
#define REG_QUEUE_DEVICE_HIGH   0x0A4
#define REG_CONFIG_GENERATION   0x0FC
#define REG_CONFIG              0x100

#define STATUS_ACKNOWLEDGE      1u
#define STATUS_DRIVER           2u
#define STATUS_DRIVER_OK        4u
#define STATUS_FEATURES_OK      8u
#define STATUS_NEEDS_RESET      64u
#define STATUS_FAILED           128u

#define F_VERSION_1             (1ull << 32)

#define DESC_F_NEXT             1u
#define DESC_F_WRITE            2u
#define AVAIL_F_NO_INTERRUPT    1u
#define USED_F_NO_NOTIFY        1u

/* The rings' offsets from a queue's base: descriptors, then each ring in its own page. */
#define QUEUE_AVAIL_OFFSET      0x1000
#define QUEUE_USED_OFFSET       0x2000
#define QUEUE_AREA_SIZE         0x3000
#define MAX_QUEUE               256u

struct desc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};

struct avail {
    u16 flags;
    u16 idx;
    u16 ring[MAX_QUEUE];
};

struct used_elem {
    u32 id;
    u32 len;
};

struct used {
    u16 flags;
    u16 idx;
    struct used_elem ring[MAX_QUEUE];
};

/* A split virtqueue the driver polls, in QUEUE_AREA_SIZE bytes of guest memory at `base`. */
struct queue {
    volatile struct desc *desc;
    volatile struct avail *avail;
    volatile struct used *used;
    u32 size;      /* a power of two */
    u16 avail_idx; /* the driver's next avail index (published by queue_kick) */
    u16 used_idx;  /* the next used entry to take */
    u16 pending;   /* entries added since the last queue_kick */
    u16 index;     /* the queue's number, for QueueNotify */
};

/*
 * Find the first version-2 virtio-mmio device with DeviceID `device_id` among the entries
 * (its base, or 0 if there is none). Entries without a device, legacy ones and other device
 * types are skipped; the first two are named on the UART.
 */
static inline u64 virtio_find(const struct mmio_entry *entries, int n, u32 device_id)
{
    for (int i = 0; i < n; i++) {
        u64 base = entries[i].base;
        if (mmio_read(base, REG_MAGIC) != VIRTIO_MAGIC) {
            puts(GUEST_PREFIX "no virtio-mmio device at ");
            put_hex(base);
            putc('\n');
            continue;
        }
        if (mmio_read(base, REG_VERSION) != 2) {
            puts(GUEST_PREFIX "legacy (version 1) virtio-mmio device at ");
            put_hex(base);
            puts(" skipped: version 2 is required\n");
            continue;
        }
        if (mmio_read(base, REG_DEVICE_ID) == device_id)
            return base;
    }
    return 0;
}

/*
 * virtio_find for the guest's device: its base, also stored at ST_DEVICE_BASE; or, with no
 * entries or no such device among them, 0 after a message that names `device` (what to give
 * the VMM) or `type` (the device type) and fail(EXIT_NO_DEVICE).
 */
static inline u64 find_device(const struct mmio_entry *entries, int n, u32 device_id,
                              const char *device, const char *type)
{
    u64 base = n ? virtio_find(entries, n, device_id) : 0;
    if (!base) {
        puts(GUEST_PREFIX "error: no ");
        if (!n) {
            puts("virtio_mmio.device= entry on the command line (give the VMM ");
            puts(device);
            puts(")\n");
        } else {
            puts(type);
            puts(" device among the virtio_mmio.device= entries\n");
        }
        fail(EXIT_NO_DEVICE, 0);
        return 0;
    }
    STATUS(ST_DEVICE_BASE) = base;
    return base;
}

static inline u64 virtio_device_features(u64 dev)
{
    mmio_write(dev, REG_DEVICE_FEATURES_SEL, 1);
    u64 high = mmio_read(dev, REG_DEVICE_FEATURES);
    mmio_write(dev, REG_DEVICE_FEATURES_SEL, 0);
    return (high << 32) | mmio_read(dev, REG_DEVICE_FEATURES);
}

/*
 * Reset the device and set ACKNOWLEDGE | DRIVER (in that order, as the spec's
 * initialisation sequence wants); the features it offers, via *offered. 0 on success, else
 * a message for the caller's error path.
 */
static inline const char *virtio_begin(u64 dev, u64 *offered)
{
    mmio_write(dev, REG_STATUS, 0);
    if (mmio_read(dev, REG_STATUS) != 0)
        return "the device did not reset";
    mmio_write(dev, REG_STATUS, STATUS_ACKNOWLEDGE);
    mmio_write(dev, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    *offered = virtio_device_features(dev);
    if (!(*offered & F_VERSION_1))
        return "the device does not offer VIRTIO_F_VERSION_1";
    return 0;
}

/* Write the accepted features and FEATURES_OK, and check that it stuck. */
static inline const char *virtio_accept(u64 dev, u64 features)
{
    mmio_write(dev, REG_DRIVER_FEATURES_SEL, 0);
    mmio_write(dev, REG_DRIVER_FEATURES, (u32)features);
    mmio_write(dev, REG_DRIVER_FEATURES_SEL, 1);
    mmio_write(dev, REG_DRIVER_FEATURES, (u32)(features >> 32));
    mmio_write(dev, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    if (!(mmio_read(dev, REG_STATUS) & STATUS_FEATURES_OK))
        return "the device refused the features (FEATURES_OK did not stick)";
    return 0;
}

/*
 * The size queue `index` will have: the largest power of two <= min(QueueNumMax, MAX_QUEUE),
 * in *size; 0 on success. A queue that is missing (QueueNumMax 0, or below `min_size`) or
 * already ready after a reset is an error.
 */
static inline const char *virtio_queue_size(u64 dev, u32 index, u32 min_size, u32 *size)
{
    mmio_write(dev, REG_QUEUE_SEL, index);
    if (mmio_read(dev, REG_QUEUE_READY) != 0)
        return "a queue is already in use after a reset";
    u32 max = mmio_read(dev, REG_QUEUE_NUM_MAX);
    if (max == 0 || max < min_size)
        return "a queue the driver needs is missing or too small";
    *size = MAX_QUEUE;
    while (*size > max)
        *size >>= 1;
    return 0;
}

/*
 * Lay queue `index` out at `base` (zeroed; the caller fills the descriptors afterwards),
 * with size `size` from virtio_queue_size, interrupts off (the driver polls), and tell the
 * device where it is. QueueReady comes last.
 */
static inline void virtio_queue_setup(u64 dev, struct queue *q, u32 index, u64 base, u32 size)
{
    memset((void *)base, 0, QUEUE_AREA_SIZE);
    q->desc = (volatile struct desc *)base;
    q->avail = (volatile struct avail *)(base + QUEUE_AVAIL_OFFSET);
    q->used = (volatile struct used *)(base + QUEUE_USED_OFFSET);
    q->size = size;
    q->avail_idx = q->used_idx = q->pending = 0;
    q->index = (u16)index;
    q->avail->flags = AVAIL_F_NO_INTERRUPT;
    mmio_write(dev, REG_QUEUE_SEL, index);
    mmio_write(dev, REG_QUEUE_NUM, size);
    mmio_write(dev, REG_QUEUE_DESC_LOW, (u32)base);
    mmio_write(dev, REG_QUEUE_DESC_HIGH, (u32)(base >> 32));
    mmio_write(dev, REG_QUEUE_DRIVER_LOW, (u32)(base + QUEUE_AVAIL_OFFSET));
    mmio_write(dev, REG_QUEUE_DRIVER_HIGH, 0);
    mmio_write(dev, REG_QUEUE_DEVICE_LOW, (u32)(base + QUEUE_USED_OFFSET));
    mmio_write(dev, REG_QUEUE_DEVICE_HIGH, 0);
    mmio_write(dev, REG_QUEUE_READY, 1);
}

/* Set DRIVER_OK and check the device took it (0) or a message. */
static inline const char *virtio_driver_ok(u64 dev)
{
    mmio_write(dev, REG_STATUS,
               STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    u32 status = mmio_read(dev, REG_STATUS);
    if (status & (STATUS_NEEDS_RESET | STATUS_FAILED) || !(status & STATUS_DRIVER_OK))
        return "the device did not accept DRIVER_OK";
    return 0;
}

/* Put the chain that starts at descriptor `head` on the avail ring (not yet published). */
static inline void queue_add(struct queue *q, u16 head)
{
    q->avail->ring[q->avail_idx & (q->size - 1)] = head;
    q->avail_idx++;
    q->pending++;
}

/*
 * Publish what queue_add added and notify the device unless it said it does not need it
 * (VIRTQ_USED_F_NO_NOTIFY). Returns 1 if it wrote QueueNotify.
 *
 * Order: descriptors and ring entries before the index (x86 keeps store order, the compiler
 * barrier keeps gcc's); then a full fence, so that the device sees the index before the
 * driver reads the flag — a device that found the ring empty clears NO_NOTIFY and then
 * looks at the index again, so one of the two sides sees the other's write.
 */
static inline int queue_kick(u64 dev, struct queue *q)
{
    if (!q->pending)
        return 0;
    barrier();
    q->avail->idx = q->avail_idx;
    q->pending = 0;
    mb();
    if (q->used->flags & USED_F_NO_NOTIFY)
        return 0;
    mmio_write(dev, REG_QUEUE_NOTIFY, q->index);
    return 1;
}

/* Whether the device has posted a used entry the driver has not taken yet. */
static inline int queue_has_used(const struct queue *q)
{
    return q->used_idx != q->used->idx;
}

/* Take the next used entry (call after queue_has_used said there is one). */
static inline struct used_elem queue_take_used(struct queue *q)
{
    barrier(); /* the ring entry after the index (x86 keeps load order) */
    volatile struct used_elem *e = &q->used->ring[q->used_idx & (q->size - 1)];
    struct used_elem elem = {e->id, e->len};
    q->used_idx++;
    return elem;
}

#endif
