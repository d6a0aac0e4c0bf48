/*
 * sysloop: as many system calls as it can (getppid, the cheapest), for measuring what a debugger
 * costs a process it does not debug. Reports once a second:
 *     sysloop pid=N                      once, at start
 *     sysloop pid=N rate=R               syscalls in the last second (CLOCK_MONOTONIC)
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define NS_PER_SEC 1000000000LL
#define BATCH 1000

static int64_t monotonic_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * NS_PER_SEC + ts.tv_nsec;
}

int main(void)
{
	long pid = syscall(SYS_getpid);
	int64_t start = monotonic_ns();
	unsigned long calls = 0;

	printf("sysloop pid=%ld\n", pid);
	fflush(stdout);
	for (;;) {
		for (int i = 0; i < BATCH; i++)
			syscall(SYS_getppid);
		calls += BATCH;
		int64_t now = monotonic_ns();

		if (now - start >= NS_PER_SEC) {
			printf("sysloop pid=%ld rate=%lu\n", pid, (unsigned long)(calls * NS_PER_SEC / (now - start)));
			fflush(stdout);
			calls = 0;
			start = now;
		}
	}
}
