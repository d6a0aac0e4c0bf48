/*
 * runner: a long-lived process started from the disk image by systemd (vmigdb-runner.service),
 * the detonation loop's launcher and victim.
 *
 * It naps 100 ms at a time in runner_nap() and checks `runner_go`. A debugger starts a round by
 * writing a non-zero value there (the only way in: the image has no agent); runner clears it,
 * runs /usr/local/bin/sample with its own pid and the address of `runner_marker`, and waits for
 * it. The sample rewrites runner_marker from outside (process_vm_writev), so the change lives in
 * this process's memory, where a debugger reads it. At start it says where things are, on the
 * console and in the journal:
 *     runner pid=N go=0xADDR marker=0xADDR nap=0xADDR
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

volatile int runner_go;
char runner_marker[64] = "clean";
volatile unsigned long runner_rounds;

__attribute__((noinline, noipa)) void runner_nap(unsigned long naps)
{
	const struct timespec nap = { 0, 100000000 };

	(void)naps;
	nanosleep(&nap, NULL);
}

static void run_sample(void)
{
	char pid[32], addr[32];
	pid_t child;
	int status;

	snprintf(pid, sizeof(pid), "%d", (int)getpid());
	snprintf(addr, sizeof(addr), "0x%lx", (unsigned long)runner_marker);
	child = fork();
	if (child == 0) {
		execl("/usr/local/bin/sample", "sample", pid, addr, (char *)NULL);
		_exit(127);
	}
	if (child > 0)
		waitpid(child, &status, 0);
	runner_rounds++;
}

int main(void)
{
	unsigned long naps = 0;

	printf("runner pid=%d go=%p marker=%p nap=%p\n", (int)getpid(), (void *)&runner_go,
	       (void *)runner_marker, (void *)&runner_nap);
	fflush(stdout);
	for (;;) {
		runner_nap(naps++);
		if (runner_go) {
			runner_go = 0;
			run_sample();
		}
	}
}
