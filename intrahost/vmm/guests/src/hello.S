/*
 * hello.S - the smallest built-in guest.
 *
 * Entered by a multiboot loader in 32-bit protected mode (CPL0, paging off). It prints
 * "Hello from intrahost" on COM1, reports HELLO = 0x48454c4c4f ("HELLO") on the debug
 * port, ends the run with exit code 0 and halts. Everything here runs at CPL0, which this
 * project's KVM emulates instruction by instruction, so the guest stays tiny.
 */
    .include "common.inc"

    MULTIBOOT_HEADER 0
    NO_EXEC_STACK

    .set HELLO_VALUE_LO, 0x454C4C4F     /* "ELLO" */
    .set HELLO_VALUE_HI, 0x48           /* "H" */

    .text
    .code32
    .globl _start
_start:
    cli
    cld
    movl $message, %esi
1:
    movb (%esi), %al
    testb %al, %al
    jz 2f
    UART_PUTC_AL
    incl %esi
    jmp 1b
2:
    movl $TAG_HELLO, %eax
    OUTL_EAX DEBUG_TAG
    movl $HELLO_VALUE_LO, %eax
    OUTL_EAX DEBUG_VALUE_LO
    movl $HELLO_VALUE_HI, %eax
    OUTL_EAX DEBUG_VALUE_HI

    movw $DEBUG_EXIT, %dx
    movb $EXIT_OK, %al
    outb %al, %dx
3:
    cli
    hlt
    jmp 3b

    .section .rodata
message:
    .asciz "Hello from intrahost\n"
