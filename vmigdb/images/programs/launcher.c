/*
 * launcher CMD...: starts programs on demand, when a debugger asks it to.
 *
 * Each CMD is a command line with its words joined by '+', e.g. "dynhello" or
 * "insmod+/lib/modules/nls_ascii.ko"; the program is looked up in PATH. The launcher polls its
 * variable vmigdb_launch every 10 ms: when a debugger writes K (1-based) there, it starts CMD
 * number K (fork, then execvp in the child) and sets the variable back to 0. Nothing but the
 * debugger's own memory write starts a program: no device, file or signal is involved.
 *     launcher pid=N launch=0xADDR commands=C      once, at start
 *     launcher started=K pid=P cmd=CMD             each start
 *     launcher exited pid=P status=S               each child that ends
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_WORDS 8

volatile int vmigdb_launch;

static void start(const char *cmd, int which)
{
	char copy[256];
	char *words[MAX_WORDS + 1];
	int n = 0;

	snprintf(copy, sizeof(copy), "%s", cmd);
	for (char *word = strtok(copy, "+"); word != NULL && n < MAX_WORDS; word = strtok(NULL, "+"))
		words[n++] = word;
	words[n] = NULL;
	if (n == 0)
		return;
	pid_t child = fork();

	if (child == 0) {
		execvp(words[0], words);
		_exit(127);
	}
	printf("launcher started=%d pid=%ld cmd=%s\n", which, (long)child, cmd);
	fflush(stdout);
}

int main(int argc, char **argv)
{
	struct timespec nap = { 0, 10 * 1000000L };

	printf("launcher pid=%ld launch=%p commands=%d\n", (long)getpid(), (void *)&vmigdb_launch,
	       argc - 1);
	fflush(stdout);
	for (;;) {
		int which = vmigdb_launch;
		int status;
		pid_t done;

		if (which != 0) {
			vmigdb_launch = 0;
			if (which >= 1 && which < argc)
				start(argv[which], which);
		}
		while ((done = waitpid(-1, &status, WNOHANG)) > 0) {
			printf("launcher exited pid=%ld status=%d\n", (long)done, status);
			fflush(stdout);
		}
		nanosleep(&nap, NULL);
	}
}
