/*
 * crash SECONDS: after SECONDS (default 20), makes the kernel panic on purpose by writing 'c' to
 * /proc/sysrq-trigger ("sysrq triggered crash"), for tests of `monitor catch panic`. Prints
 *     crash pid=N in=S
 *     crash pid=N now
 * the second line just before the write.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	int seconds = argc > 1 ? atoi(argv[1]) : 20;
	int fd;

	printf("crash pid=%d in=%d\n", getpid(), seconds);
	fflush(stdout);
	sleep(seconds);
	printf("crash pid=%d now\n", getpid());
	fflush(stdout);
	fd = open("/proc/sysrq-trigger", O_WRONLY);
	if (fd < 0 || write(fd, "c", 1) != 1)
		perror("crash: /proc/sysrq-trigger");
	return 1;
}
