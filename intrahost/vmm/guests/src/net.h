/*
 * net.h - the net guest's ABI: its memory layout, status page, exit codes and report tags.
 * The host side mirrors these in intrahost/vmm/guests/layout.py and docs/guests.md describes
 * them; a test checks that the two agree. Change all three together.
 */
#ifndef NET_H
#define NET_H

/* Exit codes (common.inc has the guests' shared ones). The guest runs until stopped: it only
 * ends on a set-up error. */
#define EXIT_BAD_CMDLINE    1
#define EXIT_NO_DEVICE      6
#define EXIT_DEVICE_ERROR   7

/* Report tags. */
#define TAG_ERROR           7

/* Memory layout (guest-physical). */
#define NET_STATUS_ADDR     0x200000    /* the status page */
#define NET_RXQ_ADDR        0x300000    /* receiveq: descriptors; avail ring +0x1000; used +0x2000 */
#define NET_TXQ_ADDR        0x304000    /* transmitq: the same */
#define NET_RX_BUFFERS_ADDR 0x400000    /* receive buffer i at +NET_BUFFER_SIZE * i */
#define NET_TX_BUFFERS_ADDR 0x500000    /* transmit buffer i at +NET_BUFFER_SIZE * i */
#define NET_BUFFER_SIZE     2048        /* the 12-byte virtio_net_hdr, then the frame */
#define NET_HDR_SIZE        12

/* Status page: u64 fields at these offsets. */
#define ST_MAGIC            0           /* "IHNET001", written once the configuration is in */
#define STATUS_MAGIC        0x31303054454E4849ull  /* "IHNET001" */
#define ST_STATE            8           /* NET_STATE_* */
#define ST_EXIT_CODE        16          /* the exit code, once failed */
#define ST_DEVICE_BASE      24          /* the device's MMIO base */
#define ST_IP               32          /* the address, a.b.c.d as a << 24 | b << 16 | c << 8 | d */
#define ST_PREFIX           40          /* its prefix length */
#define ST_MAC              48          /* the MAC: byte i of the address in bits 8i..8i+7 */
#define ST_FEATURES         56          /* features the driver accepted */
#define ST_LINK_STATUS      64          /* config status (VIRTIO_NET_S_LINK_UP = 1); 1 without F_STATUS */
#define ST_RX_QUEUE_SIZE    72
#define ST_TX_QUEUE_SIZE    80
#define ST_PROGRESS         88          /* progress= */
#define ST_HEARTBEAT        96          /* turns of the main loop */
#define ST_TSC_START        104         /* TSC when the loop started */
#define ST_TSC_NOW          112         /* TSC at the latest turn of the loop */
#define ST_FRAMES_IN        120         /* frames the device delivered */
#define ST_FRAMES_OUT       128         /* frames the device completed sending */
#define ST_ARP_REPLIES      136         /* ARP requests for our address answered */
#define ST_ICMP_ECHOES      144         /* ICMP echo requests answered */
#define ST_UDP_ECHOES       152         /* UDP datagrams to port 7 echoed */
#define ST_DROPPED          160         /* well-formed frames not for us (other address, protocol, port) */
#define ST_ERRORS           168         /* malformed frames: short, bad header or checksum, fragments */
#define ST_RX_KICKS         176         /* QueueNotify writes for the receiveq */
#define ST_TX_KICKS         184         /* ... and for the transmitq */
#define ST_DUPLICATES       192         /* used-ring entries for a buffer the device did not own */
#define ST_MAX_LOOP_GAP     200         /* largest TSC gap between two turns of the main loop */
#define ST_SIZE             256

#define NET_STATE_STARTING  0
#define NET_STATE_RUNNING   1
#define NET_STATE_FAILED    2

/* The UDP port whose datagrams the guest echoes. */
#define ECHO_PORT           7

/* Defaults of the command line keys. */
#define DEFAULT_PREFIX      24
#define DEFAULT_PROGRESS    0

#endif
