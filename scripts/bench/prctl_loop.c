/* prctl_loop: the kernel's price of one BPF program run on a tracepoint, for scripts/bench/bpf_time.
 *
 *   prctl_loop CPU CALLS REPEATS     pinned to CPU; prints the fastest repeat's nanoseconds per call
 *
 * prctl(PR_SET_NAME) fires task:task_rename once per call and passes no hook of rsttrace's: timed
 * with and without an empty raw-tracepoint program there (dispatch.py), the difference
 * is what the tracepoint's call into a program costs on this machine — the same dispatch
 * (bpf_trace_runN) every raw-tracepoint program of rsttrace's pays at every run.
 */
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <time.h>

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: prctl_loop CPU CALLS REPEATS\n");
		return 2;
	}
	int cpu = atoi(argv[1]), calls = atoi(argv[2]), repeats = atoi(argv[3]);
	if (calls < 1 || calls > 10000000 || repeats < 1 || repeats > 100) {
		fprintf(stderr, "prctl_loop: CALLS in [1, 10^7], REPEATS in [1, 100]\n");
		return 2;
	}
	cpu_set_t set;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	if (sched_setaffinity(0, sizeof(set), &set)) {
		perror("prctl_loop: sched_setaffinity");
		return 2;
	}
	double best = 1e9;
	for (int r = 0; r < repeats; r++) {
		double t0 = now();
		for (int i = 0; i < calls; i++)
			prctl(PR_SET_NAME, "prctl_loop", 0, 0, 0);
		double per_call = (now() - t0) / calls;
		if (per_call < best)
			best = per_call;
	}
	printf("%.2f\n", best * 1e9);
	return 0;
}
