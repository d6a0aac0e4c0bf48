/*
 * clockprobe [PERIOD_MS [PHASE...]]: prints every guest-visible clock, continuously, so that the host
 * can compare them with its own time (rate) and see what a debugger stop did to them (jump).
 *
 * PHASE is idle<S>, busy<S>, hold<S> or rdtsc<S> (S seconds of guest CLOCK_MONOTONIC); the phases
 * repeat in order, forever. Default: PERIOD_MS 100, one endless idle phase. In the demo guest:
 * vmigdb.programs=clockprobe:1000:idle15:busy15:hold12:rdtsc100000
 *   idle   sleeps between lines (the guest is idle)
 *   busy   spins an integer loop (the guest is busy); work= counts its chunks, the loop rate
 *   hold   idle, and also waits for the RTC's update interrupts (RTC_UIE_ON), so the RTC's offset
 *          from CLOCK_REALTIME is known to within an interrupt's latency: the phase to stop the
 *          guest in (the interrupts wake the guest 64 times a second: not in the idle phase)
 *   rdtsc  times clockprobe_block (8 jumps: 8 TCG translation blocks) with RDTSC every 2 ms, and
 *          counts samples over RDTSC_FACTOR x the median calibrated at start: a debugger stop
 *          or retranslation that the TSC sees shows up as an outlier
 *
 * Output (stdout, flushed):
 *   clockprobe start pid=P period_ms=M block=0xADDR rtc_uie=0|1
 *   clockprobe calibrated rdtsc_median=T
 *   clockprobe clocksource=NAME                                  at start and whenever it changes
 *   clockprobe seq=N phase=P mono=NS real=NS raw=NS tsc=T rtc=S rtc_edge=NS work=W samples=K
 *              outliers=O rmax=X
 * mono/real/raw: CLOCK_MONOTONIC/REALTIME/MONOTONIC_RAW in ns; tsc: RDTSC; rtc: the RTC, in seconds
 * since the epoch. In the hold phase rtc is the value read at its last update interrupt and
 * rtc_edge the CLOCK_REALTIME (ns) when that interrupt arrived, so rtc*1e9 - rtc_edge is the RTC's
 * offset from CLOCK_REALTIME to within an interrupt's latency; elsewhere rtc is read at the line
 * and rtc_edge is 0 (rtc_uie=0 at start: /dev/rtc0 has no update interrupts, and rtc_edge is
 * always 0). work, samples, outliers are cumulative; rmax is the slowest rdtsc sample since the
 * last line, as a multiple of the median.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/rtc.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define NS_PER_SEC 1000000000LL
#define MAX_PHASES 16
#define CALIBRATION 2001
#define RDTSC_FACTOR 100
#define RDTSC_NAP_NS 2000000LL
#define BUSY_CHUNK 100000
#define CLOCKSOURCE "/sys/devices/system/clocksource/clocksource0/current_clocksource"

enum kind { IDLE, BUSY, HOLD, RDTSC };
static const char *const kind_names[] = { "idle", "busy", "hold", "rdtsc" };

struct phase {
	enum kind kind;
	int64_t ns;
};

uint64_t clockprobe_block(void);
__asm__(".text\n"
	"	.p2align 8\n"
	"	.globl clockprobe_block\n"
	"clockprobe_block:\n"
	"	lfence\n"
	"	rdtsc\n"
	"	shlq $32, %rdx\n"
	"	orq %rdx, %rax\n"
	"	movq %rax, %rcx\n"
	"	movq %rcx, %rsi\n"
	"	.rept 8\n"
	"	imulq $3, %rsi, %rsi\n"
	"	addq $7, %rsi\n"
	"	jmp 2f\n"
	"2:\n"
	"	.endr\n"
	"	lfence\n"
	"	rdtsc\n"
	"	shlq $32, %rdx\n"
	"	orq %rdx, %rax\n"
	"	subq %rcx, %rax\n"
	"	ret\n");

static int64_t clock_ns(clockid_t clock)
{
	struct timespec ts;

	clock_gettime(clock, &ts);
	return (int64_t)ts.tv_sec * NS_PER_SEC + ts.tv_nsec;
}

static uint64_t rdtsc(void)
{
	uint32_t lo, hi;

	__asm__ volatile("lfence; rdtsc" : "=a"(lo), "=d"(hi));
	return (uint64_t)hi << 32 | lo;
}

static void nap(int64_t ns)
{
	struct timespec ts = { ns / NS_PER_SEC, ns % NS_PER_SEC };

	while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
		;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return (x > y) - (x < y);
}

/* The RTC's time in seconds since the epoch, or -1. */
static int64_t rtc_read(int fd)
{
	struct rtc_time rt;
	struct tm tm = { 0 };

	if (fd < 0 || ioctl(fd, RTC_RD_TIME, &rt) != 0)
		return -1;
	tm.tm_sec = rt.tm_sec;
	tm.tm_min = rt.tm_min;
	tm.tm_hour = rt.tm_hour;
	tm.tm_mday = rt.tm_mday;
	tm.tm_mon = rt.tm_mon;
	tm.tm_year = rt.tm_year;
	return (int64_t)timegm(&tm);
}

static int rtc_fd = -1, rtc_uie, uie_on;
static int64_t rtc_sec = -1, rtc_edge;

/* Update interrupts on (hold phase) or off (every other phase); an edge seen is only good while on. */
static void rtc_set_uie(int on)
{
	if (!rtc_uie || on == uie_on)
		return;
	ioctl(rtc_fd, on ? RTC_UIE_ON : RTC_UIE_OFF, 0);
	uie_on = on;
	rtc_edge = 0;
}

/* Wait up to timeout_ms for the RTC's update interrupt (with UIE on); note the edge if it came. */
static void rtc_wait(int timeout_ms)
{
	struct pollfd p = { rtc_fd, POLLIN, 0 };
	unsigned long data;

	if (!uie_on) {
		if (timeout_ms > 0)
			nap((int64_t)timeout_ms * 1000000);
		return;
	}
	if (poll(&p, 1, timeout_ms) == 1 && read(rtc_fd, &data, sizeof(data)) == sizeof(data)) {
		rtc_edge = clock_ns(CLOCK_REALTIME);
		rtc_sec = rtc_read(rtc_fd);
	}
}

static void report_clocksource(void)
{
	static char last[64];
	char now[64] = "";
	FILE *f = fopen(CLOCKSOURCE, "r");

	if (f) {
		if (!fgets(now, sizeof(now), f))
			now[0] = 0;
		fclose(f);
	}
	now[strcspn(now, "\n")] = 0;
	if (strcmp(now, last) != 0) {
		strcpy(last, now);
		printf("clockprobe clocksource=%s\n", now[0] ? now : "unknown");
		fflush(stdout);
	}
}

static int parse_phase(const char *arg, struct phase *p)
{
	for (int k = IDLE; k <= RDTSC; k++) {
		size_t n = strlen(kind_names[k]);

		if (strncmp(arg, kind_names[k], n) == 0 && arg[n]) {
			p->kind = k;
			p->ns = strtoll(arg + n, NULL, 10) * NS_PER_SEC;
			return p->ns > 0;
		}
	}
	return 0;
}

int main(int argc, char **argv)
{
	static uint64_t samples[CALIBRATION];
	struct phase phases[MAX_PHASES] = { { IDLE, INT64_MAX } };
	int nphases = 1, cur = 0;
	int64_t period = (argc > 1 ? strtoll(argv[1], NULL, 10) : 100) * 1000000;
	uint64_t median, work = 0, nsamples = 0, outliers = 0, rmax = 0, seq = 0, x = 1;
	int64_t next, phase_end;

	if (period <= 0)
		period = 100 * 1000000;
	if (argc > 2) {
		nphases = 0;
		for (int i = 2; i < argc && nphases < MAX_PHASES; i++)
			if (parse_phase(argv[i], &phases[nphases]))
				nphases++;
		if (!nphases) {
			fprintf(stderr, "clockprobe: phases are idle<S>, busy<S>, hold<S> or rdtsc<S>\n");
			return 2;
		}
	}
	rtc_fd = open("/dev/rtc0", O_RDONLY | O_CLOEXEC);
	rtc_uie = rtc_fd >= 0 && ioctl(rtc_fd, RTC_UIE_ON, 0) == 0;
	if (rtc_uie)
		ioctl(rtc_fd, RTC_UIE_OFF, 0);
	printf("clockprobe start pid=%ld period_ms=%lld block=0x%lx rtc_uie=%d\n", (long)getpid(),
	       (long long)(period / 1000000), (unsigned long)&clockprobe_block, rtc_uie);
	for (int i = 0; i < CALIBRATION; i++)
		samples[i] = clockprobe_block();
	qsort(samples, CALIBRATION, sizeof(samples[0]), cmp_u64);
	median = samples[CALIBRATION / 2] ? samples[CALIBRATION / 2] : 1;
	printf("clockprobe calibrated rdtsc_median=%lu\n", (unsigned long)median);
	fflush(stdout);

	next = clock_ns(CLOCK_MONOTONIC);
	phase_end = phases[0].ns == INT64_MAX ? INT64_MAX : next + phases[0].ns;
	rtc_set_uie(phases[0].kind == HOLD);
	for (;;) {
		int64_t now = clock_ns(CLOCK_MONOTONIC);

		if (now >= next) {
			int64_t real = clock_ns(CLOCK_REALTIME), raw = clock_ns(CLOCK_MONOTONIC_RAW);
			uint64_t tsc = rdtsc();
			if (!uie_on)
				rtc_sec = rtc_read(rtc_fd);
			report_clocksource();
			printf("clockprobe seq=%lu phase=%s mono=%lld real=%lld raw=%lld tsc=%lu rtc=%lld "
			       "rtc_edge=%lld work=%lu samples=%lu outliers=%lu rmax=%lu\n",
			       (unsigned long)++seq, kind_names[phases[cur].kind], (long long)now,
			       (long long)real, (long long)raw, (unsigned long)tsc, (long long)rtc_sec,
			       (long long)rtc_edge, (unsigned long)work,
			       (unsigned long)nsamples, (unsigned long)outliers,
			       (unsigned long)(rmax / median));
			fflush(stdout);
			rmax = 0;
			next += period;
			if (next < now) /* a stop (or a slow host) passed: no burst of catch-up lines */
				next = now + period;
			if (now >= phase_end) {
				cur = (cur + 1) % nphases;
				phase_end = now + phases[cur].ns;
				rtc_set_uie(phases[cur].kind == HOLD);
			}
			continue;
		}
		switch (phases[cur].kind) {
		case IDLE:
		case HOLD:
			rtc_wait((int)((next - now + 999999) / 1000000));
			break;
		case BUSY:
			for (int i = 0; i < BUSY_CHUNK; i++) {
				x = x * 6364136223846793005ULL + 1442695040888963407ULL;
				__asm__ volatile("" : "+r"(x));
			}
			work++;
			rtc_wait(0);
			break;
		case RDTSC: {
			uint64_t t = clockprobe_block();

			nsamples++;
			outliers += t > RDTSC_FACTOR * median;
			rmax = t > rmax ? t : rmax;
			rtc_wait(0);
			nap(RDTSC_NAP_NS);
			break;
		}
		}
	}
}
