/* hostspeed: how fast this vCPU runs kernel code right now, for scripts/bench's overhead windows.
 *
 *   hostspeed CPU SECONDS     pinned to CPU; prints "MONOTONIC_S BEST_US" every 0.25 s
 *
 * Every 8 ms it times a burst of 300 kernel round trips (getppid() and a 4 KiB read of /dev/zero)
 * and prints the quarter-second's fastest burst. None of those syscalls passes a hook rsttrace (or
 * bpftrace, or the empty floor programs) attaches: no socket, no skb, no TCP state. So the burst time
 * follows only what the VM's host does to this vCPU — the connection storm's rate moves with it
 * (measured: correlation 0.6–0.9 over 2 s windows, where an ALU loop's speed does not move at all) —
 * and the overhead benchmark divides the storm's rate by it. About 2 % of the CPU, the same in every
 * window. Bounded by SECONDS (at most 3600).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>

#define ROUNDS 300
#define PAUSE_US 8000
#define SLOT_S 0.25

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: hostspeed CPU SECONDS\n");
		return 2;
	}
	int cpu = atoi(argv[1]);
	double seconds = atof(argv[2]);
	if (seconds <= 0 || seconds > 3600) {
		fprintf(stderr, "hostspeed: SECONDS must be in (0, 3600]\n");
		return 2;
	}
	cpu_set_t set;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	if (sched_setaffinity(0, sizeof(set), &set)) {
		perror("hostspeed: sched_setaffinity");
		return 2;
	}
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	int zero = open("/dev/zero", O_RDONLY);
	if (zero < 0) {
		perror("hostspeed: /dev/zero");
		return 2;
	}
	static char buf[4096];
	double end = now() + seconds, slot_end = now() + SLOT_S, best = 1e9;
	for (;;) {
		double t0 = now();
		for (int i = 0; i < ROUNDS; i++) {
			syscall(SYS_getppid);
			if (read(zero, buf, sizeof(buf)) != sizeof(buf)) {
				perror("hostspeed: read");
				return 1;
			}
		}
		double took = now() - t0;
		if (took < best)
			best = took;
		usleep(PAUSE_US);
		double t = now();
		if (t >= slot_end) {
			printf("%.4f %.3f\n", t, best * 1e6);
			fflush(stdout);
			best = 1e9;
			slot_end += SLOT_S;
			if (t > end)
				return 0;
		}
	}
}
