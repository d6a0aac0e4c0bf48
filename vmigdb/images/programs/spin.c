/*
 * spin VALUE [SECONDS]: calls vmigdb_spin_target(VALUE) forever (or for SECONDS, then exits,
 * printing "spin pid=N exiting"), so a breakpoint there sees $rdi == VALUE.
 *
 * Built -no-pie, so two copies with different values share the function's virtual address: a
 * debugger must tell the processes apart by more than the address. Reports at start and then
 * once a second:
 *     spin pid=N value=V addr=0xADDR count=C       (V in decimal; VALUE may be given as 0x...)
 * and naps 1 ms every SPINS_PER_NAP calls so the guest stays responsive.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define NS_PER_SEC 1000000000LL
#define SPINS_PER_NAP 100000

/* noipa: no inlining, cloning or constant propagation, so every call really passes value in rdi. */
__attribute__((noinline, noipa)) long vmigdb_spin_target(long value)
{
	return value + 1;
}

static int64_t monotonic_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * NS_PER_SEC + ts.tv_nsec;
}

static void report(long pid, long value, unsigned long count)
{
	printf("spin pid=%ld value=%ld addr=0x%lx count=%lu\n", pid, value,
	       (unsigned long)(uintptr_t)&vmigdb_spin_target, count);
	fflush(stdout);
}

int main(int argc, char **argv)
{
	long value = argc > 1 ? strtol(argv[1], NULL, 0) : 0;
	long seconds = argc > 2 ? strtol(argv[2], NULL, 0) : 0;
	long pid = syscall(SYS_getpid);
	const struct timespec nap = { 0, 1000000 };
	unsigned long count = 0;
	volatile long sink;
	int64_t next = monotonic_ns() + NS_PER_SEC;
	int64_t end = seconds > 0 ? monotonic_ns() + seconds * NS_PER_SEC : INT64_MAX;

	report(pid, value, count);
	for (;;) {
		sink = vmigdb_spin_target(value);
		(void)sink;
		if (++count % SPINS_PER_NAP)
			continue;
		nanosleep(&nap, NULL);
		if (monotonic_ns() >= next) {
			report(pid, value, count);
			next = monotonic_ns() + NS_PER_SEC;
		}
		if (monotonic_ns() >= end) {
			printf("spin pid=%ld exiting\n", pid);
			fflush(stdout);
			return 0;
		}
	}
}
