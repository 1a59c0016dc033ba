/* The floor of a hand-off: a KVM guest handed between two processes with nothing else.
 *
 * bench/floor.py compiles this file (cc -O2) and runs it. Two processes share one memfd as
 * guest memory and a SOCK_SEQPACKET socketpair. The source runs the guest; the destination
 * has built its own VM on the same memfd, with vCPUs that never ran (or, with -p, that ran
 * once on a stub outside the guest's code path). A hand-off: the source parks its vCPU
 * threads, exports the vCPU and VM state with the KVM getters, sends it in one message;
 * the destination imports it with the setters and runs the guest. Then the two swap roles:
 * the old source closes its VM and forks a new process, which builds the next destination
 * VM (like a new VMM process; the old one exits), and so on.
 *
 * The guest: vCPU 0 runs a loop at CPL3 in long mode (no boot code: the vCPU starts there,
 * state set with KVM_SET_SREGS/REGS) that reads the TSC and keeps, in a status page, a
 * counter, its last stamp, the largest gap between two reads and the gap across the last
 * hand-off (see the status page below). On this host the guest's RDTSC is the host's TSC,
 * so that gap is the exact blackout. With -v 4, vCPUs 1-3 sit in HLT at CPL0 (halts are
 * handled in the kernel: no exit to userspace).
 *
 * Output (stdout): one JSON object per line; first {"config": ...}, then one object per
 * hand-off with the steps in microseconds (CLOCK_MONOTONIC):
 *   pause     kick the vCPU threads -> all parked (after one more KVM_RUN with immediate_exit)
 *   export    getters, in the order MP_STATE REGS SREGS(2) XSAVE XCRS DEBUGREGS LAPIC MSRS
 *             TSC-offset VCPU_EVENTS per vCPU, then CLOCK, 3 irqchips, PIT2
 *   transfer  send() -> the destination's recv() returned
 *   import    setters: PIT2 CLOCK irqchips, then per vCPU MP_STATE REGS SREGS XSAVE XCRS
 *             DEBUGREGS LAPIC MSRS TSC-offset VCPU_EVENTS
 *   resume    last setter -> the guest's first RDTSC after the hand-off (TSC, converted)
 *   blackout  the guest's RDTSC gap across the hand-off
 *   stop      pause start -> the guest's last RDTSC before the hand-off (negative: the
 *             vCPU thread was off the CPU when the pause began)
 * so blackout = pause + export + transfer + import + resume - stop.
 *
 * usage: floor [-n handoffs] [-v vcpus] [-p] [-s settle_ms]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <x86intrin.h>

#define MEM_SIZE (64ul << 20)
#define MAX_VCPUS 4

/* Guest-physical layout (identity-mapped). Two address spaces, each with its GDT, TSSes and
 * page tables: the guest's, and the pre-run stub's, all inside the last 2 MiB page, which
 * nothing of the guest's touches. */
#define STATUS_ADDR 0x3000
#define STACK_TOP 0x80000 /* 4 KiB per vCPU, downwards */
#define LOOP_ADDR 0x100000
#define HALT_ADDR 0x101000
#define STUB_ADDR 0x3e00000
#define STUB_PORT 0x80
/* Per vCPU: 104 bytes, an I/O bitmap for ports 0-0x3ff, 0xff. The stub's OUT at CPL3 needs
 * the bitmap: on this host's KVM, IOPL=3 alone does not allow it (#GP, triple fault). */
#define TSS_SIZE 256
#define TSS_LIMIT (104 + 0x400 / 8)

struct space {
	uint64_t gdt, tss, cr3; /* the TSSes: TSS_SIZE bytes per vCPU; cr3: 3 pages */
	uint64_t first, end;    /* the range mapped, user-accessible, in 2 MiB pages */
};
static const struct space guest_space = {0x1000, 0x2000, 0x10000, 0, MEM_SIZE};
static const struct space stub_space = {STUB_ADDR + 0x1000, STUB_ADDR + 0x2000,
                                        STUB_ADDR + 0x3000, STUB_ADDR, STUB_ADDR + (2 << 20)};

/* GDT selectors; vCPU i's TSS descriptor (16 bytes) is at SEL_TSS + 16 i. */
#define SEL_KCODE 0x08
#define SEL_KDATA 0x10
#define SEL_UDATA 0x18
#define SEL_UCODE 0x20
#define SEL_TSS 0x28
#define GDT_ENTRIES (5 + 2 * MAX_VCPUS)

/* Status page: 64-bit words. The loop writes COUNT, STAMP, MAXGAP (the largest gap between
 * two RDTSCs since the host last zeroed it) and MAXEND (the RDTSC that ended that gap). For
 * a hand-off the host, while no vCPU runs, zeroes MAXGAP, writes THRESH (a guest TSC value
 * taken after the source's vCPUs were parked) and MARK=1: the first iteration whose RDTSC is
 * past THRESH - the guest's first after the hand-off - copies its gap and stamp to HGAP and
 * HEND and zeroes MARK. That gap is the blackout, exactly, wherever the loop was stopped. */
#define ST_COUNT 0
#define ST_STAMP 8
#define ST_MAXGAP 16
#define ST_MAXEND 24
#define ST_MARK 64
#define ST_THRESH 72
#define ST_HGAP 80
#define ST_HEND 88

#define STR_(x) #x
#define STR(x) STR_(x)

/* The guest code, copied into guest memory; position-independent. */
__asm__(".pushsection .rodata\n"
        ".globl floor_loop, floor_loop_end, floor_halt, floor_halt_end, floor_stub, floor_stub_end\n"
        "floor_loop:\n" /* CPL3 */
        "  movl $" STR(STATUS_ADDR) ", %edi\n"
        "  rdtsc\n"
        "  shlq $32, %rdx\n"
        "  orq %rdx, %rax\n"
        "  movq %rax, %rsi\n"
        "1:rdtsc\n"
        "  shlq $32, %rdx\n"
        "  orq %rdx, %rax\n"
        "  movq %rax, %rcx\n"
        "  subq %rsi, %rcx\n" /* gap = now - previous */
        "  movq %rax, %rsi\n"
        "  movq %rax, " STR(ST_STAMP) "(%rdi)\n"
        "  incq " STR(ST_COUNT) "(%rdi)\n"
        "  cmpq %rcx, " STR(ST_MAXGAP) "(%rdi)\n"
        "  jae 2f\n"
        "  movq %rcx, " STR(ST_MAXGAP) "(%rdi)\n"
        "  movq %rax, " STR(ST_MAXEND) "(%rdi)\n"
        "2:cmpq $0, " STR(ST_MARK) "(%rdi)\n"
        "  je 1b\n"
        "  cmpq " STR(ST_THRESH) "(%rdi), %rax\n"
        "  jb 1b\n" /* a stamp from before the hand-off */
        "  movq %rcx, " STR(ST_HGAP) "(%rdi)\n"
        "  movq %rax, " STR(ST_HEND) "(%rdi)\n"
        "  movq $0, " STR(ST_MARK) "(%rdi)\n"
        "  jmp 1b\n"
        "floor_loop_end:\n"
        "floor_halt:\n" /* CPL0, IF=0 */
        "1:hlt\n"
        "  jmp 1b\n"
        "floor_halt_end:\n"
        "floor_stub:\n" /* CPL3, port allowed by the TSS: one exit to userspace */
        "  outb %al, $" STR(STUB_PORT) "\n"
        "floor_stub_end:\n"
        ".popsection\n");
extern const unsigned char floor_loop[], floor_loop_end[], floor_halt[], floor_halt_end[],
	floor_stub[], floor_stub_end[];

/* --- errors, time --------------------------------------------------------------------- */

static void die(const char *fmt, ...) {
	int err = errno;
	char msg[256];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	fprintf(stderr, "floor[%d]: %s: %s\n", (int)getpid(), msg, strerror(err));
	_exit(1);
}

static void fail(const char *fmt, ...) {
	char msg[256];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	fprintf(stderr, "floor[%d]: %s\n", (int)getpid(), msg);
	_exit(1);
}

/* ioctl that must not fail; returns its (non-negative) result. */
#define IOCTL(fd, req, arg)                                                                  \
	({                                                                                   \
		int r_ = ioctl((fd), (req), (arg));                                          \
		if (r_ < 0) die("%s", #req);                                                 \
		r_;                                                                          \
	})

static int64_t now_ns(void) {
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void sleep_ns(long ns) {
	struct timespec ts = {.tv_sec = ns / 1000000000, .tv_nsec = ns % 1000000000};
	while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
	}
}

/* --- configuration, probed once before the fork ---------------------------------------- */

static int kvm_fd, mem_fd, run_size;
static int nvcpus = 1, prerun, count = 200;
static long settle_ns = 10000000;
static struct kvm_cpuid2 *cpuid;
static uint32_t *msr_index;
static int nmsrs, msrs_dropped;
static size_t xsave_size = sizeof(struct kvm_xsave);
static int have_xsave2, have_sregs2, have_tsc_offset;
static uint32_t tsc_khz;

#ifdef KVM_GET_SREGS2
#define SREGS_UNION                                                                          \
	union {                                                                              \
		struct kvm_sregs s;                                                          \
		struct kvm_sregs2 s2;                                                        \
	}
#else
#define SREGS_UNION                                                                          \
	union {                                                                              \
		struct kvm_sregs s;                                                          \
	}
#endif

/* --- the state message ----------------------------------------------------------------- */

enum { MSG_READY = 1, MSG_STATE, MSG_RESUMED };

struct msg_small {
	uint32_t tag, round;
};

struct msg_header {
	uint32_t tag, round, nvcpus;
	int32_t pid;     /* the source */
	int32_t running; /* vCPU 0 was seen running just before the pause */
	int32_t pad;
	int64_t t_pause, t_parked, t_send; /* CLOCK_MONOTONIC ns, source */
	uint64_t tsc_pause, tsc_parked; /* host TSC at t_pause, t_parked */
	int64_t tsc_delta;               /* guest TSC - host TSC */
	struct kvm_clock_data clock;
	int64_t clock_ns; /* CLOCK_MONOTONIC at KVM_GET_CLOCK */
	struct kvm_irqchip chip[3];
	struct kvm_pit_state2 pit;
};

struct vcpu_fixed {
	struct kvm_mp_state mp;
	struct kvm_regs regs;
	SREGS_UNION sregs;
	struct kvm_xcrs xcrs;
	struct kvm_debugregs dbg;
	struct kvm_lapic_state lapic;
	struct kvm_vcpu_events events;
	uint64_t tsc_offset;
	int64_t saved_ns; /* CLOCK_MONOTONIC after the MSRs (for a TSC without offset attr) */
};

#define ALIGN64(x) (((x) + 63) & ~(size_t)63)
static size_t off_xsave, off_msrs, rec_size, msg_size;

static void layout_message(void) {
	off_xsave = ALIGN64(sizeof(struct vcpu_fixed));
	off_msrs = off_xsave + ALIGN64(xsave_size);
	rec_size = off_msrs +
	           ALIGN64(sizeof(struct kvm_msrs) + nmsrs * sizeof(struct kvm_msr_entry));
	msg_size = ALIGN64(sizeof(struct msg_header)) + nvcpus * rec_size;
}

static unsigned char *vcpu_rec(unsigned char *msg, int i) {
	return msg + ALIGN64(sizeof(struct msg_header)) + i * rec_size;
}

/* --- a VM and its vCPU threads --------------------------------------------------------- */

struct vm;
struct vcpu {
	struct vm *vm;
	int index, fd;
	struct kvm_run *run;
	pthread_t thread;
};

struct vm {
	int fd;
	unsigned char *mem;
	struct vcpu vcpu[MAX_VCPUS];
	pthread_mutex_t lock;
	pthread_cond_t wake, parked_cv;
	int nparked, exiting, do_prerun;
	unsigned gen;
	int64_t tsc_delta; /* guest TSC - host TSC (vCPU 0) */
	atomic_int pausing;
};

static volatile uint64_t *status_word(struct vm *vm, int off) {
	return (volatile uint64_t *)(vm->mem + STATUS_ADDR + off);
}

static void on_kick(int sig) { (void)sig; }

static void unexpected_exit(struct vcpu *v) {
	struct kvm_regs regs;
	unsigned long long rip = ioctl(v->fd, KVM_GET_REGS, &regs) == 0 ? regs.rip : 0;
	if (v->run->exit_reason == KVM_EXIT_INTERNAL_ERROR)
		fail("vCPU %d: KVM_EXIT_INTERNAL_ERROR suberror %u at rip %#llx", v->index,
		     v->run->internal.suberror, rip);
	fail("vCPU %d: unexpected exit %u at rip %#llx", v->index, v->run->exit_reason, rip);
}

static struct kvm_segment segment(uint16_t sel, uint8_t type, uint8_t dpl, int code64) {
	struct kvm_segment s = {.base = 0, .limit = 0xffffffff, .selector = sel, .type = type,
	                        .present = 1, .dpl = dpl, .db = !code64, .s = 1, .l = code64,
	                        .g = 1};
	return s;
}

/* Long mode, paging on, at CPL3 (user) or CPL0, with the given page tables. */
static void set_long_mode(struct vcpu *v, int user, const struct space *sp, uint64_t rip) {
	struct kvm_sregs sregs;
	IOCTL(v->fd, KVM_GET_SREGS, &sregs);
	struct kvm_segment data = user ? segment(SEL_UDATA | 3, 3, 3, 0) : segment(SEL_KDATA, 3, 0, 0);
	sregs.cs = user ? segment(SEL_UCODE | 3, 11, 3, 1) : segment(SEL_KCODE, 11, 0, 1);
	sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data;
	sregs.tr = (struct kvm_segment){.base = sp->tss + TSS_SIZE * v->index, .limit = TSS_LIMIT,
	                                .selector = SEL_TSS + 16 * v->index, .type = 11,
	                                .present = 1};
	sregs.gdt.base = sp->gdt;
	sregs.gdt.limit = GDT_ENTRIES * 8 - 1;
	sregs.idt.base = 0;
	sregs.idt.limit = 0;
	sregs.cr0 = 0x80010033; /* PG WP NE ET MP PE */
	sregs.cr3 = sp->cr3;
	sregs.cr4 = 0x20;    /* PAE */
	sregs.efer = 0x500;  /* LMA LME */
	IOCTL(v->fd, KVM_SET_SREGS, &sregs);
	struct kvm_regs regs = {.rip = rip, .rsp = STACK_TOP - 4096 * v->index,
	                        .rflags = user ? 0x3002 : 0x2}; /* IOPL3 at CPL3; IF=0 */
	IOCTL(v->fd, KVM_SET_REGS, &regs);
	struct kvm_mp_state mp = {.mp_state = KVM_MP_STATE_RUNNABLE}; /* APs start in wait-for-SIPI */
	IOCTL(v->fd, KVM_SET_MP_STATE, &mp);
}

/* -p: run once on the stub (own CR3, one OUT to userspace), complete the I/O, park. */
static void run_stub(struct vcpu *v) {
	set_long_mode(v, 1, &stub_space, STUB_ADDR);
	if (ioctl(v->fd, KVM_RUN, 0) < 0) die("KVM_RUN (pre-run)");
	if (v->run->exit_reason != KVM_EXIT_IO || v->run->io.port != STUB_PORT) unexpected_exit(v);
	v->run->immediate_exit = 1;
	if (ioctl(v->fd, KVM_RUN, 0) == 0 || errno != EINTR) die("KVM_RUN (pre-run I/O completion)");
	v->run->immediate_exit = 0;
}

/* Park until the next resume; returns 0 when the thread must end. */
static int park(struct vcpu *v, unsigned *seen_gen) {
	struct vm *vm = v->vm;
	pthread_mutex_lock(&vm->lock);
	if (++vm->nparked == nvcpus) pthread_cond_signal(&vm->parked_cv);
	while (vm->gen == *seen_gen && !vm->exiting) pthread_cond_wait(&vm->wake, &vm->lock);
	*seen_gen = vm->gen;
	int go = !vm->exiting;
	pthread_mutex_unlock(&vm->lock);
	return go;
}

static void *vcpu_thread(void *arg) {
	struct vcpu *v = arg;
	struct vm *vm = v->vm;
	unsigned seen_gen = 0;
	if (vm->do_prerun) run_stub(v);
	if (!park(v, &seen_gen)) return NULL;
	for (;;) {
		if (ioctl(v->fd, KVM_RUN, 0) == 0) unexpected_exit(v);
		if (errno != EINTR) die("KVM_RUN (vCPU %d)", v->index);
		if (!atomic_load(&vm->pausing)) continue;
		/* Once more with immediate_exit set: KVM completes a pending I/O, returns EINTR. */
		if (ioctl(v->fd, KVM_RUN, 0) == 0) unexpected_exit(v);
		if (errno != EINTR) die("KVM_RUN (vCPU %d, completing I/O)", v->index);
		if (!park(v, &seen_gen)) return NULL;
	}
}

static void wait_parked(struct vm *vm) {
	pthread_mutex_lock(&vm->lock);
	while (vm->nparked < nvcpus) pthread_cond_wait(&vm->parked_cv, &vm->lock);
	pthread_mutex_unlock(&vm->lock);
}

static void resume(struct vm *vm) {
	pthread_mutex_lock(&vm->lock);
	atomic_store(&vm->pausing, 0);
	for (int i = 0; i < nvcpus; i++) vm->vcpu[i].run->immediate_exit = 0;
	vm->nparked = 0;
	vm->gen++;
	pthread_mutex_unlock(&vm->lock);
	pthread_cond_broadcast(&vm->wake);
}

static void pause_vm(struct vm *vm) {
	atomic_store(&vm->pausing, 1);
	for (int i = 0; i < nvcpus; i++) vm->vcpu[i].run->immediate_exit = 1;
	for (int i = 0; i < nvcpus; i++) {
		int e = pthread_kill(vm->vcpu[i].thread, SIGUSR1);
		if (e) {
			errno = e;
			die("pthread_kill");
		}
	}
	wait_parked(vm);
}

static void kvm_create_vm(struct vm *vm) {
	memset(vm, 0, sizeof *vm);
	vm->fd = IOCTL(kvm_fd, KVM_CREATE_VM, 0);
	IOCTL(vm->fd, KVM_SET_TSS_ADDR, 0xfffbd000ul);
	uint64_t identity = 0xfffbc000;
	IOCTL(vm->fd, KVM_SET_IDENTITY_MAP_ADDR, &identity);
	IOCTL(vm->fd, KVM_CREATE_IRQCHIP, 0);
	struct kvm_pit_config pit = {.flags = 0};
	IOCTL(vm->fd, KVM_CREATE_PIT2, &pit);
	vm->mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, mem_fd, 0);
	if (vm->mem == MAP_FAILED) die("mmap guest memory");
	struct kvm_userspace_memory_region region = {
		.slot = 0, .guest_phys_addr = 0, .memory_size = MEM_SIZE,
		.userspace_addr = (uintptr_t)vm->mem};
	IOCTL(vm->fd, KVM_SET_USER_MEMORY_REGION, &region);
	for (int i = 0; i < nvcpus; i++) {
		struct vcpu *v = &vm->vcpu[i];
		v->vm = vm;
		v->index = i;
		v->fd = IOCTL(vm->fd, KVM_CREATE_VCPU, i);
		v->run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->fd, 0);
		if (v->run == MAP_FAILED) die("mmap kvm_run");
		IOCTL(v->fd, KVM_SET_CPUID2, cpuid);
	}
}

/* guest TSC - host TSC, on a vCPU not in KVM_RUN: the TSC offset (0 on this host, where
 * the guest's RDTSC is the host's, whatever the offset), or else the TSC MSR against the
 * host TSC (within a microsecond). */
static int64_t read_tsc_delta(struct vcpu *v) {
#ifdef KVM_VCPU_TSC_CTRL
	if (have_tsc_offset) {
		uint64_t offset;
		struct kvm_device_attr attr = {.group = KVM_VCPU_TSC_CTRL, .attr = KVM_VCPU_TSC_OFFSET,
		                               .addr = (uintptr_t)&offset};
		IOCTL(v->fd, KVM_GET_DEVICE_ATTR, &attr);
		return (int64_t)offset;
	}
#endif
	struct {
		struct kvm_msrs hdr;
		struct kvm_msr_entry entry;
	} tsc = {.hdr.nmsrs = 1, .entry.index = 0x10};
	if (IOCTL(v->fd, KVM_GET_MSRS, &tsc) != 1) fail("KVM_GET_MSRS: IA32_TSC");
	return (int64_t)(tsc.entry.data - __rdtsc());
}

/* A VM with its vCPU threads, parked. source: the guest's initial state is set (the first
 * source); otherwise a destination, its vCPUs pre-run on the stub with -p. */
static void build_vm(struct vm *vm, int source) {
	kvm_create_vm(vm);
	pthread_mutex_init(&vm->lock, NULL);
	pthread_cond_init(&vm->wake, NULL);
	pthread_cond_init(&vm->parked_cv, NULL);
	vm->do_prerun = !source && prerun;
	if (source) {
		vm->tsc_delta = read_tsc_delta(&vm->vcpu[0]);
		set_long_mode(&vm->vcpu[0], 1, &guest_space, LOOP_ADDR);
		for (int i = 1; i < nvcpus; i++) set_long_mode(&vm->vcpu[i], 0, &guest_space, HALT_ADDR);
	}
	for (int i = 0; i < nvcpus; i++) {
		int e = pthread_create(&vm->vcpu[i].thread, NULL, vcpu_thread, &vm->vcpu[i]);
		if (e) {
			errno = e;
			die("pthread_create");
		}
	}
	wait_parked(vm);
}

/* Ends the parked vCPU threads and closes the VM. */
static void destroy_vm(struct vm *vm) {
	pthread_mutex_lock(&vm->lock);
	vm->exiting = 1;
	pthread_cond_broadcast(&vm->wake);
	pthread_mutex_unlock(&vm->lock);
	for (int i = 0; i < nvcpus; i++) {
		pthread_join(vm->vcpu[i].thread, NULL);
		munmap(vm->vcpu[i].run, run_size);
		close(vm->vcpu[i].fd);
	}
	close(vm->fd);
	munmap(vm->mem, MEM_SIZE);
	pthread_mutex_destroy(&vm->lock);
	pthread_cond_destroy(&vm->wake);
	pthread_cond_destroy(&vm->parked_cv);
}

/* --- export and import ----------------------------------------------------------------- */

static void export_vcpu(struct vcpu *v, unsigned char *rec) {
	struct vcpu_fixed *f = (struct vcpu_fixed *)rec;
	struct kvm_msrs *msrs = (struct kvm_msrs *)(rec + off_msrs);
	IOCTL(v->fd, KVM_GET_MP_STATE, &f->mp);
	IOCTL(v->fd, KVM_GET_REGS, &f->regs);
#ifdef KVM_GET_SREGS2
	if (have_sregs2)
		IOCTL(v->fd, KVM_GET_SREGS2, &f->sregs.s2);
	else
#endif
		IOCTL(v->fd, KVM_GET_SREGS, &f->sregs.s);
#ifdef KVM_GET_XSAVE2
	if (have_xsave2)
		IOCTL(v->fd, KVM_GET_XSAVE2, rec + off_xsave);
	else
#endif
		IOCTL(v->fd, KVM_GET_XSAVE, rec + off_xsave);
	IOCTL(v->fd, KVM_GET_XCRS, &f->xcrs);
	IOCTL(v->fd, KVM_GET_DEBUGREGS, &f->dbg);
	IOCTL(v->fd, KVM_GET_LAPIC, &f->lapic);
	msrs->nmsrs = nmsrs;
	for (int i = 0; i < nmsrs; i++) msrs->entries[i].index = msr_index[i];
	int got = IOCTL(v->fd, KVM_GET_MSRS, msrs);
	if (got != nmsrs) fail("KVM_GET_MSRS: read %d of %d (MSR %#x)", got, nmsrs, msr_index[got]);
#ifdef KVM_VCPU_TSC_CTRL
	if (have_tsc_offset) {
		struct kvm_device_attr attr = {.group = KVM_VCPU_TSC_CTRL, .attr = KVM_VCPU_TSC_OFFSET,
		                               .addr = (uintptr_t)&f->tsc_offset};
		IOCTL(v->fd, KVM_GET_DEVICE_ATTR, &attr);
	}
#endif
	f->saved_ns = now_ns();
	IOCTL(v->fd, KVM_GET_VCPU_EVENTS, &f->events);
}

static void import_vcpu(struct vcpu *v, unsigned char *rec) {
	struct vcpu_fixed *f = (struct vcpu_fixed *)rec;
	struct kvm_msrs *msrs = (struct kvm_msrs *)(rec + off_msrs);
	IOCTL(v->fd, KVM_SET_MP_STATE, &f->mp);
	IOCTL(v->fd, KVM_SET_REGS, &f->regs);
#ifdef KVM_GET_SREGS2
	if (have_sregs2)
		IOCTL(v->fd, KVM_SET_SREGS2, &f->sregs.s2);
	else
#endif
		IOCTL(v->fd, KVM_SET_SREGS, &f->sregs.s);
	IOCTL(v->fd, KVM_SET_XSAVE, rec + off_xsave);
	IOCTL(v->fd, KVM_SET_XCRS, &f->xcrs);
	IOCTL(v->fd, KVM_SET_DEBUGREGS, &f->dbg);
	IOCTL(v->fd, KVM_SET_LAPIC, &f->lapic);
	if (!have_tsc_offset) {
		/* No offset to copy: carry the TSC forward by the time since the export. */
		uint64_t ticks = (uint64_t)(now_ns() - f->saved_ns) * tsc_khz / 1000000;
		for (int i = 0; i < nmsrs; i++)
			if (msrs->entries[i].index == 0x10) msrs->entries[i].data += ticks;
	}
	int set = IOCTL(v->fd, KVM_SET_MSRS, msrs);
	if (set != nmsrs)
		fail("KVM_SET_MSRS: wrote %d of %d (MSR %#x)", set, nmsrs, msrs->entries[set].index);
#ifdef KVM_VCPU_TSC_CTRL
	if (have_tsc_offset) {
		struct kvm_device_attr attr = {.group = KVM_VCPU_TSC_CTRL, .attr = KVM_VCPU_TSC_OFFSET,
		                               .addr = (uintptr_t)&f->tsc_offset};
		IOCTL(v->fd, KVM_SET_DEVICE_ATTR, &attr);
	}
#endif
	f->events.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR;
	IOCTL(v->fd, KVM_SET_VCPU_EVENTS, &f->events);
}

static void export_vm(struct vm *vm, struct msg_header *h) {
	IOCTL(vm->fd, KVM_GET_CLOCK, &h->clock);
	h->clock_ns = now_ns();
	for (int c = 0; c < 3; c++) {
		h->chip[c].chip_id = c; /* PIC master, PIC slave, IOAPIC */
		IOCTL(vm->fd, KVM_GET_IRQCHIP, &h->chip[c]);
	}
	IOCTL(vm->fd, KVM_GET_PIT2, &h->pit);
}

static void import_vm(struct vm *vm, struct msg_header *h) {
	IOCTL(vm->fd, KVM_SET_PIT2, &h->pit);
	h->clock.clock += now_ns() - h->clock_ns;
	h->clock.flags = 0;
	IOCTL(vm->fd, KVM_SET_CLOCK, &h->clock);
	for (int c = 0; c < 3; c++) IOCTL(vm->fd, KVM_SET_IRQCHIP, &h->chip[c]);
}

/* --- messages -------------------------------------------------------------------------- */

static void send_small(int sock, uint32_t tag, uint32_t round) {
	struct msg_small m = {tag, round};
	if (send(sock, &m, sizeof m, MSG_NOSIGNAL) != (ssize_t)sizeof m) die("send");
}

static void recv_small(int sock, uint32_t tag, uint32_t round) {
	struct msg_small m;
	ssize_t n = recv(sock, &m, sizeof m, 0);
	if (n < 0) die("recv");
	if (n != (ssize_t)sizeof m || m.tag != tag || m.round != round)
		fail("protocol: expected message %u for round %u, got %zd bytes", tag, round, n);
}

/* Wait until the status word is zero (the guest cleared it). */
static void wait_cleared(struct vm *vm, int off, const char *what) {
	int64_t deadline = now_ns() + 5000000000;
	while (*status_word(vm, off) != 0) {
		if (now_ns() > deadline) fail("the guest did not %s within 5 s", what);
		sleep_ns(20000);
	}
}

/* Wait (up to 50 ms) until vCPU 0 runs: its last stamp is less than 20 us old. On a busy
 * host a vCPU thread may be off the CPU when the pause starts; the guest would then see
 * that wait in its gap. Polls with short sleeps, not a spin: on a host whose other CPU is
 * taken, a spin would keep the vCPU thread off this one. Returns whether it ran. */
static int wait_running(struct vm *vm) {
	int64_t fresh = tsc_khz / 50, deadline = now_ns() + 50000000;
	for (;;) {
		uint64_t stamp = *status_word(vm, ST_STAMP);
		if ((int64_t)(__rdtsc() + vm->tsc_delta - stamp) < fresh) return 1;
		if (now_ns() > deadline) return 0;
		sleep_ns(20000);
	}
}

static double ticks_us(int64_t ticks) { return ticks * 1000.0 / tsc_khz; }

/* --- the two roles --------------------------------------------------------------------- */

static void send_state(struct vm *vm, int sock, unsigned char *msg, uint32_t round) {
	struct msg_header *h = (struct msg_header *)msg;
	h->running = wait_running(vm);
	h->tsc_pause = __rdtsc();
	h->t_pause = now_ns();
	pause_vm(vm);
	h->t_parked = now_ns();
	h->tsc_parked = __rdtsc();
	for (int i = 0; i < nvcpus; i++) export_vcpu(&vm->vcpu[i], vcpu_rec(msg, i));
	export_vm(vm, h);
	h->tsc_delta = vm->tsc_delta;
	h->tag = MSG_STATE;
	h->round = round;
	h->nvcpus = nvcpus;
	h->pid = getpid();
	h->t_send = now_ns();
	if (send(sock, msg, msg_size, MSG_NOSIGNAL) != (ssize_t)msg_size) die("send state");
}

static void receive_state(struct vm *vm, int sock, unsigned char *msg, uint32_t round) {
	struct msg_header *h = (struct msg_header *)msg;
	ssize_t n = recv(sock, msg, msg_size, 0);
	int64_t t_recv = now_ns();
	if (n < 0) die("recv state");
	if (n != (ssize_t)msg_size || h->tag != MSG_STATE || h->round != round)
		fail("protocol: bad state message (%zd bytes)", n);
	import_vm(vm, h);
	for (int i = 0; i < nvcpus; i++) import_vcpu(&vm->vcpu[i], vcpu_rec(msg, i));
	uint64_t tsc_imported = __rdtsc();
	int64_t t_imported = now_ns();
	int64_t delta = vm->tsc_delta = h->tsc_delta;
	*status_word(vm, ST_MAXGAP) = 0;
	*status_word(vm, ST_THRESH) = h->tsc_parked + delta;
	*status_word(vm, ST_MARK) = 1;
	resume(vm);
	wait_cleared(vm, ST_MARK, "run after the hand-off");
	uint64_t gap = *status_word(vm, ST_HGAP), end = *status_word(vm, ST_HEND);
	uint64_t max_gap = *status_word(vm, ST_MAXGAP);
	char line[768];
	int len = snprintf(
		line, sizeof line,
		"{\"round\": %u, \"from_pid\": %d, \"to_pid\": %d, \"pause_us\": %.2f, "
		"\"export_us\": %.2f, \"transfer_us\": %.2f, \"import_us\": %.2f, "
		"\"resume_us\": %.2f, \"blackout_us\": %.2f, \"stop_us\": %.2f, "
		"\"max_gap_us\": %.2f, \"running_at_pause\": %s, \"bytes\": %zu}\n",
		round, h->pid, (int)getpid(), (h->t_parked - h->t_pause) / 1e3,
		(h->t_send - h->t_parked) / 1e3, (t_recv - h->t_send) / 1e3,
		(t_imported - t_recv) / 1e3, ticks_us((int64_t)(end - tsc_imported) - delta),
		ticks_us((int64_t)gap), ticks_us((int64_t)(end - gap - h->tsc_pause) - delta),
		ticks_us((int64_t)max_gap), h->running ? "true" : "false", msg_size);
	if (write(1, line, len) != len) die("write");
}

static void worker(int sock, int first_source) {
	struct vm vm;
	unsigned char *msg = aligned_alloc(64, msg_size);
	if (!msg) die("aligned_alloc");
	memset(msg, 0, msg_size);
	int source = first_source;
	build_vm(&vm, source);
	if (source) {
		resume(&vm);
		int64_t deadline = now_ns() + 5000000000;
		while (*status_word(&vm, ST_COUNT) == 0) {
			if (now_ns() > deadline) fail("the guest did not start within 5 s");
			sleep_ns(20000);
		}
	} else {
		send_small(sock, MSG_READY, 0);
	}
	for (uint32_t round = 0;; round++) {
		if (source) {
			recv_small(sock, MSG_READY, round);
			sleep_ns(settle_ns);
			send_state(&vm, sock, msg, round);
			recv_small(sock, MSG_RESUMED, round);
			destroy_vm(&vm);
			if ((int)round + 1 == count) break;
			/* The next destination is a new process; this one ends (main reaps it). */
			pid_t child = fork();
			if (child < 0) die("fork");
			if (child > 0) _exit(0);
			build_vm(&vm, 0);
			send_small(sock, MSG_READY, round + 1);
			source = 0;
		} else {
			receive_state(&vm, sock, msg, round);
			send_small(sock, MSG_RESUMED, round);
			if ((int)round + 1 == count) {
				pause_vm(&vm);
				destroy_vm(&vm);
				break;
			}
			source = 1;
		}
	}
	free(msg);
}

/* --- set-up ---------------------------------------------------------------------------- */

static void write_space(unsigned char *mem, const struct space *sp) {
	uint64_t *gdt = (uint64_t *)(mem + sp->gdt);
	gdt[SEL_KCODE / 8] = 0x00af9b000000ffff;
	gdt[SEL_KDATA / 8] = 0x00cf93000000ffff;
	gdt[SEL_UDATA / 8] = 0x00cff3000000ffff;
	gdt[SEL_UCODE / 8] = 0x00affb000000ffff;
	for (int i = 0; i < MAX_VCPUS; i++) {
		uint64_t base = sp->tss + TSS_SIZE * i, limit = TSS_LIMIT;
		gdt[SEL_TSS / 8 + 2 * i] = (limit & 0xffff) | (base & 0xffffff) << 16 |
		                           (uint64_t)0x8b << 40 | (base >> 24 & 0xff) << 56;
		gdt[SEL_TSS / 8 + 2 * i + 1] = base >> 32;
		unsigned char *tss = mem + base;
		uint64_t rsp0 = STACK_TOP - 4096 * i;
		memcpy(tss + 4, &rsp0, 8);
		uint16_t iomap = 104; /* the bitmap follows; zero bits: the ports are allowed */
		memcpy(tss + 102, &iomap, 2);
		tss[TSS_LIMIT] = 0xff;
	}
	/* Page tables: present, writable, user; 2 MiB pages. */
	uint64_t *pml4 = (uint64_t *)(mem + sp->cr3);
	uint64_t *pdpt = (uint64_t *)(mem + sp->cr3 + 0x1000);
	uint64_t *pd = (uint64_t *)(mem + sp->cr3 + 0x2000);
	pml4[0] = (sp->cr3 + 0x1000) | 7;
	pdpt[0] = (sp->cr3 + 0x2000) | 7;
	for (uint64_t a = sp->first; a < sp->end; a += 2 << 20) pd[a >> 21] = a | 0x87;
}

static void write_guest_memory(void) {
	unsigned char *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, mem_fd, 0);
	if (mem == MAP_FAILED) die("mmap guest memory");
	write_space(mem, &guest_space);
	write_space(mem, &stub_space);
	memcpy(mem + LOOP_ADDR, floor_loop, floor_loop_end - floor_loop);
	memcpy(mem + HALT_ADDR, floor_halt, floor_halt_end - floor_halt);
	memcpy(mem + STUB_ADDR, floor_stub, floor_stub_end - floor_stub);
	munmap(mem, MEM_SIZE);
}

static void probe(void) {
	if (IOCTL(kvm_fd, KVM_GET_API_VERSION, 0) != KVM_API_VERSION) fail("KVM API version");
	run_size = IOCTL(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
	for (int n = 128;; n *= 2) {
		cpuid = calloc(1, sizeof *cpuid + n * sizeof cpuid->entries[0]);
		if (!cpuid) die("calloc");
		cpuid->nent = n;
		if (ioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, cpuid) == 0) break;
		if (errno != E2BIG) die("KVM_GET_SUPPORTED_CPUID");
		free(cpuid);
	}
	struct kvm_msr_list probe_list = {.nmsrs = 0};
	if (ioctl(kvm_fd, KVM_GET_MSR_INDEX_LIST, &probe_list) < 0 && errno != E2BIG)
		die("KVM_GET_MSR_INDEX_LIST");
	struct kvm_msr_list *list = calloc(1, sizeof *list + probe_list.nmsrs * sizeof(uint32_t));
	if (!list) die("calloc");
	list->nmsrs = probe_list.nmsrs;
	IOCTL(kvm_fd, KVM_GET_MSR_INDEX_LIST, list);
	nmsrs = list->nmsrs;
	msr_index = list->indices;
#ifdef KVM_CAP_XSAVE2
	int size = IOCTL(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_XSAVE2);
	if (size > 0) {
		have_xsave2 = 1;
		if ((size_t)size > xsave_size) xsave_size = size;
	}
#endif
#ifdef KVM_CAP_SREGS2
	have_sregs2 = IOCTL(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_SREGS2) > 0;
#endif
	/* A throwaway VM built like the real ones: the TSC attribute, the TSC frequency and
	 * the MSRs this vCPU really reads and writes (the index list may name more). */
	int saved_nvcpus = nvcpus;
	nvcpus = 1;
	struct vm vm;
	kvm_create_vm(&vm);
	struct vcpu *v = &vm.vcpu[0];
#ifdef KVM_VCPU_TSC_CTRL
	struct kvm_device_attr attr = {.group = KVM_VCPU_TSC_CTRL, .attr = KVM_VCPU_TSC_OFFSET};
	have_tsc_offset = ioctl(v->fd, KVM_HAS_DEVICE_ATTR, &attr) == 0;
#endif
	tsc_khz = IOCTL(v->fd, KVM_GET_TSC_KHZ, 0);
	struct kvm_msrs *msrs = calloc(1, sizeof *msrs + nmsrs * sizeof(struct kvm_msr_entry));
	if (!msrs) die("calloc");
	for (int pass = 0; pass < 2; pass++) {
		for (;;) {
			msrs->nmsrs = nmsrs;
			if (pass == 0)
				for (int i = 0; i < nmsrs; i++) msrs->entries[i].index = msr_index[i];
			int done = pass == 0 ? IOCTL(v->fd, KVM_GET_MSRS, msrs)
			                     : IOCTL(v->fd, KVM_SET_MSRS, msrs);
			if (done == nmsrs) break;
			memmove(&msr_index[done], &msr_index[done + 1], (nmsrs - done - 1) * sizeof(uint32_t));
			memmove(&msrs->entries[done], &msrs->entries[done + 1],
			        (nmsrs - done - 1) * sizeof(struct kvm_msr_entry));
			nmsrs--;
			msrs_dropped++;
		}
	}
	free(msrs);
	munmap(v->run, run_size);
	close(v->fd);
	close(vm.fd);
	munmap(vm.mem, MEM_SIZE);
	nvcpus = saved_nvcpus;
	int has_tsc = 0;
	for (int i = 0; i < nmsrs; i++) has_tsc |= msr_index[i] == 0x10;
	if (!has_tsc) fail("IA32_TSC is not in the MSR list");
}

int main(int argc, char **argv) {
	int opt;
	while ((opt = getopt(argc, argv, "n:v:ps:")) != -1) {
		switch (opt) {
		case 'n': count = atoi(optarg); break;
		case 'v': nvcpus = atoi(optarg); break;
		case 'p': prerun = 1; break;
		case 's': settle_ns = (long)(atof(optarg) * 1e6); break;
		default:
			fprintf(stderr, "usage: %s [-n handoffs] [-v 1..%d] [-p] [-s settle_ms]\n",
			        argv[0], MAX_VCPUS);
			return 2;
		}
	}
	if (count < 1 || nvcpus < 1 || nvcpus > MAX_VCPUS) fail("bad arguments");
	prctl(PR_SET_TIMERSLACK, 1ul);
	struct sigaction sa = {.sa_handler = on_kick}; /* caught: an ignored signal does not
	                                                  interrupt KVM_RUN */
	if (sigaction(SIGUSR1, &sa, NULL) < 0) die("sigaction");
	kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm_fd < 0) die("/dev/kvm");
	mem_fd = memfd_create("floor-guest", MFD_CLOEXEC);
	if (mem_fd < 0) die("memfd_create");
	if (ftruncate(mem_fd, MEM_SIZE) < 0) die("ftruncate");
	write_guest_memory();
	probe();
	layout_message();
	printf("{\"config\": {\"handoffs\": %d, \"vcpus\": %d, \"prerun\": %s, \"tsc_khz\": %u, "
	       "\"msrs\": %d, \"msrs_dropped\": %d, \"xsave_bytes\": %zu, \"xsave2\": %s, "
	       "\"sregs2\": %s, \"tsc_offset_attr\": %s, \"message_bytes\": %zu, "
	       "\"settle_ms\": %.1f}}\n",
	       count, nvcpus, prerun ? "true" : "false", tsc_khz, nmsrs, msrs_dropped, xsave_size,
	       have_xsave2 ? "true" : "false", have_sregs2 ? "true" : "false",
	       have_tsc_offset ? "true" : "false", msg_size, settle_ns / 1e6);
	fflush(stdout);

	if (prctl(PR_SET_CHILD_SUBREAPER, 1ul) < 0) die("PR_SET_CHILD_SUBREAPER");
	int sv[2];
	if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0) die("socketpair");
	struct timeval timeout = {.tv_sec = 30};
	for (int i = 0; i < 2; i++)
		if (setsockopt(sv[i], SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout) < 0)
			die("setsockopt");
	for (int i = 0; i < 2; i++) {
		pid_t pid = fork();
		if (pid < 0) die("fork");
		if (pid == 0) {
			close(sv[1 - i]);
			worker(sv[i], i == 0);
			_exit(0);
		}
	}
	close(sv[0]);
	close(sv[1]);
	/* Every process of the chain ends here (a subreaper); when one fails, its peer's next
	 * recv() sees the socket closed and fails too. */
	int failed = 0;
	for (;;) {
		int st;
		pid_t p = wait(&st);
		if (p < 0 && errno == ECHILD) break;
		if (p < 0) die("wait");
		if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
			if (!failed) fprintf(stderr, "floor: process %d failed\n", (int)p);
			failed = 1;
		}
	}
	return failed;
}
