/*
 * dynhello [PERIOD_MS [ROUNDS]]: a dynamically linked program (Debian's libc, position-independent), for
 * what a debugger sees of a process with shared libraries. vmigdb-build: dynamic
 *
 * Its first output comes before anything else it does, so a test can tell whether it has run at
 * all:
 *     dynhello pid=N started
 * then its own /proc/self/maps, as the kernel prints it, between two marker lines (ground truth
 * for `monitor maps`; nothing it does afterwards maps or unmaps memory):
 *     dynhello pid=N maps-begin
 *     <the lines of /proc/self/maps>
 *     dynhello pid=N maps-end
 * and then, every PERIOD_MS (default 1000), it opens /etc/hostname (an openat system call),
 * reads it, closes it and says so through greet() and puts():
 *     dynhello pid=N round=R fd=F
 * greet() is exported (-rdynamic) and not inlined, so a backtrace from puts names it. With ROUNDS
 * it exits after that many rounds (default: never).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static char maps[65536];
static char line[128];

__attribute__((noinline)) int greet(long pid, unsigned long round, int fd)
{
	snprintf(line, sizeof(line), "dynhello pid=%ld round=%lu fd=%d", pid, round, fd);
	int ret = puts(line);

	fflush(stdout);
	return ret;
}

static void print_maps(long pid)
{
	ssize_t used = 0, got;
	int fd = open("/proc/self/maps", O_RDONLY);

	if (fd < 0)
		return;
	while (used < (ssize_t)sizeof(maps) && (got = read(fd, maps + used, sizeof(maps) - used)) > 0)
		used += got;
	close(fd);
	printf("dynhello pid=%ld maps-begin\n", pid);
	fflush(stdout);
	if (write(STDOUT_FILENO, maps, used) != used)
		return;
	printf("dynhello pid=%ld maps-end\n", pid);
	fflush(stdout);
}

int main(int argc, char **argv)
{
	long period_ms = argc > 1 ? strtol(argv[1], NULL, 0) : 1000;
	unsigned long rounds = argc > 2 ? strtoul(argv[2], NULL, 0) : 0;
	struct timespec nap = { period_ms / 1000, (period_ms % 1000) * 1000000L };
	long pid = getpid();
	char buf[256];

	printf("dynhello pid=%ld started\n", pid);
	fflush(stdout);
	print_maps(pid);
	for (unsigned long round = 1; rounds == 0 || round <= rounds; round++) {
		int fd = open("/etc/hostname", O_RDONLY);

		if (fd >= 0) {
			while (read(fd, buf, sizeof(buf)) > 0)
				;
			close(fd);
		}
		greet(pid, round, fd);
		nanosleep(&nap, NULL);
	}
	return 0;
}
