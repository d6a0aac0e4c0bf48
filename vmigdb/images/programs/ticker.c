/*
 * ticker: the demo guest's default workload.
 *
 * It makes a steady stream of getpid system calls (for syscall breakpoints), sleeps a little so
 * the guest is not 100% busy, and reports once a second:
 *     ticker pid=N buf=0xADDR value=HEX32     once, at start
 *     ticker pid=N round=R calls=C            every ~second
 * vmigdb_ticker_buf holds 16 bytes derived from the pid ("TICK", pid LE32, ~pid LE32, "KCIT") so a
 * test can read the process's memory through the debugger and compare it with the printed value.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define NS_PER_SEC 1000000000LL
#define CALLS_PER_NAP 1000

unsigned char vmigdb_ticker_buf[16];

static int64_t monotonic_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * NS_PER_SEC + ts.tv_nsec;
}

static void fill_buf(uint32_t pid)
{
	for (int i = 0; i < 4; i++) {
		vmigdb_ticker_buf[4 + i] = (unsigned char)(pid >> (8 * i));
		vmigdb_ticker_buf[8 + i] = (unsigned char)(~pid >> (8 * i));
	}
	memcpy(vmigdb_ticker_buf, "TICK", 4);
	memcpy(vmigdb_ticker_buf + 12, "KCIT", 4);
}

int main(void)
{
	/* syscall() rather than getpid(): every call must reach the kernel. */
	long pid = syscall(SYS_getpid);
	const struct timespec nap = { 0, 1000000 };
	unsigned long calls = 0, round = 0;
	int64_t next;

	fill_buf((uint32_t)pid);
	printf("ticker pid=%ld buf=0x%lx value=", pid, (unsigned long)(uintptr_t)vmigdb_ticker_buf);
	for (size_t i = 0; i < sizeof(vmigdb_ticker_buf); i++)
		printf("%02x", vmigdb_ticker_buf[i]);
	printf("\n");
	fflush(stdout);

	next = monotonic_ns() + NS_PER_SEC;
	for (;;) {
		syscall(SYS_getpid);
		if (++calls % CALLS_PER_NAP)
			continue;
		nanosleep(&nap, NULL);
		if (monotonic_ns() >= next) {
			printf("ticker pid=%ld round=%lu calls=%lu\n", pid, ++round, calls);
			fflush(stdout);
			next = monotonic_ns() + NS_PER_SEC;
		}
	}
}
