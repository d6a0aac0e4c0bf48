/*
 * probe [PERIOD_MS]: a syscall-heavy neighbour for soak tests. Every PERIOD_MS (default 50) it opens
 * /proc/self/status, reads it whole and closes it, so the kernel's path walk, file and memory code
 * run on whichever vCPU the process is scheduled on. Reports at start and once a second:
 *     probe pid=N period_ms=P
 *     probe pid=N round=R opens=O
 * A probe whose rounds stop advancing means its vCPU (or the whole guest) is stuck.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define NS_PER_SEC 1000000000LL

static int64_t monotonic_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * NS_PER_SEC + ts.tv_nsec;
}

int main(int argc, char **argv)
{
	long period_ms = argc > 1 ? strtol(argv[1], NULL, 0) : 50;
	long pid = syscall(SYS_getpid);
	struct timespec nap = { period_ms / 1000, (period_ms % 1000) * 1000000L };
	unsigned long round = 0, opens = 0;
	int64_t next = monotonic_ns() + NS_PER_SEC;
	char buf[4096];

	printf("probe pid=%ld period_ms=%ld\n", pid, period_ms);
	fflush(stdout);
	for (;;) {
		int fd = open("/proc/self/status", O_RDONLY);

		if (fd >= 0) {
			while (read(fd, buf, sizeof(buf)) > 0)
				;
			close(fd);
			opens++;
		}
		nanosleep(&nap, NULL);
		if (monotonic_ns() >= next) {
			printf("probe pid=%ld round=%lu opens=%lu\n", pid, ++round, opens);
			fflush(stdout);
			next = monotonic_ns() + NS_PER_SEC;
		}
	}
}
