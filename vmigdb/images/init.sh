#!/bin/busybox sh
# /init of vmigdb's demo guest: runs as PID 1 under busybox sh and must never exit.
#
# It prints machine-readable lines on the console (console=ttyS0), each prefixed "vmigdb-guest: ":
#   vmigdb-guest: init
#   vmigdb-guest: release <uname -r>
#   vmigdb-guest: ksym <name> <16 hex digits>     real (KASLR-randomised) address from /proc/kallsyms
#   vmigdb-guest: ksym-missing <name>
#   vmigdb-guest: started <spec> pid=<N>          one per program started, <spec> as on the cmdline
#   vmigdb-guest: error <text>
#   vmigdb-guest: ready                           everything is started
#   vmigdb-guest: task <pid> <ppid> <comm>        every process, a second after "ready"
#   vmigdb-guest: tasks-end                       the list is complete
#
# Kernel command-line parameters (read from /proc/cmdline):
#   vmigdb.programs=SPEC[,SPEC...]   programs to start in the background, in order (default: ticker;
#                                    "none" or empty starts none). SPEC is NAME[:ARG[:ARG...]] and runs
#                                    /bin/NAME ARG..., e.g. vmigdb.programs=ticker,spin:1111,spin:2222
#   vmigdb.ksyms=NAME[,NAME...]      extra kernel symbols to report
#   vmigdb.shell=1                   after "ready", run a shell on the console instead of sleeping

/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=1777 tmpfs /tmp
hostname -F /etc/hostname

say() { echo "vmigdb-guest: $*"; }
say init

# Root gets real addresses in /proc/kallsyms only when kptr_restrict allows it.
echo 0 > /proc/sys/kernel/kptr_restrict

programs=ticker
extra_ksyms=
shell=0
for arg in $(cat /proc/cmdline); do
	case "$arg" in
	vmigdb.programs=*) programs="${arg#vmigdb.programs=}" ;;
	vmigdb.ksyms=*) extra_ksyms="${arg#vmigdb.ksyms=}" ;;
	vmigdb.shell=*) shell="${arg#vmigdb.shell=}" ;;
	esac
done

say "release $(uname -r)"

ksyms="_text _stext linux_banner init_task __x64_sys_getpid __x64_sys_nanosleep __x64_sys_openat do_sys_openat2 default_idle"
ksyms="$ksyms $(echo "$extra_ksyms" | tr ',' ' ')"
# shellcheck disable=SC2086 # one name per argument
/bin/ksyms $ksyms

[ "$programs" = none ] && programs=
for spec in $(echo "$programs" | tr ',' ' '); do
	name="${spec%%:*}"
	args=
	[ "$name" != "$spec" ] && args="$(echo "${spec#*:}" | tr ':' ' ')"
	case "$name" in
	*/* | "") say "error bad program spec $spec"; continue ;;
	esac
	if [ ! -x "/bin/$name" ]; then
		say "error unknown program $name"
		continue
	fi
	# shellcheck disable=SC2086 # args are split on purpose
	"/bin/$name" $args </dev/null &
	say "started $spec pid=$!"
done

say ready
# Ground truth for tests/e2e/test_linux_tasks.py, once the programs above have exec'd: every
# process as "task PID PPID COMM" (from /proc/PID/stat; COMM may hold spaces and parentheses),
# then "tasks-end".
sleep 1
sed -n 's/^\([0-9]*\) (\(.*\)) [A-Za-z] \([0-9]*\) .*/vmigdb-guest: task \1 \3 \2/p' /proc/[0-9]*/stat 2>/dev/null
say tasks-end

if [ "$shell" = 1 ]; then
	while :; do
		setsid cttyhack sh -l
		sleep 1
	done
fi
while :; do
	sleep 3600
done
