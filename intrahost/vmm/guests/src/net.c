/*
 * net.c - the built-in net guest: a polling virtio-net driver (virtio-mmio, version 2, a
 * receiveq and a transmitq) and a tiny IPv4 host, all at CPL3.
 *
 * net_main takes its address from the command line's `ip=A.B.C.D[/PREFIX]`, finds the first
 * virtio-net device among the `virtio_mmio.device=SIZE@BASE:IRQ` entries, accepts
 * VIRTIO_F_VERSION_1, VIRTIO_NET_F_MAC and VIRTIO_NET_F_STATUS (nothing else: no mergeable
 * buffers, no offloads, no control queue), fills the receiveq with 2 KiB buffers and then
 * loops. It answers ARP requests for its address, ICMP echo requests to it, and UDP
 * datagrams to its port 7, which it sends back to their sender with the addresses and ports
 * swapped and the payload unchanged. Everything else is counted and dropped. Counters go to
 * the status page (net.h); with `progress=N`, a line every N frames received to the UART.
 *
 * Every frame, both ways, is preceded by the 12-byte virtio_net_hdr; the guest sends it
 * zeroed and ignores the one it receives (it accepted no offloads, so the device sets none).
 *
 * One turn of the loop: take the transmitq's completions (their buffers become free), then
 * the frames received — as many as there are free transmit buffers, a reply needs one —
 * each answered into a transmit buffer and its receive buffer put back on the receiveq
 * at once; then publish both queues, the transmitq first, each with at most one
 * QueueNotify, and none when the device set VIRTQ_USED_F_NO_NOTIFY (it is already working
 * on that queue, or the receiveq still had buffers). The loop makes no MMIO reads.
 * Interrupts stay off.
 */
#define GUEST_PREFIX "net: "
#define GUEST_STATUS_ADDR NET_STATUS_ADDR
#define GUEST_STATE_FAILED NET_STATE_FAILED
#include "net.h"
#include "cguest.h"

int net_main(u32 mbi);

/* --- virtio-net ----------------------------------------------------------------------- */

#define DEVICE_ID_NET           1u
#define F_NET_MAC               (1ull << 5)
#define F_NET_STATUS            (1ull << 16)
#define NET_CONFIG_MAC          0   /* u8[6] */
#define NET_CONFIG_STATUS       6   /* u16 */
#define NET_S_LINK_UP           1u

#define RXQ                     0u
#define TXQ                     1u

#define RX_BUFFER(i) ((u8 *)(NET_RX_BUFFERS_ADDR + (u64)(i) * NET_BUFFER_SIZE))
#define TX_BUFFER(i) ((u8 *)(NET_TX_BUFFERS_ADDR + (u64)(i) * NET_BUFFER_SIZE))

/* --- Ethernet, ARP, IPv4 -------------------------------------------------------------- */

#define ETH_HLEN                14
#define ETH_MIN_FRAME           60  /* without the FCS: shorter replies are padded with zeros */
#define ETH_MAX_FRAME           1514
#define ETHERTYPE_IPV4          0x0800
#define ETHERTYPE_ARP           0x0806
#define ARP_LEN                 28
#define ARP_REQUEST             1
#define ARP_REPLY               2
#define IP_HLEN                 20
#define IP_PROTO_ICMP           1
#define IP_PROTO_UDP            17
#define IP_MF_OFFSET_MASK       0x3FFF
#define IP_TTL                  64
#define ICMP_ECHO_REPLY         0
#define ICMP_ECHO_REQUEST       8
#define UDP_HLEN                8

static inline u16 get16(const u8 *p)
{
    return (u16)(p[0] << 8 | p[1]);
}

static inline u32 get32(const u8 *p)
{
    return (u32)p[0] << 24 | (u32)p[1] << 16 | (u32)p[2] << 8 | p[3];
}

static inline void put16(u8 *p, u16 v)
{
    p[0] = (u8)(v >> 8);
    p[1] = (u8)v;
}

static inline void put32(u8 *p, u32 v)
{
    p[0] = (u8)(v >> 24);
    p[1] = (u8)(v >> 16);
    p[2] = (u8)(v >> 8);
    p[3] = (u8)v;
}

static inline void copy6(u8 *dst, const u8 *src)
{
    for (int i = 0; i < 6; i++)
        dst[i] = src[i];
}

static inline int equal6(const u8 *a, const u8 *b)
{
    for (int i = 0; i < 6; i++)
        if (a[i] != b[i])
            return 0;
    return 1;
}

typedef u16 __attribute__((may_alias, aligned(1))) u16_unaligned;
typedef u64 __attribute__((may_alias, aligned(1))) u64_unaligned;

/*
 * The ones' complement sum (RFC 1071) of n bytes, added to `sum`, over 16-bit words loaded in
 * the CPU's (little-endian) order: the folded, complemented result stored in the same order
 * is the Internet checksum, and a region that carries its checksum sums to 0xFFFF.
 */
static u64 csum_add(u64 sum, const u8 *p, u64 n)
{
    for (; n >= 8; n -= 8, p += 8) {
        u64 w = *(const u64_unaligned *)p;
        sum += (w & 0xFFFFFFFFu) + (w >> 32); /* at most 2^33 per step: no overflow here */
    }
    for (; n >= 2; n -= 2, p += 2)
        sum += *(const u16_unaligned *)p;
    if (n)
        sum += *p; /* an odd last byte is the high byte of a word in network order */
    return sum;
}

static u16 csum_fold(u64 sum)
{
    while (sum >> 16)
        sum = (sum & 0xFFFF) + (sum >> 16);
    return (u16)sum;
}

/* Store the checksum of the summed region (whose checksum field was zero) at p. */
static inline void csum_store(u8 *p, u64 sum)
{
    *(u16_unaligned *)p = (u16)~csum_fold(sum);
}

/* Copy n bytes in 8-byte words (both buffers have room for the rounding up). */
static inline void copy_frame(u8 *dst, const u8 *src, u64 n)
{
    for (u64 i = 0; i < n; i += 8)
        *(u64_unaligned *)(dst + i) = *(const u64_unaligned *)(src + i);
}

/* --- command line and status ---------------------------------------------------------- */

static struct {
    u64 ip, prefix, progress;
    int has_ip;
    struct mmio_entry devices[MAX_DEVICES];
    int ndevices;
} cfg = {0, DEFAULT_PREFIX, DEFAULT_PROGRESS, 0, {{0}}, 0};

/* A.B.C.D[/PREFIX] up to the end of the word: a unicast address (not 0.x, 127.x or class D/E)
 * and a prefix 1-32 (default 24). */
static int parse_ip(const char *s)
{
    u64 ip = 0, octet, prefix = DEFAULT_PREFIX;
    for (int i = 0; i < 4; i++) {
        if (i && *s++ != '.')
            return 0;
        if (!(*s >= '0' && *s <= '9') || !parse_number(&s, &octet) || octet > 255)
            return 0;
        ip = ip << 8 | octet;
    }
    if (*s == '/') {
        s++;
        if (!(*s >= '0' && *s <= '9') || !parse_number(&s, &prefix) || prefix < 1 || prefix > 32)
            return 0;
    }
    u64 first = ip >> 24;
    if (!is_end(*s) || first == 0 || first == 127 || first >= 224)
        return 0;
    cfg.ip = ip;
    cfg.prefix = prefix;
    cfg.has_ip = 1;
    return 1;
}

/* parse_cmdline's handler for this guest's keys. */
static int cmdline_key(const char *key, u64 klen, const char *v)
{
    u64 value;
    if (key_is(key, klen, "ip"))
        return parse_ip(v) ? KEY_OK : KEY_BAD;
    if (!parse_value(v, &value))
        return KEY_BAD;
    if (!key_is(key, klen, "progress"))
        return KEY_UNKNOWN;
    cfg.progress = value;
    return KEY_OK;
}

static int read_cmdline(const char *s)
{
    static const char unknown[] = "net: error: unknown command line key (use ip, progress, "
                                  "virtio_mmio.device): ";
    static const char bad[] = "net: error: bad value (ip=A.B.C.D or A.B.C.D/PREFIX, a unicast "
                              "address and a prefix 1-32; progress a number; "
                              "virtio_mmio.device=SIZE@BASE:IRQ below 4 GiB, at most 16): ";
    return parse_cmdline(s, cfg.devices, &cfg.ndevices, cmdline_key, unknown, bad);
}

/* --- the device ----------------------------------------------------------------------- */

static u64 dev;      /* MMIO base of the device in use */
static u64 features; /* accepted */
static u8 mac[6];
static u8 ip_bytes[4];
static struct queue rxq, txq;

static inline u16 mmio_read16(u64 base, u32 reg)
{
    return *(volatile u16 *)(base + reg);
}

/* The MAC (byte reads, as the device's config space is bytes) and the link status, read
 * until ConfigGeneration says they are consistent. */
static void read_config(u64 *link)
{
    u32 generation;
    do {
        generation = mmio_read(dev, REG_CONFIG_GENERATION);
        if (features & F_NET_MAC)
            for (int i = 0; i < 6; i++)
                mac[i] = mmio_read8(dev, REG_CONFIG + NET_CONFIG_MAC + i);
        *link = features & F_NET_STATUS ? mmio_read16(dev, REG_CONFIG + NET_CONFIG_STATUS)
                                        : NET_S_LINK_UP;
    } while (generation != mmio_read(dev, REG_CONFIG_GENERATION));
}

/* Reset, negotiate, set up both queues and fill the receiveq; 0, else an exit code. */
static int setup_device(void)
{
    u64 offered, link;
    u32 rx_size, tx_size;
    const char *error = virtio_begin(dev, &offered);
    if (error)
        return fail(EXIT_DEVICE_ERROR, error);
    features = F_VERSION_1 | (offered & (F_NET_MAC | F_NET_STATUS));
    if ((error = virtio_accept(dev, features)) != 0 ||
        (error = virtio_queue_size(dev, RXQ, 2, &rx_size)) != 0 ||
        (error = virtio_queue_size(dev, TXQ, 2, &tx_size)) != 0)
        return fail(EXIT_DEVICE_ERROR, error);
    if (!(features & F_NET_MAC)) { /* a locally administered address of our own */
        static const u8 fallback[6] = {0x02, 0x49, 0x48, 0x4E, 0x45, 0x54};
        copy6(mac, fallback);
    }
    read_config(&link);

    virtio_queue_setup(dev, &rxq, RXQ, NET_RXQ_ADDR, rx_size);
    for (u32 i = 0; i < rx_size; i++) {
        rxq.desc[i].addr = (u64)RX_BUFFER(i);
        rxq.desc[i].len = NET_BUFFER_SIZE;
        rxq.desc[i].flags = DESC_F_WRITE;
    }
    virtio_queue_setup(dev, &txq, TXQ, NET_TXQ_ADDR, tx_size);
    for (u32 i = 0; i < tx_size; i++)
        txq.desc[i].addr = (u64)TX_BUFFER(i);
    if ((error = virtio_driver_ok(dev)) != 0)
        return fail(EXIT_DEVICE_ERROR, error);

    u64 mac_word = 0;
    for (int i = 5; i >= 0; i--)
        mac_word = mac_word << 8 | mac[i];
    STATUS(ST_MAC) = mac_word;
    STATUS(ST_FEATURES) = features;
    STATUS(ST_LINK_STATUS) = link;
    STATUS(ST_RX_QUEUE_SIZE) = rx_size;
    STATUS(ST_TX_QUEUE_SIZE) = tx_size;
    return 0;
}

/* --- the loop ------------------------------------------------------------------------- */

static u8 rx_owned[MAX_QUEUE];   /* 1: the buffer is on the receiveq (the device's) */
static u8 tx_busy[MAX_QUEUE];    /* 1: the buffer is on the transmitq */
static u16 tx_free[MAX_QUEUE];   /* free transmit buffers, a stack */
static u32 ntx_free;

static void post_rx(u16 i)
{
    rx_owned[i] = 1;
    queue_add(&rxq, i);
}

/* Queue the first `len` bytes of transmit buffer `slot`'s frame (padded to 60 bytes). */
static void send(u16 slot, u64 len)
{
    u8 *buffer = TX_BUFFER(slot);
    for (; len < ETH_MIN_FRAME; len++)
        buffer[NET_HDR_SIZE + len] = 0;
    txq.desc[slot].len = (u32)(NET_HDR_SIZE + len);
    tx_busy[slot] = 1;
    queue_add(&txq, slot);
}

static u16 take_tx(void)
{
    u16 slot = tx_free[--ntx_free];
    u8 *buffer = TX_BUFFER(slot);
    for (int i = 0; i < NET_HDR_SIZE; i++)
        buffer[i] = 0; /* virtio_net_hdr: no offloads */
    return slot;
}

/* An ARP packet (`len` bytes from its Ethernet header): answer a request for our address. */
static void handle_arp(const u8 *frame, u64 len)
{
    const u8 *arp = frame + ETH_HLEN;
    if (len < ETH_HLEN + ARP_LEN) {
        STATUS(ST_ERRORS)++;
        return;
    }
    if (get16(arp) != 1 || get16(arp + 2) != ETHERTYPE_IPV4 || arp[4] != 6 || arp[5] != 4 ||
        get16(arp + 6) != ARP_REQUEST || get32(arp + 24) != cfg.ip) {
        STATUS(ST_DROPPED)++; /* another hardware or protocol type, a reply, another address */
        return;
    }
    u16 slot = take_tx();
    u8 *out = TX_BUFFER(slot) + NET_HDR_SIZE;
    u8 *reply = out + ETH_HLEN;
    copy6(out, arp + 8); /* to the sender's hardware address */
    copy6(out + 6, mac);
    put16(out + 12, ETHERTYPE_ARP);
    put16(reply, 1);
    put16(reply + 2, ETHERTYPE_IPV4);
    reply[4] = 6;
    reply[5] = 4;
    put16(reply + 6, ARP_REPLY);
    copy6(reply + 8, mac);
    put32(reply + 14, cfg.ip);
    copy6(reply + 18, arp + 8);
    for (int i = 0; i < 4; i++)
        reply[24 + i] = arp[14 + i];
    send(slot, ETH_HLEN + ARP_LEN);
    STATUS(ST_ARP_REPLIES)++;
}

/*
 * Copy the IPv4 packet (Ethernet header included, `len` bytes) into a transmit buffer as the
 * start of its answer: Ethernet and IP addresses swapped, TTL reset, IP checksum redone.
 * The caller fixes the transport header and sends it.
 */
static u16 start_reply(const u8 *frame, u64 len, u64 ihl, u8 **ip_out)
{
    u16 slot = take_tx();
    u8 *out = TX_BUFFER(slot) + NET_HDR_SIZE;
    copy_frame(out, frame, len);
    copy6(out, frame + 6);
    copy6(out + 6, mac);
    u8 *ip = out + ETH_HLEN;
    for (int i = 0; i < 4; i++) {
        ip[12 + i] = ip_bytes[i];
        ip[16 + i] = frame[ETH_HLEN + 12 + i];
    }
    ip[8] = IP_TTL;
    ip[10] = ip[11] = 0;
    csum_store(ip + 10, csum_add(0, ip, ihl));
    *ip_out = ip;
    return slot;
}

/* An IPv4 packet: answer an echo request, echo a datagram to port 7. */
static void handle_ipv4(const u8 *frame, u64 len)
{
    const u8 *ip = frame + ETH_HLEN;
    if (len < ETH_HLEN + IP_HLEN || ip[0] >> 4 != 4) {
        STATUS(ST_ERRORS)++;
        return;
    }
    u64 ihl = (u64)(ip[0] & 15) * 4, total = get16(ip + 2);
    if (ihl < IP_HLEN || total < ihl || ETH_HLEN + total > len ||
        csum_fold(csum_add(0, ip, ihl)) != 0xFFFF) {
        STATUS(ST_ERRORS)++;
        return;
    }
    if (get32(ip + 16) != cfg.ip || get16(ip + 6) & IP_MF_OFFSET_MASK) {
        STATUS(ST_DROPPED)++; /* another address, or a fragment */
        return;
    }
    const u8 *payload = ip + ihl;
    u64 plen = total - ihl;
    u8 *out_ip;
    if (ip[9] == IP_PROTO_ICMP) {
        if (plen < 8 || csum_fold(csum_add(0, payload, plen)) != 0xFFFF) {
            STATUS(ST_ERRORS)++;
            return;
        }
        if (payload[0] != ICMP_ECHO_REQUEST || payload[1] != 0) {
            STATUS(ST_DROPPED)++;
            return;
        }
        u16 slot = start_reply(frame, ETH_HLEN + total, ihl, &out_ip);
        u8 *icmp = out_ip + ihl;
        icmp[0] = ICMP_ECHO_REPLY;
        icmp[2] = icmp[3] = 0;
        csum_store(icmp + 2, csum_add(0, icmp, plen));
        send(slot, ETH_HLEN + total);
        STATUS(ST_ICMP_ECHOES)++;
    } else if (ip[9] == IP_PROTO_UDP) {
        u64 ulen = plen >= UDP_HLEN ? get16(payload + 4) : 0;
        if (ulen < UDP_HLEN || ulen > plen) {
            STATUS(ST_ERRORS)++;
            return;
        }
        if (get16(payload + 6) != 0) { /* 0: the sender did not checksum */
            u8 pseudo[12];
            for (int i = 0; i < 8; i++)
                pseudo[i] = ip[12 + i];
            pseudo[8] = 0;
            pseudo[9] = IP_PROTO_UDP;
            put16(pseudo + 10, (u16)ulen);
            if (csum_fold(csum_add(csum_add(0, pseudo, 12), payload, ulen)) != 0xFFFF) {
                STATUS(ST_ERRORS)++;
                return;
            }
        }
        if (get16(payload + 2) != ECHO_PORT) {
            STATUS(ST_DROPPED)++;
            return;
        }
        u16 slot = start_reply(frame, ETH_HLEN + total, ihl, &out_ip);
        u8 *udp = out_ip + ihl;
        /* Swapping the ports (and, above, the addresses) leaves the checksum as it was: the
         * sum does not depend on the order of its words. */
        for (int i = 0; i < 2; i++) {
            udp[i] = payload[2 + i];
            udp[2 + i] = payload[i];
        }
        send(slot, ETH_HLEN + total);
        STATUS(ST_UDP_ECHOES)++;
    } else {
        STATUS(ST_DROPPED)++;
    }
}

/* One received frame (without its virtio_net_hdr), `len` bytes. Needs a free TX buffer. */
static void handle_frame(const u8 *frame, u64 len)
{
    static const u8 broadcast[6] = {0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF};
    if (len < ETH_HLEN || len > ETH_MAX_FRAME) {
        STATUS(ST_ERRORS)++;
        return;
    }
    if (!equal6(frame, mac) && !equal6(frame, broadcast)) {
        STATUS(ST_DROPPED)++;
        return;
    }
    u16 type = get16(frame + 12);
    if (type == ETHERTYPE_ARP)
        handle_arp(frame, len);
    else if (type == ETHERTYPE_IPV4)
        handle_ipv4(frame, len);
    else
        STATUS(ST_DROPPED)++;
}

static void progress_line(void)
{
    puts("net:");
    put_field("frames_in", STATUS(ST_FRAMES_IN));
    put_field("frames_out", STATUS(ST_FRAMES_OUT));
    put_field("arp", STATUS(ST_ARP_REPLIES));
    put_field("icmp", STATUS(ST_ICMP_ECHOES));
    put_field("udp", STATUS(ST_UDP_ECHOES));
    put_field("dropped", STATUS(ST_DROPPED));
    put_field("errors", STATUS(ST_ERRORS));
    put_field("rx_kicks", STATUS(ST_RX_KICKS));
    put_field("tx_kicks", STATUS(ST_TX_KICKS));
    putc('\n');
}

static __attribute__((noreturn)) void run(void)
{
    for (u32 i = 0; i < rxq.size; i++)
        post_rx((u16)i);
    for (u32 i = txq.size; i > 0; i--)
        tx_free[ntx_free++] = (u16)(i - 1);
    u64 last_tsc = rdtsc(), next_progress = cfg.progress;
    STATUS(ST_TSC_START) = last_tsc;
    STATUS(ST_STATE) = NET_STATE_RUNNING;
    if (queue_kick(dev, &rxq))
        STATUS(ST_RX_KICKS)++;
    for (;;) {
        u64 now = rdtsc();
        s64 gap = (s64)(now - last_tsc); /* signed: a TSC that went back is no gap */
        if (gap > (s64)STATUS(ST_MAX_LOOP_GAP))
            STATUS(ST_MAX_LOOP_GAP) = (u64)gap;
        last_tsc = now;
        STATUS(ST_TSC_NOW) = now;
        STATUS(ST_HEARTBEAT)++;

        u32 work = 0;
        while (queue_has_used(&txq)) {
            u32 slot = queue_take_used(&txq).id;
            work++;
            if (slot >= txq.size || !tx_busy[slot]) {
                STATUS(ST_DUPLICATES)++;
                continue;
            }
            tx_busy[slot] = 0;
            tx_free[ntx_free++] = (u16)slot;
            STATUS(ST_FRAMES_OUT)++;
        }
        while (ntx_free && queue_has_used(&rxq)) {
            struct used_elem e = queue_take_used(&rxq);
            work++;
            if (e.id >= rxq.size || !rx_owned[e.id]) {
                STATUS(ST_DUPLICATES)++;
                continue;
            }
            rx_owned[e.id] = 0;
            STATUS(ST_FRAMES_IN)++;
            if (e.len < NET_HDR_SIZE || e.len > NET_BUFFER_SIZE)
                STATUS(ST_ERRORS)++;
            else
                handle_frame(RX_BUFFER(e.id) + NET_HDR_SIZE, e.len - NET_HDR_SIZE);
            post_rx((u16)e.id);
        }
        /* The replies first; then the receive buffers back (and a kick if the device ran
         * out of them and waits for one). */
        if (queue_kick(dev, &txq))
            STATUS(ST_TX_KICKS)++;
        if (queue_kick(dev, &rxq))
            STATUS(ST_RX_KICKS)++;
        if (cfg.progress && STATUS(ST_FRAMES_IN) >= next_progress) {
            next_progress += cfg.progress;
            progress_line();
        }
        if (!work)
            cpu_relax();
    }
}

/* --- entry ---------------------------------------------------------------------------- */

static void put_ip(void)
{
    for (int i = 0; i < 4; i++) {
        if (i)
            putc('.');
        put_dec(ip_bytes[i]);
    }
    putc('/');
    put_dec(cfg.prefix);
}

static void put_mac(void)
{
    static const char hex[] = "0123456789abcdef";
    for (int i = 0; i < 6; i++) {
        if (i)
            putc(':');
        putc(hex[mac[i] >> 4]);
        putc(hex[mac[i] & 15]);
    }
}

int net_main(u32 mbi)
{
    memset((void *)NET_STATUS_ADDR, 0, ST_SIZE);
    STATUS(ST_MAGIC) = STATUS_MAGIC; /* state STARTING: a failure below shows on the page */
    if (!read_cmdline(mbi_cmdline(mbi)))
        return fail(EXIT_BAD_CMDLINE, 0); /* read_cmdline named the word */
    if (!cfg.has_ip)
        return fail(EXIT_BAD_CMDLINE, "no ip= on the command line: give the guest its address, "
                                      "e.g. --guest-args ip=192.0.2.2/24");
    put32(ip_bytes, (u32)cfg.ip);
    STATUS(ST_IP) = cfg.ip;
    STATUS(ST_PREFIX) = cfg.prefix;
    STATUS(ST_PROGRESS) = cfg.progress;

    if (!(dev = find_device(cfg.devices, cfg.ndevices, DEVICE_ID_NET, "a network device",
                            "virtio-net")))
        return EXIT_NO_DEVICE;
    int code = setup_device();
    if (code)
        return code;

    puts("net: device at ");
    put_hex(dev);
    puts(" mac=");
    put_mac();
    puts(" ip=");
    put_ip();
    put_field("rx_queue", rxq.size);
    put_field("tx_queue", txq.size);
    put_field("link", STATUS(ST_LINK_STATUS));
    putc('\n');
    run();
}
