/* syscall_storm: one syscall in a tight loop, for scripts/bench/syscalls (every run is bounded by COUNT).
 *
 *   syscall_storm WORKLOAD COUNT FILE
 *
 *   open_close     openat(FILE) + close: the success path (two syscalls per iteration; FILE must exist)
 *   open_enoent    openat(FILE.missing): fails with ENOENT (FILE.missing must not exist)
 *   write_devnull  write() of 1 byte to /dev/null (opened once, before the loop)
 *   getppid        getppid(), through syscall(2): a syscall with no tracepoint program on it
 *
 * COUNT/10 untimed iterations first (at most 100 000: page cache, dentry cache, branch predictors), then
 * COUNT timed ones. The result is one JSON line on stdout:
 *   {"workload":..., "calls":N, "seconds":S, "ns_per_call":X, "cpu_ns_per_call":Y, "user_s":U, "sys_s":K,
 *    "errors":E}
 * ns_per_call: CLOCK_MONOTONIC around the timed loop / COUNT (an iteration: openat + close for open_close);
 * cpu_ns_per_call: this process's user + system CPU (getrusage) over the same loop / COUNT; errors:
 * iterations whose result was not the expected one (any error makes the exit status 1).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MAX_COUNT 100000000ULL

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double cpu(double *user, double *sys)
{
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	*user = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6;
	*sys = ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
	return *user + *sys;
}

enum workload { OPEN_CLOSE, OPEN_ENOENT, WRITE_DEVNULL, GETPPID };

static char missing[4096];
static const char *file;
static int devnull = -1;

/* n iterations; returns how many did not give the expected result */
static uint64_t loop(enum workload w, uint64_t n)
{
	uint64_t errors = 0;
	char byte = 'x';
	for (uint64_t i = 0; i < n; i++) {
		switch (w) {
		case OPEN_CLOSE: {
			int fd = openat(AT_FDCWD, file, O_RDONLY | O_CLOEXEC);
			if (fd < 0)
				errors++;
			else
				close(fd);
			break;
		}
		case OPEN_ENOENT: {
			int fd = openat(AT_FDCWD, missing, O_RDONLY | O_CLOEXEC);
			if (fd >= 0) {
				errors++;
				close(fd);
			} else if (errno != ENOENT) {
				errors++;
			}
			break;
		}
		case WRITE_DEVNULL:
			if (write(devnull, &byte, 1) != 1)
				errors++;
			break;
		case GETPPID:
			if (syscall(SYS_getppid) <= 0)
				errors++;
			break;
		}
	}
	return errors;
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: syscall_storm open_close|open_enoent|write_devnull|getppid COUNT FILE\n");
		return 2;
	}
	const char *name = argv[1];
	enum workload w;
	if (!strcmp(name, "open_close"))
		w = OPEN_CLOSE;
	else if (!strcmp(name, "open_enoent"))
		w = OPEN_ENOENT;
	else if (!strcmp(name, "write_devnull"))
		w = WRITE_DEVNULL;
	else if (!strcmp(name, "getppid"))
		w = GETPPID;
	else {
		fprintf(stderr, "syscall_storm: unknown workload %s\n", name);
		return 2;
	}
	char *end;
	unsigned long long count = strtoull(argv[2], &end, 10);
	if (*end || count < 1 || count > MAX_COUNT) {
		fprintf(stderr, "syscall_storm: COUNT must be in [1, %llu]\n", MAX_COUNT);
		return 2;
	}
	file = argv[3];
	if (snprintf(missing, sizeof(missing), "%s.missing", file) >= (int)sizeof(missing)) {
		fprintf(stderr, "syscall_storm: FILE too long\n");
		return 2;
	}
	if (w == OPEN_CLOSE && access(file, R_OK)) {
		perror("syscall_storm: FILE");
		return 2;
	}
	if (w == OPEN_ENOENT && !access(missing, F_OK)) {
		fprintf(stderr, "syscall_storm: %s exists\n", missing);
		return 2;
	}
	if (w == WRITE_DEVNULL && (devnull = open("/dev/null", O_WRONLY | O_CLOEXEC)) < 0) {
		perror("syscall_storm: /dev/null");
		return 2;
	}

	uint64_t warm = count / 10 < 100000 ? count / 10 : 100000;
	loop(w, warm);
	double u0, s0, u1, s1;
	double c0 = cpu(&u0, &s0), t0 = now();
	uint64_t errors = loop(w, count);
	double t1 = now(), c1 = cpu(&u1, &s1);
	printf("{\"workload\":\"%s\",\"calls\":%llu,\"seconds\":%.6f,\"ns_per_call\":%.2f,\"cpu_ns_per_call\":%.2f,"
	       "\"user_s\":%.6f,\"sys_s\":%.6f,\"errors\":%llu}\n",
	       name, count, t1 - t0, 1e9 * (t1 - t0) / count, 1e9 * (c1 - c0) / count, u1 - u0, s1 - s0,
	       (unsigned long long)errors);
	return errors ? 1 : 0;
}
