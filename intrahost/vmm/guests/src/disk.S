/*
 * disk.S - the boot path of the built-in disk guest: the C guests' one (cboot.inc), into
 * disk_main (disk.c), which finds the virtio-blk device on the command line, drives it by
 * polling and returns an exit code. See docs/guests.md.
 */
    .include "common.inc"

    MULTIBOOT_HEADER MB_FLAG_MEMINFO
    NO_EXEC_STACK

    .include "longmode.inc"
    .include "cboot.inc"

    CGUEST_BOOT disk_main, disk
