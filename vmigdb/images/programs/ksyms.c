/* ksyms NAME...: the guest's ground truth for kernel symbols, read from /proc/kallsyms.
 *
 * Prints "vmigdb-guest: ksym NAME ADDR" (or "vmigdb-guest: ksym-missing NAME") for each NAME in
 * order, once each: core-kernel symbols only (module symbols carry a 4th field), first match
 * wins. init.sh used busybox awk for this, which took 4-6 s of every boot under TCG splitting all
 * ~90,000 lines; this reads the file in large chunks and compares names only.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_NAMES 64

static char *names[MAX_NAMES];
static char addrs[MAX_NAMES][17];
static int count;

/* "ADDR TYPE NAME" (exactly three fields): remember ADDR for a wanted NAME not yet seen. */
static void line(char *text)
{
	char *type = strchr(text, ' ');
	if (!type || type - text > 16)
		return;
	char *name = strchr(type + 1, ' ');
	if (!name)
		return;
	name++;
	if (strchr(name, '\t') || strchr(name, ' '))
		return; /* a module's symbol: "NAME\t[module]" */
	for (int i = 0; i < count; i++) {
		if (!addrs[i][0] && strcmp(names[i], name) == 0) {
			memcpy(addrs[i], text, type - text);
			addrs[i][type - text] = 0;
		}
	}
}

int main(int argc, char **argv)
{
	for (int i = 1; i < argc && count < MAX_NAMES; i++) {
		int seen = 0;
		for (int j = 0; j < count; j++)
			seen |= strcmp(names[j], argv[i]) == 0;
		if (!seen && argv[i][0])
			names[count++] = argv[i];
	}
	int fd = open("/proc/kallsyms", O_RDONLY);
	if (fd < 0) {
		perror("ksyms: /proc/kallsyms");
		return 1;
	}
	static char buf[1 << 16];
	size_t have = 0;
	for (;;) {
		ssize_t n = read(fd, buf + have, sizeof(buf) - 1 - have);
		if (n <= 0)
			break;
		have += n;
		buf[have] = 0;
		char *start = buf, *end;
		while ((end = strchr(start, '\n'))) {
			*end = 0;
			line(start);
			start = end + 1;
		}
		have -= start - buf;
		memmove(buf, start, have);
		if (have == sizeof(buf) - 1)
			have = 0; /* a line longer than the buffer: no symbol line is */
	}
	close(fd);
	for (int i = 0; i < count; i++) {
		if (addrs[i][0])
			printf("vmigdb-guest: ksym %s %s\n", names[i], addrs[i]);
		else
			printf("vmigdb-guest: ksym-missing %s\n", names[i]);
	}
	return 0;
}
