/*
 * counter.S - the built-in guest that proves a hand-off kept memory and CPU state intact.
 *
 * Every vCPU runs a hot loop at CPL3 that counts iterations, stamps one word of its own
 * 64 KiB region per iteration, keeps a running checksum of that region and records the
 * largest gap between two consecutive RDTSC reads. The host reads all of it from the status
 * page at 0x200000 (see docs/guests.md and layout.py).
 *
 * Boot path (CPL0 code is emulated by this project's KVM at ~400 ns per instruction, so it
 * is short and uses plain instructions only; the hot loop is at CPL3, which runs natively):
 *
 *   _start (32-bit, multiboot)   build the IDT, enter long mode on vCPU 0
 *   bsp_main (64-bit, CPL0)      parse the command line, write the status header,
 *                                start the APs with INIT/SIPI/SIPI, release them
 *   ap_trampoline (16-bit)       copied to 0x8000; protected mode, then ap_entry32
 *   ap_entry32 (32-bit)          take a vCPU index with lock xadd, enter long mode
 *   enter_user (64-bit, CPL0)    iretq to CPL3, interrupts off, port I/O allowed
 *   user_main (64-bit, CPL3)     the hot loop; progress lines; the final reports
 *
 * The identity map of the first 4 GiB (2 MiB pages, user-accessible) is static data.
 */
    .include "common.inc"

    MULTIBOOT_HEADER MB_FLAG_MEMINFO
    NO_EXEC_STACK

    .include "longmode.inc"

    .set KSTACK_SHIFT,  12              /* 4 KiB kernel stack per vCPU (TSS.RSP0) */
    .set USTACK_SHIFT,  12              /* 4 KiB user stack per vCPU */

    .set PIC_MASTER_DATA, 0x21
    .set PIC_SLAVE_DATA, 0xA1

    /* LAPIC registers and ICR commands (xAPIC MMIO). */
    .set LAPIC_SVR,     0x0F0
    .set LAPIC_ICR_LO,  0x300
    .set LAPIC_ICR_HI,  0x310
    .set SVR_ENABLE,    0x1FF           /* software enable, spurious vector 0xFF */
    .set ICR_BUSY,      0x1000
    .set ICR_INIT_ALL,  0x000C4500      /* INIT, level assert, all excluding self */
    .set ICR_SIPI_ALL,  0x000C4600 | SIPI_VECTOR

    /* TSC waits; there is no TSC frequency to rely on, so these assume ~1-4 GHz. */
    .set INIT_DELAY_TICKS, 0x1000000    /* ~10 ms */
    .set SIPI_DELAY_TICKS, 0x80000      /* ~200 us */
    .set AP_TIMEOUT_TICKS, 0x200000000  /* ~3 s: every AP must have checked in by then */

    .set GO_WAIT,       0
    .set GO_RUN,        1
    .set GO_ABORT,      2

    .set DEFAULT_PROGRESS, 0x4000000    /* 2^26 */
    .set MAX_SWEEP_MIB, 0x100000        /* 1 TiB; keeps sweep << 20 far from overflow */

/* ------------------------------------------------------------------------------------ */
/* 32-bit entry on vCPU 0                                                               */
/* ------------------------------------------------------------------------------------ */
    .text
    .code32
    LM_START32

    LM_CODE32

/* APs arrive here from the trampoline, in 32-bit protected mode with no stack. */
ap_entry32:
    movw $SEL_KDATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movl $1, %eax
    lock xaddl %eax, next_index         /* %eax = this AP's vCPU index */
    cmpl cfg_cpus, %eax
    jae park32                          /* more vCPUs than cpus=N: stay out of the way */
    movl %eax, %edi
    incl %eax
    shll $KSTACK_SHIFT, %eax
    addl $kstacks, %eax
    movl %eax, %esp
    jmp cpu_enter_long_mode

park32:
    cli
    hlt
    jmp park32

/* ------------------------------------------------------------------------------------ */
/* AP trampoline: copied to AP_TRAMPOLINE; SIPI starts APs at CS=0x0800, IP=0          */
/* ------------------------------------------------------------------------------------ */
    .code16
ap_trampoline:
    cli
    cld
    xorl %eax, %eax
    movw %ax, %ds
    lgdtl (AP_TRAMPOLINE + (ap_trampoline_gdtr - ap_trampoline))
    movl %cr0, %eax
    orl $CR0_PE, %eax
    movl %eax, %cr0
    ljmpl $SEL_KCODE32, $ap_entry32
ap_trampoline_gdtr:
    .word gdt_end - gdt - 1
    .long gdt
ap_trampoline_end:
    .if ap_trampoline_end - ap_trampoline > 0x1000
    .error "the AP trampoline must fit below the multiboot info at 0x9000"
    .endif

/* ------------------------------------------------------------------------------------ */
/* 64-bit kernel code (CPL0, emulated: keep it short)                                   */
/* ------------------------------------------------------------------------------------ */
    .code64
    LM_LONG_ENTRY
    testl %edi, %edi
    jnz ap_main

bsp_main:
    LM_BSP_START
    call parse_cmdline
    call check_memory
    call init_status
    call print_banner
    cmpl $1, cfg_cpus(%rip)
    jbe 1f
    call start_aps
1:
    movl $GO_RUN, go(%rip)
    xorl %edi, %edi
    jmp enter_user

    LM_NOT_MULTIBOOT

ap_main:
    lock incl ap_ready(%rip)
1:
    movl go(%rip), %eax
    cmpl $GO_RUN, %eax
    je enter_user
    cmpl $GO_ABORT, %eax
    je park64
    pause
    jmp 1b

    LM_ENTER_USER

/*
 * Parse "key=value" words of the multiboot command line into cfg_*. Words without '='
 * (a loader may pass the image path first) are skipped; unknown keys and bad values end
 * the run with EXIT_BAD_CMDLINE. Values are decimal or 0x-prefixed hex.
 */
parse_cmdline:
    movl mb_info(%rip), %ebx
    testl $MBI_HAS_CMDLINE, MBI_FLAGS(%rbx)
    jz .Lparse_done
    movl MBI_CMDLINE(%rbx), %esi
.Lparse_word:
    movb (%rsi), %al
    testb %al, %al
    jz .Lparse_done
    cmpb $' ', %al
    ja 1f
    incq %rsi                           /* separator: any control character or space */
    jmp .Lparse_word
1:
    movq %rsi, %r12                     /* %r12 = start of the word */
    movq %rsi, %rdi
2:
    movb (%rdi), %al
    cmpb $' ', %al
    jbe .Lskip_word                     /* no '=' in this word */
    cmpb $'=', %al
    je 3f
    incq %rdi
    jmp 2b
.Lskip_word:
    movq %rdi, %rsi
    jmp .Lparse_word
3:
    movq %rdi, %r13
    subq %r12, %r13                     /* %r13 = key length */
    /* "virtio_mmio.*" words describe the VMM's devices (for a virtio_mmio driver, which
       this guest has not): skip them. */
    leaq virtio_key_prefix(%rip), %r14
    movl $VIRTIO_KEY_PREFIX_LEN, %ecx
    cmpq %rcx, %r13
    jb 32f
    xorl %edx, %edx
31:
    movb (%r14, %rdx), %r8b
    cmpb %r8b, (%r12, %rdx)
    jne 32f
    incl %edx
    cmpl %ecx, %edx
    jb 31b
    movq %rdi, %rsi
33:
    movb (%rsi), %al
    cmpb $' ', %al
    jbe .Lparse_word
    incq %rsi
    jmp 33b
32:
    leaq 1(%rdi), %rsi
    call parse_number                   /* %rax = value, %rsi = end of the word */
    jc .Lbad_value
    leaq cmdline_keys(%rip), %r14
4:
    movzbl (%r14), %ecx                 /* key table: length byte, name, handler */
    testl %ecx, %ecx
    jz .Lunknown_key
    cmpq %rcx, %r13
    jne 6f
    xorl %edx, %edx
5:
    movb 1(%r14, %rdx), %r8b
    cmpb %r8b, (%r12, %rdx)
    jne 6f
    incl %edx
    cmpl %ecx, %edx
    jb 5b
    movl 1(%r14, %rcx), %edx
    call *%rdx                          /* handler: %rax = value; CF set = out of range */
    jc .Lbad_value
    jmp .Lparse_word
6:
    leaq 5(%r14, %rcx), %r14
    jmp 4b
.Lparse_done:
    ret
.Lunknown_key:
    leaq msg_unknown_key(%rip), %rsi
    jmp 7f
.Lbad_value:
    leaq msg_bad_value(%rip), %rsi
7:
    call puts
    movq %r12, %rsi
8:
    movb (%rsi), %al
    cmpb $' ', %al
    jbe 9f
    call putc
    incq %rsi
    jmp 8b
9:
    movb $'\n', %al
    call putc
    movl $EXIT_BAD_CMDLINE, %edi
    jmp fatal

/* Command line value handlers: %rax = value; set CF if it is out of range. */
set_cpus:
    leaq -1(%rax), %rcx
    cmpq $MAX_CPUS, %rcx
    jae 1f
    movl %eax, cfg_cpus(%rip)
    clc
    ret
set_progress:
    leaq -1(%rax), %rcx
    testq %rax, %rcx
    jnz 1f                              /* not a power of two */
    testq %rax, %rax
    jz 1f
    movq %rax, cfg_progress(%rip)
    clc
    ret
set_limit:
    movq %rax, cfg_limit(%rip)
    clc
    ret
set_sweep:
    cmpq $MAX_SWEEP_MIB, %rax
    ja 1f
    shlq $20, %rax
    movq %rax, cfg_sweep_bytes(%rip)
    clc
    ret
1:
    stc
    ret

/*
 * Parse a number at %rsi up to the next separator: decimal, or hex after "0x".
 * Returns %rax and %rsi past the number; CF set if malformed or above 2^64 - 1.
 */
parse_number:
    xorl %eax, %eax
    xorl %ecx, %ecx                     /* digits seen */
    movl $10, %r8d
    cmpb $'0', (%rsi)
    jne 1f
    movb 1(%rsi), %dl
    orb $0x20, %dl
    cmpb $'x', %dl
    jne 1f
    movl $16, %r8d
    addq $2, %rsi
1:
    movzbl (%rsi), %edx
    cmpl $' ', %edx
    jbe 4f
    movl %edx, %r9d
    subl $'0', %r9d
    cmpl $10, %r9d
    jb 2f                               /* %r9 = decimal digit */
    cmpl $16, %r8d
    jne 5f
    orl $0x20, %edx                     /* 'A'-'F' and 'a'-'f' */
    subl $'a', %edx
    cmpl $6, %edx
    jae 5f
    leal 10(%rdx), %r9d                 /* %r9 = hex digit */
2:
    mulq %r8                            /* %rdx:%rax = %rax * base */
    jc 5f
    addq %r9, %rax
    jc 5f
    incl %ecx
    incq %rsi
    jmp 1b
4:
    testl %ecx, %ecx
    jz 5f
    clc
    ret
5:
    stc
    ret

/* End the run if RAM (per the multiboot mem_upper) cannot hold what cfg_* asks for. */
check_memory:
    movl mb_info(%rip), %ebx
    testl $MBI_HAS_MEM, MBI_FLAGS(%rbx)
    jz 2f                               /* the loader did not say: trust the user */
    movl cfg_cpus(%rip), %eax
    shlq $REGION_SHIFT, %rax
    addq $REGION_BASE, %rax             /* end of the last write region */
    movq cfg_sweep_bytes(%rip), %rcx
    testq %rcx, %rcx
    jz 1f
    addq $SWEEP_BASE, %rcx              /* end of the sweep working set */
    cmpq %rax, %rcx
    cmovaq %rcx, %rax
1:
    movl MBI_MEM_UPPER(%rbx), %ecx
    shlq $10, %rcx
    addq $IMAGE_BASE, %rcx              /* end of RAM above 1 MiB */
    cmpq %rcx, %rax
    ja 3f
2:
    ret
3:
    pushq %rax
    leaq msg_no_memory(%rip), %rsi
    call puts
    popq %rax
    addq $0xFFFFF, %rax
    shrq $20, %rax
    call put_dec
    leaq msg_mib(%rip), %rsi
    call puts
    movl $EXIT_NO_MEMORY, %edi
    jmp fatal

/* Zero the status page, slots and gap rings, fill the header, and write the magic last. */
init_status:
    movl $STATUS_BASE, %edi
    movl $((GAPS_END - STATUS_BASE) / 8), %ecx
    xorl %eax, %eax
    rep stosq
    movl cfg_cpus(%rip), %eax
    movl %eax, STATUS_BASE + STATUS_CPUS
    movq cfg_progress(%rip), %rax
    movq %rax, STATUS_BASE + STATUS_PROGRESS
    movq cfg_limit(%rip), %rax
    movq %rax, STATUS_BASE + STATUS_LIMIT
    movq status_magic(%rip), %rax
    movq %rax, STATUS_BASE + STATUS_MAGIC
    ret

/* "counter: cpus=N progress=P limit=L sweep=M" */
print_banner:
    leaq msg_banner_cpus(%rip), %rsi
    call puts
    movl cfg_cpus(%rip), %eax
    call put_dec
    leaq msg_banner_progress(%rip), %rsi
    call puts
    movq cfg_progress(%rip), %rax
    call put_dec
    leaq msg_banner_limit(%rip), %rsi
    call puts
    movq cfg_limit(%rip), %rax
    call put_dec
    leaq msg_banner_sweep(%rip), %rsi
    call puts
    movq cfg_sweep_bytes(%rip), %rax
    shrq $20, %rax
    call put_dec
    movb $'\n', %al
    jmp putc

/* Copy the trampoline, INIT-SIPI-SIPI all other vCPUs, wait (bounded) for them. */
start_aps:
    leaq ap_trampoline(%rip), %rsi
    movl $AP_TRAMPOLINE, %edi
    movl $(ap_trampoline_end - ap_trampoline), %ecx
    rep movsb
    movl $1, next_index(%rip)
    movl $LAPIC_BASE, %ebx
    movl $SVR_ENABLE, LAPIC_SVR(%rbx)
    movl $0, LAPIC_ICR_HI(%rbx)
    movl $ICR_INIT_ALL, LAPIC_ICR_LO(%rbx)
    call wait_icr
    movq $INIT_DELAY_TICKS, %rdi
    call delay_ticks
    movl $ICR_SIPI_ALL, LAPIC_ICR_LO(%rbx)
    call wait_icr
    movq $SIPI_DELAY_TICKS, %rdi
    call delay_ticks
    movl $ICR_SIPI_ALL, LAPIC_ICR_LO(%rbx)
    call wait_icr

    call read_tsc
    movq %rax, %r12
    movl cfg_cpus(%rip), %r13d
    decl %r13d                          /* APs expected */
1:
    cmpl %r13d, ap_ready(%rip)
    jae 2f
    pause
    call read_tsc
    subq %r12, %rax
    movabsq $AP_TIMEOUT_TICKS, %rcx
    cmpq %rcx, %rax
    jb 1b
    movl $GO_ABORT, go(%rip)
    leaq msg_ap_timeout(%rip), %rsi
    call puts
    movl ap_ready(%rip), %eax
    incl %eax
    call put_dec
    leaq msg_ap_timeout_of(%rip), %rsi
    call puts
    movl cfg_cpus(%rip), %eax
    call put_dec
    leaq msg_ap_timeout_end(%rip), %rsi
    call puts
    movl $EXIT_AP_TIMEOUT, %edi
    jmp fatal
2:
    ret

wait_icr:
    testl $ICR_BUSY, LAPIC_ICR_LO(%rbx)
    jz 1f
    pause
    jmp wait_icr
1:
    ret

/* Spin for %rdi TSC ticks. */
delay_ticks:
    call read_tsc
    movq %rax, %rcx
1:
    pause
    call read_tsc
    subq %rcx, %rax
    cmpq %rdi, %rax
    jb 1b
    ret

    LM_FAULT_HANDLERS

/* ------------------------------------------------------------------------------------ */
/* 64-bit helpers usable at CPL0 and at CPL3. Clobbers are listed per routine.            */
/* ------------------------------------------------------------------------------------ */

    LM_HELPERS

/* ------------------------------------------------------------------------------------ */
/* CPL3: the hot loop. %edi = vCPU index.                                               */
/* ------------------------------------------------------------------------------------ */
user_main:
    movl %edi, %ebp                     /* %rbp = vCPU index */
    movl %edi, %ebx
    shll $SLOT_SHIFT, %ebx
    addl $SLOT_BASE, %ebx               /* %rbx = this vCPU's slot */
    movl %edi, %r10d
    shll $REGION_SHIFT, %r10d
    addl $REGION_BASE, %r10d            /* %r10 = this vCPU's write region */

    movq %r10, %rdi
    movl $REGION_WORDS, %ecx
    xorl %eax, %eax
    rep stosq                           /* all-zero region, checksum 0, counter 0 */
    movq %rax, SLOT_COUNTER(%rbx)
    movq %rax, SLOT_MAX_GAP(%rbx)
    movq %rax, SLOT_CHECKSUM(%rbx)
    movq %rax, SLOT_LINES(%rbx)
    movq %rax, SLOT_GAPS(%rbx)
    call read_tsc
    movq %rax, SLOT_LAST_TSC(%rbx)
    lock incl STATUS_BASE + STATUS_RUNNING

    movq cfg_limit(%rip), %r12          /* %r12 = limit (0: never reached) */
    movq cfg_progress(%rip), %r13
    decq %r13                           /* %r13 = progress mask */
    movabsq $0x9E3779B97F4A7C15, %r14   /* %r14 = the word multiplier */
    movq cfg_sweep_bytes(%rip), %r15    /* %r15 = sweep working set size (0: off) */
    xorl %r9d, %r9d                     /* %r9 = sweep cursor */
    movl %ebp, %r11d
    shll $6, %r11d
    andl $0xFFF, %r11d                  /* %r11 = this vCPU's byte within a sweep page */

    /*
     * One iteration. Scratch: %rax, %rcx, %rdx, %rdi, %r8. The three stores go in the
     * order region word, checksum, counter, so a paused guest has at most one iteration
     * in flight (see layout.verify_region). The loop is cache-line aligned; the padding
     * is jumped over, never executed.
     */
    jmp .Lloop
    .balign 64, 0xCC
.Lloop:
    rdtsc
    shlq $32, %rdx
    orq %rdx, %rax
    movq %rax, %rcx
    subq SLOT_LAST_TSC(%rbx), %rcx      /* gap since the previous read */
    movq %rax, SLOT_LAST_TSC(%rbx)
    cmpq $GAP_MIN_TICKS, %rcx
    jg .Lrecord_gap
.Lgap_recorded:
    cmpq SLOT_MAX_GAP(%rbx), %rcx       /* re-read: the host may reset it to 0 */
    jle 1f                              /* signed: a TSC that went back is not a gap */
    movq %rcx, SLOT_MAX_GAP(%rbx)
1:
    movq SLOT_COUNTER(%rbx), %rax
    incq %rax                           /* %rax = c */
    movq %rax, %rdx
    imulq %r14, %rdx                    /* new word = c * multiplier */
    movl %eax, %ecx
    andl $REGION_MASK, %ecx
    movq (%r10, %rcx, 8), %r8           /* old word */
    movq %rdx, (%r10, %rcx, 8)          /* store 1: region word */
    subq %r8, %rdx
    addq %rdx, SLOT_CHECKSUM(%rbx)      /* store 2: checksum += new - old */
    movq %rax, SLOT_COUNTER(%rbx)       /* store 3: counter */
    testq %r15, %r15
    jnz .Lsweep
.Lswept:
    testq %r13, %rax
    jz .Lprogress
.Lprogressed:
    cmpq %r12, %rax
    jne .Lloop
    jmp .Lfinished

    /* A large gap (%rcx ticks, ended by the RDTSC in %rax): into this vCPU's ring, entry
     * before count, so a reader that sees the count sees the entry. */
.Lrecord_gap:
    movq SLOT_GAPS(%rbx), %rdx
    movl %edx, %edi
    andl $(GAP_ENTRIES - 1), %edi
    shll $4, %edi                       /* 16 bytes per entry */
    movl %ebp, %r8d
    shll $GAPS_SHIFT, %r8d
    addl %r8d, %edi
    movq %rcx, GAPS_BASE(%rdi)          /* gap */
    movq %rax, GAPS_BASE + 8(%rdi)      /* end stamp */
    incq %rdx
    movq %rdx, SLOT_GAPS(%rbx)
    jmp .Lgap_recorded

    /* Touch one byte of the next 4 KiB page of the working set at 16 MiB. */
.Lsweep:
    movb %al, SWEEP_BASE(%r9, %r11)
    addq $0x1000, %r9
    cmpq %r15, %r9
    jb .Lswept
    xorl %r9d, %r9d
    jmp .Lswept

    /* "cpu<N> count=<16 hex digits>" */
.Lprogress:
    call io_lock
    leaq msg_cpu(%rip), %rsi
    call puts
    movq %rbp, %rax
    call put_dec
    leaq msg_count(%rip), %rsi
    call puts
    movq SLOT_COUNTER(%rbx), %rax
    call put_hex16
    movb $'\n', %al
    call putc
    call io_unlock
    incq SLOT_LINES(%rbx)
    /* Printing (and waiting for another vCPU's line) is guest work, not a pause: restart
     * the gap measurement from here so max_gap only ever holds a stall of the loop. */
    call read_tsc
    movq %rax, SLOT_LAST_TSC(%rbx)
    movq SLOT_COUNTER(%rbx), %rax
    jmp .Lprogressed

    /* Limit reached: report, then vCPU 0 waits for the others and ends the run. */
.Lfinished:
    call io_lock
    movl %ebp, %edi
    shll $TAG_VCPU_SHIFT, %edi
    orl $TAG_COUNTER, %edi
    movq SLOT_COUNTER(%rbx), %rsi
    call debug_report
    movl %ebp, %edi
    shll $TAG_VCPU_SHIFT, %edi
    orl $TAG_MAX_GAP, %edi
    movq SLOT_MAX_GAP(%rbx), %rsi
    call debug_report
    movl %ebp, %edi
    shll $TAG_VCPU_SHIFT, %edi
    orl $TAG_CHECKSUM, %edi
    movq SLOT_CHECKSUM(%rbx), %rsi
    call debug_report
    call io_unlock
    lock incl done_count(%rip)
    testl %ebp, %ebp
    jnz user_halt
1:
    movl done_count(%rip), %eax
    cmpl cfg_cpus(%rip), %eax
    jae 2f
    pause
    jmp 1b
2:
    call io_lock
    leaq msg_done(%rip), %rsi
    call puts
    call io_unlock
    movb $EXIT_OK, %al
    movw $DEBUG_EXIT, %dx
    outb %al, %dx
user_halt:
    ud2                                 /* the #UD handler halts the vCPU: fault_common */

/* ------------------------------------------------------------------------------------ */
/* Read-only data                                                                       */
/* ------------------------------------------------------------------------------------ */
    .section .rodata
status_magic:
    .ascii "IHCNTR01"
hex_digits:
    .ascii "0123456789abcdef"

/* Command line keys: length byte, name, 32-bit handler address; a zero byte ends it. */
cmdline_keys:
    .byte 4
    .ascii "cpus"
    .long set_cpus
    .byte 8
    .ascii "progress"
    .long set_progress
    .byte 5
    .ascii "limit"
    .long set_limit
    .byte 5
    .ascii "sweep"
    .long set_sweep
    .byte 0

msg_cpu:            .asciz "cpu"
msg_count:          .asciz " count="
msg_done:           .asciz "done\n"
msg_banner_cpus:    .asciz "counter: cpus="
msg_banner_progress: .asciz " progress="
msg_banner_limit:   .asciz " limit="
msg_banner_sweep:   .asciz " sweep="
msg_not_multiboot:
    .asciz "counter: error: not started by a multiboot loader (EAX != 0x2BADB002)\n"
virtio_key_prefix:
    .ascii "virtio_mmio."
    .set VIRTIO_KEY_PREFIX_LEN, . - virtio_key_prefix
msg_unknown_key:
    .asciz "counter: error: unknown command line key (use cpus, progress, limit, sweep): "
msg_bad_value:
    .ascii "counter: error: bad value "
    .asciz "(cpus 1-64, progress a power of two, sweep <= 1048576 MiB): "
msg_no_memory:
    .asciz "counter: error: not enough guest RAM for this command line; it needs "
msg_mib:            .asciz " MiB\n"
msg_ap_timeout:     .asciz "counter: error: only "
msg_ap_timeout_of:  .asciz " of "
msg_ap_timeout_end: .asciz " vCPUs started (does the machine have that many?)\n"
msg_fault_vector:   .asciz " fault vector="
msg_fault_error:    .asciz " error="
msg_fault_rip:      .asciz " rip="

/* ------------------------------------------------------------------------------------ */
/* Data: page tables, GDT, descriptor registers, configuration                          */
/* ------------------------------------------------------------------------------------ */
    .data
    .balign 4096
    LM_PAGE_TABLES

    LM_GDT MAX_CPUS

    LM_TSS_ARRAY MAX_CPUS

    .balign 8
cfg_progress:       .quad DEFAULT_PROGRESS
cfg_limit:          .quad 0
cfg_sweep_bytes:    .quad 0
cfg_cpus:           .long 1

/* ------------------------------------------------------------------------------------ */
/* BSS (zeroed by the loader)                                                           */
/* ------------------------------------------------------------------------------------ */
    .bss
    .balign 4096
kstacks:            .skip MAX_CPUS << KSTACK_SHIFT
ustacks:            .skip MAX_CPUS << USTACK_SHIFT
idt:                .skip IDT_ENTRIES * 16
    .balign 64
io_lock_word:       .long 0                 /* own cache line: spun on at CPL3 */
    .balign 64
mb_magic:           .long 0
mb_info:            .long 0
next_index:         .long 0
ap_ready:           .long 0
go:                 .long 0
done_count:         .long 0
