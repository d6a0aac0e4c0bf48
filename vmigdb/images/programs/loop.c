/*
 * loop [park]: scripts/bench's workload for conditional breakpoints and `next` over a long line.
 *
 * Prints once at start:
 *     loop pid=N target=0xADDR line=L
 * (ADDR of vmigdb_loop_target, L the line of the one-line loop in vmigdb_loop_sum). With the
 * argument "park" it then waits, calling vmigdb_loop_parked() every 100 ms, until a debugger sets
 * vmigdb_loop_go to 1 (prints "loop pid=N parked" first, "loop pid=N unparked" after), so that a
 * guest started with it stays quiet until the debugger wants the load. Then forever:
 *   - calls vmigdb_loop_target(i) for i = 0, 1, ... CALLS_PER_ROUND-1 (well under a second of
 *     TCG time), so `break vmigdb_loop_target if $rdi == N` stops at the Nth call of a round;
 *   - calls vmigdb_loop_sum() once: one source line that loops vmigdb_loop_count (100,000) times;
 *   - prints "loop pid=N round=R sum=S", naps 10 ms.
 * A debugger may lower vmigdb_loop_count (read once per call) to make a stepped `next` shorter.
 *
 * This file's code starts on a 1 MiB boundary (the aligned attribute below; 0x600000 with Debian
 * 12's toolchain), past the text of ticker and spin (static, non-PIE, from 0x401000 up): only this
 * program runs code at these addresses (busybox's text reaches 0x585000, and it idles).
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define CALLS_PER_ROUND 4000000L
#define SUM_ITERATIONS 100000L
#define LOOP_LINE 46 /* the line of the one-line loop below (checked at compile time) */

volatile long vmigdb_loop_sink;
volatile long vmigdb_loop_count = SUM_ITERATIONS;
volatile long vmigdb_loop_done;
volatile long vmigdb_loop_go;

/* noipa: no inlining, cloning or constant propagation, so every call really passes i in rdi. */
__attribute__((noinline, noipa, aligned(1 << 20))) long vmigdb_loop_target(long i)
{
	return i + 1;
}

__attribute__((noinline, noipa)) long vmigdb_loop_sum(void)
{
	long n = vmigdb_loop_count, i;

	for (i = 0; i < n; i++) vmigdb_loop_sink += i; /* vmigdb-loop-line */
	_Static_assert(__LINE__ - 1 == LOOP_LINE, "LOOP_LINE must be the line of the loop");
	vmigdb_loop_done = i;
	return vmigdb_loop_sink;
}

__attribute__((noinline, noipa)) void vmigdb_loop_parked(void)
{
	const struct timespec nap = { 0, 100000000 };

	nanosleep(&nap, NULL);
}

int main(int argc, char **argv)
{
	long pid = syscall(SYS_getpid);
	const struct timespec nap = { 0, 10000000 };
	unsigned long round = 0;
	volatile long sink;

	printf("loop pid=%ld target=0x%lx line=%d\n", pid, (unsigned long)&vmigdb_loop_target,
	       LOOP_LINE);
	fflush(stdout);
	if (argc > 1 && strcmp(argv[1], "park") == 0) {
		printf("loop pid=%ld parked\n", pid);
		fflush(stdout);
		while (!vmigdb_loop_go)
			vmigdb_loop_parked();
		printf("loop pid=%ld unparked\n", pid);
		fflush(stdout);
	}
	for (;;) {
		for (long i = 0; i < CALLS_PER_ROUND; i++)
			sink = vmigdb_loop_target(i);
		(void)sink;
		long sum = vmigdb_loop_sum();
		printf("loop pid=%ld round=%lu sum=%ld\n", pid, ++round, sum);
		fflush(stdout);
		nanosleep(&nap, NULL);
	}
}
