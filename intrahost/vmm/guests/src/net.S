/*
 * net.S - the boot path of the built-in net guest; the driver and the responder are in net.c.
 *
 * The CPL0 part is the counter guest's (longmode.inc), for one vCPU: enter long mode, mask
 * the PICs and drop to CPL3, where net_main (C) finds the virtio-net device on the command
 * line and answers ARP, ICMP echo and UDP port 7 by polling. It returns only on a set-up
 * error, with an exit code, which user_main writes to the debug port before it halts the
 * vCPU. See docs/guests.md.
 *
 * Assembled with `as --64` (the C code is 64-bit, so the image is linked as ELF64 and then
 * converted to a multiboot ELF32): the .code32 part is still 32-bit code.
 */
    .include "common.inc"

    MULTIBOOT_HEADER MB_FLAG_MEMINFO
    NO_EXEC_STACK

    .include "longmode.inc"

    .set KSTACK_SHIFT,  12              /* 4 KiB kernel stack (TSS.RSP0) */
    .set USTACK_SHIFT,  16              /* 64 KiB user stack for the C code */
    .set PIC_MASTER_DATA, 0x21
    .set PIC_SLAVE_DATA, 0xA1

    .text
    .code32
    .globl _start
_start:
    cli
    cld
    movl %eax, mb_magic
    movl %ebx, mb_info
    movl $(kstacks + (1 << KSTACK_SHIFT)), %esp
    LM_BUILD_IDT
    xorl %edi, %edi                     /* vCPU index 0: the only one this guest uses */
    jmp cpu_enter_long_mode

    LM_CODE32

    .code64
    LM_LONG_ENTRY
    cmpl $MB_BOOT_MAGIC, mb_magic(%rip)
    jne not_multiboot
    movb $0xFF, %al                     /* mask both 8259 PICs: the driver polls */
    outb %al, $PIC_SLAVE_DATA
    outb %al, $PIC_MASTER_DATA
    xorl %edi, %edi
    jmp enter_user

not_multiboot:
    leaq msg_not_multiboot(%rip), %rsi
    call puts
    movl $EXIT_NOT_MULTIBOOT, %edi
    jmp fatal

    LM_ENTER_USER
    LM_FAULT_HANDLERS
    LM_HELPERS

/* CPL3: run the C driver with the multiboot information address; end the run with its code. */
user_main:
    movl mb_info(%rip), %edi
    call net_main
    movw $DEBUG_EXIT, %dx
    outb %al, %dx
    .globl user_halt
user_halt:
    ud2                                 /* the #UD handler halts the vCPU: fault_common */

    .section .rodata
hex_digits:         .ascii "0123456789abcdef"
msg_cpu:            .asciz "cpu"
msg_fault_vector:   .asciz " fault vector="
msg_fault_error:    .asciz " error="
msg_fault_rip:      .asciz " rip="
msg_not_multiboot:
    .asciz "net: error: not started by a multiboot loader (EAX != 0x2BADB002)\n"

    .data
    .balign 4096
    LM_PAGE_TABLES
    LM_GDT 1
    LM_TSS_ARRAY 1

    .bss
    .balign 4096
kstacks:            .skip 1 << KSTACK_SHIFT
ustacks:            .skip 1 << USTACK_SHIFT
idt:                .skip IDT_ENTRIES * 16
    .balign 64
io_lock_word:       .long 0
mb_magic:           .long 0
mb_info:            .long 0
