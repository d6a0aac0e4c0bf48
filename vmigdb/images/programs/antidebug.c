/*
 * antidebug: the anti-debugging battery real malware runs, looping forever in the demo guest, to
 * prove from inside the guest that a hypervisor-side debugger leaves no trace.
 *
 * Output (stdout, one line each, flushed):
 *     antidebug pid=P checksum_start=0xADDR checksum_end=0xADDR canary=0xADDR      once, at start
 *     antidebug calibrated rdtsc_median=T syscall_median_ns=S tsc_per_us=F         once, calibrated
 *     antidebug round=N detections=K[ NAME,NAME...] rdtsc_outliers=M rdtsc_max=X   every ~second
 * Every field is key=value except the detection names: a comma-separated list of the detections
 * that fired this round, present only when K > 0 (so "detections=0 rdtsc_outliers=0 ..."). Regex:
 *  ^antidebug round=(\d+) detections=(\d+)(?: ([a-z0-9_,]+))? rdtsc_outliers=(\d+) rdtsc_max=(\d+)$
 * rdtsc_outliers (0-3) counts this round's RDTSC samples over 100x the calibrated median, noise
 * included (an interrupt or a host preemption landing in a sample); rdtsc_max is the round's
 * slowest sample as a multiple of that median.
 *
 * [checksum_start, checksum_end) is all of this program's own code (section "adcode": every
 * function below, not libc's). canary is a function inside it that is never executed, so a
 * debugger may patch a byte there (GDB `set {char}CANARY = 0xcc` in this process): only `checksum`
 * fires.
 *
 * Detections (each round; thresholds are generous: zero false positives under a noisy QEMU TCG):
 *   checksum        FNV-1a of the code range differs from the value computed at start
 *   tracerpid       TracerPid in /proc/self/status is not 0
 *   ptrace          a forked child cannot PTRACE_ATTACH to us (then detaches), or its own
 *                   PTRACE_TRACEME fails; it reports by exit status
 *   pushf_tf        TF set in the flags pushf stores
 *   int3            our own int3 is not delivered as exactly one SIGTRAP, right after the int3
 *   popf_tf         TF set with popf does not give exactly one SIGTRAP, right after the next insn
 *   rdtsc           2 or 3 of 3 RDTSC-timed blocks, each run once a round, took over 100x their
 *                   median over 3x667 runs at start. A block is 8 TCG translation blocks (16 ALU
 *                   instructions and a jmp each): code retranslated after a debugger changed
 *                   breakpoints or stepped costs ~1000x, in every block at once; host caches cold
 *                   after the nap cost ~10x; an interrupt or host preemption hits one block.
 *   syscall_time    the median of 15 getppid calls timed with CLOCK_MONOTONIC_RAW is over 20x
 *                   the median of 301 at start (a breakpoint, even conditional, on a hot path)
 *   monotonic_jump  CLOCK_MONOTONIC across the 900 ms nap between rounds: less than the nap, or
 *   realtime_jump   CLOCK_REALTIME   more than the nap + 2 s (a stop that time did not hide)
 *   tsc_clock       the TSC (at its rate measured at start) and CLOCK_MONOTONIC disagree about
 *                   that nap by over 500 ms (one clock frozen while stopped, the other not)
 *   rtc             the RTC (/dev/rtc0, whole seconds) minus CLOCK_REALTIME moved by over 2 s since
 *                   the last round, or since start by over 2 s + 2% of the time elapsed (allowing
 *                   for the kernel's TSC calibration under TCG); skipped if unreadable at start
 * Not counted: the CPUID hypervisor bit (a VM tell, always there); debug registers (no user
 * access).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/rtc.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

#define NS_PER_SEC 1000000000LL
#define SLEEP_NS 900000000LL /* the nap between rounds, about one round a second */
#define JUMP_NS (2 * NS_PER_SEC)
#define SKEW_NS (NS_PER_SEC / 2)
#define RDTSC_BLOCKS 3
#define RDTSC_CALIBRATION (RDTSC_BLOCKS * 667)
#define RDTSC_FACTOR 100
#define RDTSC_VOTES 2 /* slow blocks in one round that make a detection */
#define SYSCALL_CALIBRATION 301
#define SYSCALL_SAMPLES 15
#define SYSCALL_FACTOR 20
#define X86_TF 0x100UL

/* Every function of this program lives in section "adcode", the checksummed range; the linker
 * defines __start_adcode and __stop_adcode around it. */
#define CODE __attribute__((section("adcode")))
extern const unsigned char __start_adcode[], __stop_adcode[];

/* The probes that need exact instructions, in assembly. Each returns in rax what the C side checks:
 * pushf_flags the flags; int3_probe and popf_probe the address where their SIGTRAP must land;
 * rdtsc_block0..2 (three copies of one block) the TSC ticks across their block. */
unsigned long pushf_flags(void);
unsigned long int3_probe(void);
unsigned long popf_probe(void);
unsigned long rdtsc_block0(void), rdtsc_block1(void), rdtsc_block2(void);
static unsigned long (*const rdtsc_blocks[RDTSC_BLOCKS])(void) = {
	rdtsc_block0, rdtsc_block1, rdtsc_block2,
};
void antidebug_canary(void);
__asm__(".pushsection adcode,\"ax\",@progbits\n"
	"pushf_flags:\n"
	"	pushfq\n"
	"	popq %rax\n"
	"	ret\n"
	"int3_probe:\n"
	"	int3\n"
	"1:	leaq 1b(%rip), %rax\n" /* the trap's rip: right after the int3 */
	"	ret\n"
	"popf_probe:\n"
	"	pushfq\n"
	"	orq $0x100, (%rsp)\n" /* TF */
	"	popfq\n"
	"	nop\n" /* TF takes effect after popf: the trap comes after this instruction */
	"1:	leaq 1b(%rip), %rax\n" /* the handler cleared TF: nothing traps from here on */
	"	ret\n"
	".macro timed name\n"
	"	.p2align 10\n" /* each timed block sits in one page */
	"\\name:\n"
	"	lfence\n"
	"	rdtsc\n"
	"	shlq $32, %rdx\n"
	"	orq %rdx, %rax\n"
	"	movq %rax, %rcx\n"
	"	movq %rcx, %rsi\n"
	"	.rept 8\n" /* straight-line work; each jmp ends a translation block under TCG */
	"	.rept 8\n" /* enough work that 100x hot sits well above cold caches' cost */
	"	imulq $3, %rsi, %rsi\n"
	"	addq $7, %rsi\n"
	"	.endr\n"
	"	jmp 2f\n"
	"2:\n"
	"	.endr\n"
	"	lfence\n"
	"	rdtsc\n"
	"	shlq $32, %rdx\n"
	"	orq %rdx, %rax\n"
	"	subq %rcx, %rax\n"
	"	ret\n"
	".endm\n"
	"	timed rdtsc_block0\n"
	"	timed rdtsc_block1\n"
	"	timed rdtsc_block2\n"
	"	.globl antidebug_canary\n"
	"antidebug_canary:\n" /* never called: bytes a debugger may patch (nops, then ud2) */
	"	.fill 16, 1, 0x90\n"
	"	ud2\n"
	".popsection\n");

static volatile sig_atomic_t traps;
static volatile unsigned long trap_rip;

CODE static void on_sigtrap(int sig, siginfo_t *info, void *context)
{
	ucontext_t *uc = context;

	(void)sig;
	(void)info;
	traps++;
	trap_rip = uc->uc_mcontext.gregs[REG_RIP];
	uc->uc_mcontext.gregs[REG_EFL] &= ~X86_TF; /* popf_probe's TF: one trap only */
}

CODE static int64_t clock_ns(clockid_t clock)
{
	struct timespec ts;

	clock_gettime(clock, &ts);
	return (int64_t)ts.tv_sec * NS_PER_SEC + ts.tv_nsec;
}

CODE static uint64_t rdtsc(void)
{
	uint32_t lo, hi;

	__asm__ volatile("lfence; rdtsc" : "=a"(lo), "=d"(hi));
	return (uint64_t)hi << 32 | lo;
}

CODE static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return (x > y) - (x < y);
}

CODE static uint64_t median(uint64_t *v, size_t n)
{
	qsort(v, n, sizeof(*v), cmp_u64);
	return v[n / 2];
}

CODE static uint64_t code_checksum(void)
{
	uint64_t h = 0xcbf29ce484222325ULL; /* FNV-1a */

	for (const volatile unsigned char *p = __start_adcode; p < __stop_adcode; p++)
		h = (h ^ *p) * 0x100000001b3ULL;
	return h;
}

CODE static int tracer_pid(void)
{
	char line[256];
	int pid = 0;
	FILE *f = fopen("/proc/self/status", "r");

	if (!f)
		return 0;
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "TracerPid: %d", &pid) == 1)
			break;
	fclose(f);
	return pid;
}

/* A forked child asks, and reports by its exit status: can it attach to us (not if something
 * already traces us; it detaches at once), and may it PTRACE_TRACEME (not if a debugger that
 * follows forks traces it)? TRACEME is never undone, hence a fresh child each round. */
CODE static int ptrace_fails(void)
{
	int status;
	pid_t parent = getpid(), child = fork();

	if (child == 0) {
		if (ptrace(PTRACE_ATTACH, parent, NULL, NULL) != 0)
			_exit(1);
		waitpid(parent, &status, __WALL); /* our parent's attach stop; detach drops its SIGSTOP */
		ptrace(PTRACE_DETACH, parent, NULL, NULL);
		_exit(ptrace(PTRACE_TRACEME, 0, NULL, NULL) == 0 ? 0 : 1);
	}
	if (child < 0 || waitpid(child, &status, 0) != child)
		return 0; /* could not ask: no verdict */
	return !WIFEXITED(status) || WEXITSTATUS(status) != 0;
}

/* One trap probe: exactly one SIGTRAP, at the address the probe returns. */
CODE static int trap_wrong(unsigned long (*probe)(void))
{
	unsigned long expected;

	traps = 0;
	trap_rip = 0;
	expected = probe();
	return traps != 1 || trap_rip != expected;
}

CODE static uint64_t syscall_ns(void)
{
	int64_t t0 = clock_ns(CLOCK_MONOTONIC_RAW);

	syscall(SYS_getppid);
	return clock_ns(CLOCK_MONOTONIC_RAW) - t0;
}

/* The RTC minus CLOCK_REALTIME in ns (the RTC counts whole seconds); *ok = 0 if it is unreadable
 * three times in a row. */
CODE static int64_t rtc_offset_ns(int *ok)
{
	struct rtc_time rt;
	struct tm tm = { 0 };
	int fd = open("/dev/rtc0", O_RDONLY | O_CLOEXEC);

	*ok = 0;
	for (int i = 0; fd >= 0 && !*ok && i < 3; i++)
		*ok = ioctl(fd, RTC_RD_TIME, &rt) == 0;
	if (fd >= 0)
		close(fd);
	if (!*ok)
		return 0;
	tm.tm_sec = rt.tm_sec;
	tm.tm_min = rt.tm_min;
	tm.tm_hour = rt.tm_hour;
	tm.tm_mday = rt.tm_mday;
	tm.tm_mon = rt.tm_mon;
	tm.tm_year = rt.tm_year;
	return (int64_t)timegm(&tm) * NS_PER_SEC - clock_ns(CLOCK_REALTIME);
}

CODE static void nap(int64_t ns)
{
	struct timespec ts = { ns / NS_PER_SEC, ns % NS_PER_SEC };

	while (nanosleep(&ts, &ts) != 0)
		;
}

/* The detections that fired this round, and their names. */
struct verdict {
	int count;
	char names[256];
};

CODE static void check(struct verdict *v, int fired, const char *name)
{
	if (!fired)
		return;
	snprintf(v->names + strlen(v->names), sizeof(v->names) - strlen(v->names), "%s%s",
		 v->count ? "," : " ", name);
	v->count++;
}

CODE int main(void)
{
	static uint64_t samples[RDTSC_CALIBRATION];
	struct sigaction sa = { 0 };
	uint64_t checksum, rdtsc_median, syscall_median;
	double tsc_per_ns;
	int64_t rtc_start, rtc_last, start_ns;
	int rtc_ok;

	printf("antidebug pid=%ld checksum_start=0x%lx checksum_end=0x%lx canary=0x%lx\n",
	       (long)getpid(), (unsigned long)__start_adcode, (unsigned long)__stop_adcode,
	       (unsigned long)antidebug_canary);
	fflush(stdout);

	sa.sa_sigaction = on_sigtrap;
	sa.sa_flags = SA_SIGINFO;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGTRAP, &sa, NULL);

	/* Calibration: everything the rounds compare against. */
	checksum = code_checksum();
	for (int i = 0; i < RDTSC_CALIBRATION; i++)
		samples[i] = rdtsc_blocks[i % RDTSC_BLOCKS]();
	rdtsc_median = median(samples, RDTSC_CALIBRATION);
	if (rdtsc_median == 0) /* a TSC that does not tick (it never happens): no division by 0 */
		rdtsc_median = 1;
	for (int i = 0; i < SYSCALL_CALIBRATION; i++)
		samples[i] = syscall_ns();
	syscall_median = median(samples, SYSCALL_CALIBRATION);
	for (int i = 0; i < 5; i++) { /* TSC ticks per ns: the median of five 100 ms naps */
		uint64_t t = rdtsc();
		int64_t m = clock_ns(CLOCK_MONOTONIC);

		nap(NS_PER_SEC / 10);
		samples[i] = (rdtsc() - t) * 1000 / (uint64_t)(clock_ns(CLOCK_MONOTONIC) - m);
	}
	tsc_per_ns = median(samples, 5) / 1000.0;
	rtc_start = rtc_last = rtc_offset_ns(&rtc_ok);
	printf("antidebug calibrated rdtsc_median=%lu syscall_median_ns=%lu tsc_per_us=%.0f\n",
	       (unsigned long)rdtsc_median, (unsigned long)syscall_median, tsc_per_ns * 1000);
	fflush(stdout);

	start_ns = clock_ns(CLOCK_MONOTONIC);
	for (unsigned long round = 1;; round++) {
		struct verdict v = { 0, "" };
		/* The nap between rounds, timed by three clocks. */
		uint64_t tsc0 = rdtsc(), worst = 0;
		int64_t mono_dt = clock_ns(CLOCK_MONOTONIC), real_dt = clock_ns(CLOCK_REALTIME), tsc_dt;
		int outliers = 0;

		nap(SLEEP_NS);
		tsc_dt = (int64_t)((rdtsc() - tsc0) / tsc_per_ns);
		mono_dt = clock_ns(CLOCK_MONOTONIC) - mono_dt;
		real_dt = clock_ns(CLOCK_REALTIME) - real_dt;

		check(&v, code_checksum() != checksum, "checksum");
		check(&v, tracer_pid() != 0, "tracerpid");
		check(&v, ptrace_fails(), "ptrace");
		check(&v, (pushf_flags() & X86_TF) != 0, "pushf_tf");
		check(&v, trap_wrong(int3_probe), "int3");
		check(&v, trap_wrong(popf_probe), "popf_tf");
		for (int i = 0; i < RDTSC_BLOCKS; i++) {
			uint64_t t = rdtsc_blocks[i]();

			outliers += t > RDTSC_FACTOR * rdtsc_median;
			worst = t > worst ? t : worst;
		}
		check(&v, outliers >= RDTSC_VOTES, "rdtsc");
		for (int i = 0; i < SYSCALL_SAMPLES; i++)
			samples[i] = syscall_ns();
		check(&v, median(samples, SYSCALL_SAMPLES) > SYSCALL_FACTOR * syscall_median,
		      "syscall_time");
		check(&v, mono_dt < SLEEP_NS || mono_dt > SLEEP_NS + JUMP_NS, "monotonic_jump");
		check(&v, real_dt < SLEEP_NS || real_dt > SLEEP_NS + JUMP_NS, "realtime_jump");
		check(&v, llabs(tsc_dt - mono_dt) > SKEW_NS, "tsc_clock");
		if (rtc_ok) { /* an RTC that stops answering is a detection too */
			int ok;
			int64_t rtc = rtc_offset_ns(&ok);
			int64_t allow = JUMP_NS + (clock_ns(CLOCK_MONOTONIC) - start_ns) / 50;

			check(&v, !ok || llabs(rtc - rtc_last) > JUMP_NS || llabs(rtc - rtc_start) > allow,
			      "rtc");
			rtc_last = ok ? rtc : rtc_last;
		}
		printf("antidebug round=%lu detections=%d%s rdtsc_outliers=%d rdtsc_max=%lu\n", round,
		       v.count, v.names, outliers, (unsigned long)(worst / rdtsc_median));
		fflush(stdout);
	}
}
