/*
 * sysloop: as many system calls as it can (getppid, the cheapest), for measuring what a debugger
 * costs a process it does not debug. Reports every quarter second of its own time:
 *     sysloop pid=N                      once, at start
 *     sysloop pid=N calls=C rate=R       C calls so far, R per second since the last report
 * The host reads C against its own clock: the guest's stops for a debugger do not show in the
 * guest's clocks (instruction-counted time stands still while the VM is stopped), so only the host
 * can see what they cost.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define NS_PER_SEC 1000000000LL
#define REPORT_NS (NS_PER_SEC / 4)
#define BATCH 100

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
	unsigned long calls = 0, total = 0;

	printf("sysloop pid=%ld\n", pid);
	fflush(stdout);
	for (;;) {
		for (int i = 0; i < BATCH; i++)
			syscall(SYS_getppid);
		calls += BATCH;
		total += BATCH;
		int64_t now = monotonic_ns();

		if (now - start >= REPORT_NS) {
			printf("sysloop pid=%ld calls=%lu rate=%lu\n", pid, total,
			       (unsigned long)(calls * NS_PER_SEC / (now - start)));
			fflush(stdout);
			calls = 0;
			start = now;
		}
	}
}
