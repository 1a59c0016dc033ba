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

/* GDT selectors. Each vCPU has its own 16-byte TSS descriptor from SEL_TSS0 on. */
    .set SEL_KCODE64,   0x08
    .set SEL_KDATA,     0x10
    .set SEL_KCODE32,   0x18
    .set SEL_UDATA,     0x20
    .set SEL_UCODE64,   0x28
    .set SEL_TSS0,      0x30
    .set RPL3,          3

    .set KSTACK_SHIFT,  12              /* 4 KiB kernel stack per vCPU (TSS.RSP0) */
    .set USTACK_SHIFT,  12              /* 4 KiB user stack per vCPU */
    .set TSS_SHIFT,     9               /* 512 bytes per TSS: 104 + I/O bitmap + 0xFF */
    .set TSS_IOMAP,     104             /* the I/O permission bitmap follows the TSS */
    .set IOMAP_PORTS,   0x510           /* the bitmap covers ports 0-0x50F; others fault */
    .set TSS_LIMIT,     TSS_IOMAP + IOMAP_PORTS / 8   /* includes the closing 0xFF byte */

    .set IDT_ENTRIES,   32              /* CPU exceptions only; IF stays 0 */
    .set GATE_INTR,     0x8E            /* present, DPL0, 64-bit interrupt gate */
    .set VECTOR_UD,     6

    .set CR0_PE,        0x00000001
    .set CR0_PG,        0x80000000
    .set CR4_PAE,       0x00000020
    .set MSR_EFER,      0xC0000080
    .set EFER_LME,      0x00000100
    .set RFLAGS_USER,   0x3002          /* IOPL=3, IF=0, bit 1 (see enter_user) */

    .set PTE_USER_RW,   0x007           /* present, writable, user */
    .set PTE_LARGE,     0x080           /* 2 MiB page */

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
    .globl _start
_start:
    cli
    cld
    movl %eax, mb_magic
    movl %ebx, mb_info
    movl $(kstacks + (1 << KSTACK_SHIFT)), %esp

    /* IDT: vector i goes to fault_stubs + 16 i. */
    movl $idt, %edi
    movl $fault_stubs, %esi
    movl $GATE_INTR, %ebx
    movl $IDT_ENTRIES, %ecx
1:
    call set_gate32
    addl $16, %edi
    addl $16, %esi
    decl %ecx
    jnz 1b

    xorl %edi, %edi                     /* vCPU index 0 */
    jmp cpu_enter_long_mode

/* Write the 64-bit gate at %edi for handler %esi with type/attribute byte %bl. */
set_gate32:
    movl %esi, %eax
    andl $0xFFFF, %eax
    orl $(SEL_KCODE64 << 16), %eax
    movl %eax, 0(%edi)
    movl %esi, %eax
    andl $0xFFFF0000, %eax
    movb %bl, %ah
    movl %eax, 4(%edi)
    movl $0, 8(%edi)
    movl $0, 12(%edi)
    ret

/*
 * Shared by every vCPU: %edi = vCPU index, %esp = its kernel stack. Writes the descriptor
 * of this vCPU's (static) TSS into the GDT, loads the GDT and switches to long mode.
 */
cpu_enter_long_mode:
    movl %edi, %eax
    shll $TSS_SHIFT, %eax
    addl $tss_array, %eax               /* %eax = this vCPU's TSS */
    movl %edi, %edx
    shll $4, %edx
    addl $(gdt + SEL_TSS0), %edx        /* %edx = its 16-byte TSS descriptor */
    movl %eax, %ecx
    shll $16, %ecx
    orl $TSS_LIMIT, %ecx
    movl %ecx, 0(%edx)                  /* base 15:0, limit 15:0 */
    movl %eax, %ecx
    shrl $16, %ecx
    andl $0xFF, %ecx
    orl $0x8900, %ecx                   /* present, DPL0, available 64-bit TSS */
    movl %eax, %ebx
    andl $0xFF000000, %ebx
    orl %ebx, %ecx
    movl %ecx, 4(%edx)                  /* base 31:16, type */
    movl $0, 8(%edx)
    movl $0, 12(%edx)

    lgdt gdtr
    movl %cr4, %eax
    orl $CR4_PAE, %eax
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $MSR_EFER, %ecx
    rdmsr
    orl $EFER_LME, %eax
    wrmsr
    movl %cr0, %eax
    orl $(CR0_PG | CR0_PE), %eax
    movl %eax, %cr0
    ljmp $SEL_KCODE64, $long_entry

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
long_entry:
    movw $SEL_KDATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movl %edi, %edi                     /* index (upper halves undefined after the switch) */
    movl %edi, %eax
    incl %eax
    shll $KSTACK_SHIFT, %eax
    leaq kstacks(%rip), %rsp
    addq %rax, %rsp
    movl %edi, %eax
    shll $4, %eax
    addl $SEL_TSS0, %eax
    ltr %ax
    lidt idtr(%rip)
    testl %edi, %edi
    jnz ap_main

bsp_main:
    cmpl $MB_BOOT_MAGIC, mb_magic(%rip)
    jne not_multiboot
    movb $0xFF, %al                     /* mask both 8259 PICs: no interrupts wanted */
    outb %al, $PIC_SLAVE_DATA
    outb %al, $PIC_MASTER_DATA
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

not_multiboot:
    leaq msg_not_multiboot(%rip), %rsi
    call puts
    movl $EXIT_NOT_MULTIBOOT, %edi
    jmp fatal

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

/*
 * %edi = vCPU index: drop to CPL3 at user_main on this vCPU's user stack.
 *
 * CPL3 port I/O is allowed twice over: by IOPL=3 in the RFLAGS image and by the TSS I/O
 * bitmap (UART and debug port only). Under this project's KVM (PVM) the iretq drops IOPL,
 * so the bitmap is what makes it work there; QEMU/TCG and hardware honour either.
 */
enter_user:
    movl %edi, %eax
    incl %eax
    shll $USTACK_SHIFT, %eax
    leaq ustacks(%rip), %rcx
    addq %rax, %rcx
    movw $(SEL_UDATA | RPL3), %ax
    movw %ax, %ds
    movw %ax, %es
    pushq $(SEL_UDATA | RPL3)           /* SS */
    pushq %rcx                          /* RSP */
    pushq $RFLAGS_USER                  /* RFLAGS */
    pushq $(SEL_UCODE64 | RPL3)         /* CS */
    leaq user_main(%rip), %rax
    pushq %rax                          /* RIP */
    iretq

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

/* Report ERROR (%edi = exit code) and end the run with that code; then halt. */
fatal:
    movl %edi, %r12d
    movl $TAG_ERROR, %edi
    movl %r12d, %esi
    call debug_report
    movl %r12d, %eax
    movw $DEBUG_EXIT, %dx
    outb %al, %dx
park64:
    cli
    hlt
    jmp park64

/*
 * CPU exceptions. Stack on entry to fault_common: vector, error code, RIP, CS, RFLAGS,
 * RSP, SS.
 *
 * A #UD at user_halt is not a fault: it is how CPL3 code that has finished asks for its
 * vCPU to be halted (under this project's KVM, `int $n` from CPL3 raises #UD instead of
 * going through the gate, so a software interrupt cannot be used). Anything else reports
 * FAULT and FAULT_RIP, prints one line and ends the run with EXIT_FAULT. The vCPU index
 * comes from the task register. The print lock is only tried for a while: the fault may
 * have hit while this vCPU held it.
 */
    .balign 16, 0xCC
fault_stubs:
    .set vector, 0
    .rept 32
    .balign 16, 0xCC
    .set error_code, (vector == 8) || (vector >= 10 && vector <= 14) || (vector == 17)
    .set error_code, error_code || (vector == 21) || (vector == 29) || (vector == 30)
    .if error_code                      /* the CPU pushed an error code */
    .else
    pushq $0                            /* no error code from the CPU: push one */
    .endif
    pushq $vector
    jmp fault_common
    .set vector, vector + 1
    .endr

fault_common:
    cmpq $VECTOR_UD, 0(%rsp)
    jne 1f
    leaq user_halt(%rip), %rax
    cmpq %rax, 16(%rsp)
    je park64
1:
    call io_try_lock
    xorl %eax, %eax
    str %ax
    subl $SEL_TSS0, %eax
    shrl $4, %eax
    movl %eax, %ebp                     /* %ebp = vCPU index */
    movl %ebp, %edi
    shll $TAG_VCPU_SHIFT, %edi
    orl $TAG_FAULT, %edi
    movq 8(%rsp), %rsi
    shlq $32, %rsi
    orq 0(%rsp), %rsi
    call debug_report
    movl %ebp, %edi
    shll $TAG_VCPU_SHIFT, %edi
    orl $TAG_FAULT_RIP, %edi
    movq 16(%rsp), %rsi
    call debug_report
    leaq msg_cpu(%rip), %rsi
    call puts
    movl %ebp, %eax
    call put_dec
    leaq msg_fault_vector(%rip), %rsi
    call puts
    movq 0(%rsp), %rax
    call put_dec
    leaq msg_fault_error(%rip), %rsi
    call puts
    movq 8(%rsp), %rax
    call put_hex16
    leaq msg_fault_rip(%rip), %rsi
    call puts
    movq 16(%rsp), %rax
    call put_hex16
    movb $'\n', %al
    call putc
    movb $EXIT_FAULT, %al
    movw $DEBUG_EXIT, %dx
    outb %al, %dx
    jmp park64

/* ------------------------------------------------------------------------------------ */
/* 64-bit helpers usable at CPL0 and at CPL3. Clobbers are listed per routine.            */
/* ------------------------------------------------------------------------------------ */

/* %rax = TSC. Clobbers %rdx. */
read_tsc:
    rdtsc
    shlq $32, %rdx
    orq %rdx, %rax
    ret

/* Write %al to the UART. Clobbers %rax, %rdx. */
putc:
    UART_PUTC_AL
    ret

/* Write the NUL-terminated string at %rsi. Clobbers %rax, %rdx, %rsi. */
puts:
    movb (%rsi), %al
    testb %al, %al
    jz 1f
    call putc
    incq %rsi
    jmp puts
1:
    ret

/* Write %rax in decimal. Clobbers %rax, %rcx, %rdx, %rsi, %rdi. */
put_dec:
    subq $24, %rsp
    leaq 24(%rsp), %rdi                 /* end of the digit buffer */
    movq %rdi, %rsi
    movl $10, %ecx
1:
    xorl %edx, %edx
    divq %rcx
    addb $'0', %dl
    decq %rsi
    movb %dl, (%rsi)
    testq %rax, %rax
    jnz 1b
2:
    movb (%rsi), %al
    call putc
    incq %rsi
    cmpq %rdi, %rsi
    jb 2b
    addq $24, %rsp
    ret

/* Write %rax as 16 hex digits. Clobbers %rax, %rcx, %rdx, %rdi, %r8. */
put_hex16:
    movq %rax, %r8
    movl $16, %ecx
    leaq hex_digits(%rip), %rdi
1:
    rolq $4, %r8
    movl %r8d, %eax
    andl $15, %eax
    movb (%rdi, %rax), %al
    call putc
    decl %ecx
    jnz 1b
    ret

/* Report (%edi = tag, %rsi = value) on the debug port. Clobbers %rax, %rdx. */
debug_report:
    movl %edi, %eax
    OUTL_EAX DEBUG_TAG
    movl %esi, %eax
    OUTL_EAX DEBUG_VALUE_LO
    movq %rsi, %rax
    shrq $32, %rax
    OUTL_EAX DEBUG_VALUE_HI
    ret

/* The UART and debug-port lock: reports and lines of different vCPUs never interleave. */
io_lock:
    movl $1, %eax
    xchgl %eax, io_lock_word(%rip)
    testl %eax, %eax
    jz 2f
1:
    pause
    cmpl $0, io_lock_word(%rip)
    jne 1b
    jmp io_lock
2:
    ret

io_unlock:
    movl $0, io_lock_word(%rip)
    ret

/* io_lock for the fault path: give up after 65536 tries. Clobbers %rax, %rcx. */
io_try_lock:
    movl $0x10000, %ecx
1:
    movl $1, %eax
    xchgl %eax, io_lock_word(%rip)
    testl %eax, %eax
    jz 2f
    pause
    decl %ecx
    jnz 1b
2:
    ret

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
pml4:
    .long pdpt + PTE_USER_RW, 0
    .fill 511, 8, 0
pdpt:
    .long pd + 0x0000 + PTE_USER_RW, 0
    .long pd + 0x1000 + PTE_USER_RW, 0
    .long pd + 0x2000 + PTE_USER_RW, 0
    .long pd + 0x3000 + PTE_USER_RW, 0
    .fill 508, 8, 0
pd:                                     /* 2048 x 2 MiB = identity map of 0-4 GiB */
    .set page, 0
    .rept 2048
    .long page | PTE_LARGE | PTE_USER_RW, 0
    .set page, page + 0x200000
    .endr

    .balign 16
gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF            /* 0x08 kernel code, 64-bit */
    .quad 0x00CF92000000FFFF            /* 0x10 kernel data */
    .quad 0x00CF9A000000FFFF            /* 0x18 kernel code, 32-bit (AP start-up) */
    .quad 0x00CFF2000000FFFF            /* 0x20 user data, DPL3 */
    .quad 0x00AFFA000000FFFF            /* 0x28 user code, 64-bit, DPL3 */
    .fill MAX_CPUS * 2, 8, 0            /* 0x30 + 16 i: TSS of vCPU i, filled at start-up */
gdt_end:

    .balign 8
    .word 0, 0, 0
gdtr:
    .word gdt_end - gdt - 1
    .long gdt, 0
    .balign 8
    .word 0, 0, 0
idtr:
    .word IDT_ENTRIES * 16 - 1
    .long idt, 0

/*
 * One TSS per vCPU: RSP0 = top of that vCPU's kernel stack, then an I/O permission bitmap
 * that allows only the UART (0x3F8-0x3FF) and the debug port (0x500-0x50F).
 */
    .balign 4096
tss_array:
    .set cpu, 0
    .rept MAX_CPUS
    .long 0                             /* reserved */
    .long kstacks + ((cpu + 1) << KSTACK_SHIFT), 0   /* RSP0 */
    .fill 22, 4, 0                      /* RSP1, RSP2, IST1-7, reserved */
    .word 0, TSS_IOMAP                  /* reserved, I/O bitmap offset */
    .set port, 0
    .rept IOMAP_PORTS / 8
    .if (port == UART_DATA) || (port >= DEBUG_TAG && port < IOMAP_PORTS)
    .byte 0x00
    .else
    .byte 0xFF
    .endif
    .set port, port + 8
    .endr
    .byte 0xFF                          /* the bitmap must end with a byte of ones */
    .balign 1 << TSS_SHIFT
    .set cpu, cpu + 1
    .endr

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
