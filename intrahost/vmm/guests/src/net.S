/*
 * net.S - the boot path of the built-in net guest: the C guests' one (cboot.inc), into
 * net_main (net.c), which finds the virtio-net device on the command line and answers ARP,
 * ICMP echo and UDP port 7 by polling. It returns only on a set-up error, with an exit code.
 * See docs/guests.md.
 */
    .include "common.inc"

    MULTIBOOT_HEADER MB_FLAG_MEMINFO
    NO_EXEC_STACK

    .include "longmode.inc"
    .include "cboot.inc"

    CGUEST_BOOT net_main, net
