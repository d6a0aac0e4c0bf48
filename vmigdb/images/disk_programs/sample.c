/*
 * sample PID ADDR: a stand-in for the malware of a detonation loop.
 * vmigdb-cflags: -Wl,-Ttext-segment=0x10000000
 *
 * It changes a file and another process's memory, then calls sample_detonated(count):
 * - /var/lib/sample/count holds how many times it ran (read, incremented, written, fsynced);
 * - the 64 bytes at ADDR in process PID (runner's marker) become "infected by sample, run N".
 * Linked at 0x10000000, away from the other static programs, so a breakpoint on its code
 * fires in it alone. Exits 0 when both changes were made.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#define COUNT_DIR "/var/lib/sample"
#define COUNT_FILE COUNT_DIR "/count"

__attribute__((noinline, noipa)) long sample_detonated(long count)
{
	return count;
}

static long bump_count(void)
{
	char buf[32] = "";
	long count = 0;
	int fd;
	ssize_t n;

	mkdir(COUNT_DIR, 0755);
	fd = open(COUNT_FILE, O_RDWR | O_CREAT, 0644);
	if (fd < 0)
		return -1;
	n = read(fd, buf, sizeof(buf) - 1);
	if (n > 0)
		count = strtol(buf, NULL, 10);
	count++;
	n = snprintf(buf, sizeof(buf), "%ld\n", count);
	if (pwrite(fd, buf, n, 0) != n || ftruncate(fd, n) || fsync(fd))
		count = -1;
	close(fd);
	return count;
}

int main(int argc, char **argv)
{
	char marker[64] = "";
	struct iovec local, remote;
	long count;
	pid_t pid;

	if (argc != 3)
		return 2;
	pid = (pid_t)strtol(argv[1], NULL, 10);
	count = bump_count();
	snprintf(marker, sizeof(marker), "infected by sample, run %ld", count);
	local.iov_base = marker;
	local.iov_len = sizeof(marker);
	remote.iov_base = (void *)strtoul(argv[2], NULL, 0);
	remote.iov_len = sizeof(marker);
	if (process_vm_writev(pid, &local, 1, &remote, 1, 0) != (ssize_t)sizeof(marker))
		count = -count;
	printf("sample pid=%d count=%ld\n", (int)getpid(), count);
	sample_detonated(count);
	return count > 0 ? 0 : 1;
}
