/* rststorm: loopback load for scripts/bench (run it inside a private netns; every mode is bounded).
 *
 *   rststorm MODE PORT SECONDS NPROC [RATE]   RATE: ops/s over all workers (0 or absent: as fast as possible)
 *
 *   rststorm refused PORT SECONDS NPROC   connect() to a closed port: the kernel answers each SYN with
 *                                          an RST (rst_sent no_listener + rst_received)     -> resets
 *   rststorm unread  PORT SECONDS NPROC   connect, send 1 byte, the server accepts and closes without
 *                                          reading it: RST (closed_with_unread_data + rst_received)
 *   rststorm mixed   PORT SECONDS NPROC   half the workers refused (on PORT+1), half unread (on PORT)
 *   rststorm conn    PORT SECONDS NPROC   connect/accept/close, the server closes first (HTTP
 *                                          "Connection: close"); no resets          -> connections
 *   rststorm hold    PORT COUNT SECONDS   open COUNT established loopback connections, print "ready",
 *                                          keep them idle until stdin closes or SECONDS pass
 *
 * Each worker is a process (one per core saturates the machine); the result is one JSON line on
 * stdout: {"mode":..., "ops":N, "errors":N, "seconds":S, "procs":N, "cpu_s":S} (cpu_s: the workers'
 * user+system CPU, softirq work done on their behalf and BPF programs run in their context). ops = connects refused, resets provoked,
 * or connections completed. 127.0.0.1 only.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_PROCS 64

struct tally {
	uint64_t ops;
	uint64_t errors;
};

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double pace_start, pace_rate;   /* per worker; rate 0: unpaced */

/* Sleep until op number `done` is due, so that a worker keeps to pace_rate ops/s on average. */
static void pace(uint64_t done)
{
	if (pace_rate <= 0)
		return;
	double wait = pace_start + done / pace_rate - now();
	if (wait > 0) {
		struct timespec ts = {.tv_sec = (time_t)wait, .tv_nsec = (long)((wait - (time_t)wait) * 1e9)};
		nanosleep(&ts, NULL);
	}
}

static struct sockaddr_in loopback(int port)
{
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	return a;
}

static int listener(int port, int backlog)
{
	struct sockaddr_in a = loopback(port);
	int one = 1, fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) ||
	    bind(fd, (struct sockaddr *)&a, sizeof(a)) || listen(fd, backlog)) {
		perror("rststorm: listen");
		exit(2);
	}
	return fd;
}

static int connect_to(int port)
{
	struct sockaddr_in a = loopback(port);
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	if (connect(fd, (struct sockaddr *)&a, sizeof(a))) {
		int err = errno;
		close(fd);
		errno = err;
		return -1;
	}
	return fd;
}

/* accept with a timeout, so that no worker blocks past the deadline waiting for a connection
 * another worker took */
static int accept_within(int lfd, int ms)
{
	struct pollfd p = {.fd = lfd, .events = POLLIN};
	if (poll(&p, 1, ms) <= 0)
		return -1;
	return accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
}

static int readable_within(int fd, int ms)
{
	struct pollfd p = {.fd = fd, .events = POLLIN};
	return poll(&p, 1, ms) > 0;
}

static void refused(int port, double deadline, struct tally *t)
{
	while (now() < deadline) {
		pace(t->ops + t->errors);
		int fd = connect_to(port);
		if (fd < 0 && errno == ECONNREFUSED) {
			t->ops++;
		} else {
			t->errors++;
			if (fd >= 0)
				close(fd);
		}
	}
}

static void unread(int lfd, int port, double deadline, struct tally *t)
{
	while (now() < deadline) {
		pace(t->ops + t->errors);
		int c = connect_to(port);
		if (c < 0) {
			t->errors++;
			continue;
		}
		if (send(c, "x", 1, MSG_NOSIGNAL) != 1)
			t->errors++;
		int s = accept_within(lfd, 100);
		if (s >= 0) {
			/* the byte is queued before close() looks (loopback delivers within send()); wait for it
			 * anyway, so that every close resets */
			readable_within(s, 100);
			close(s);     /* unread data: the kernel sends an RST instead of a FIN */
			t->ops++;
		}
		close(c);
	}
}

static void conn(int lfd, int port, double deadline, struct tally *t)
{
	char buf[64];
	while (now() < deadline) {
		pace(t->ops + t->errors);
		int c = connect_to(port);
		if (c < 0) {
			t->errors++;
			continue;
		}
		int s = accept_within(lfd, 100);
		if (s >= 0)
			close(s);      /* the server closes first: its side keeps the TIME_WAIT */
		if (readable_within(c, 100) && read(c, buf, sizeof(buf)) == 0)
			t->ops++;
		else
			t->errors++;
		close(c);
	}
}

/* Worker processes share the connections: each holds HOLD_PER_PROC of them (two descriptors each),
 * so that no process needs more descriptors than an unprivileged hard limit allows. */
#define HOLD_PER_PROC 4000

static int hold(int port, int count, double seconds)
{
	if (count < 1 || count > 1000000 || seconds <= 0) {
		fprintf(stderr, "rststorm: hold COUNT in [1, 1000000], SECONDS > 0\n");
		return 2;
	}
	struct rlimit rl;
	getrlimit(RLIMIT_NOFILE, &rl);
	rlim_t want = 2 * HOLD_PER_PROC + 64;
	if (rl.rlim_cur < want) {
		rl.rlim_cur = want < rl.rlim_max ? want : rl.rlim_max;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
	int lfd = listener(port, 4096);
	int ready[2];
	if (pipe(ready)) {
		perror("rststorm: pipe");
		return 2;
	}
	double deadline = now() + seconds;
	int nproc = (count + HOLD_PER_PROC - 1) / HOLD_PER_PROC;
	pid_t pids[1000];
	for (int w = 0; w < nproc; w++) {
		int share = w < nproc - 1 ? HOLD_PER_PROC : count - w * HOLD_PER_PROC;
		pids[w] = fork();
		if (pids[w] < 0) {
			perror("rststorm: fork");
			return 2;
		}
		if (pids[w] == 0) {
			prctl(PR_SET_PDEATHSIG, SIGKILL);    /* never outlive the parent */
			for (int i = 0; i < share; i++) {
				int c = connect_to(port);
				int a = c >= 0 ? accept_within(lfd, 2000) : -1;
				if (c < 0 || a < 0) {
					perror("rststorm: hold");
					_exit(2);
				}
			}
			if (write(ready[1], "r", 1) != 1)
				_exit(2);
			while (now() < deadline)
				sleep(1);
			_exit(0);
		}
	}
	close(ready[1]);
	int held = 0;
	char r;
	while (held < nproc && read(ready[0], &r, 1) == 1)
		held++;
	if (held < nproc) {
		fprintf(stderr, "rststorm: hold: a worker failed\n");
		for (int w = 0; w < nproc; w++)
			kill(pids[w], SIGKILL);
		return 2;
	}
	printf("ready %d\n", count);
	fflush(stdout);
	struct pollfd p = {.fd = 0, .events = POLLIN};
	char buf[64];
	while (now() < deadline) {
		if (poll(&p, 1, 200) > 0 && read(0, buf, sizeof(buf)) <= 0)
			break;
	}
	for (int w = 0; w < nproc; w++)
		kill(pids[w], SIGKILL);
	for (int w = 0; w < nproc; w++)
		waitpid(pids[w], NULL, 0);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc != 5 && argc != 6) {
		fprintf(stderr, "usage: rststorm refused|unread|mixed|conn PORT SECONDS NPROC [RATE] | hold PORT COUNT SECONDS\n");
		return 2;
	}
	const char *mode = argv[1];
	int port = atoi(argv[2]);
	if (port < 1 || port > 65534) {
		fprintf(stderr, "rststorm: bad port %s\n", argv[2]);
		return 2;
	}
	if (!strcmp(mode, "hold"))
		return hold(port, atoi(argv[3]), atof(argv[4]));

	double seconds = atof(argv[3]);
	int nproc = atoi(argv[4]);
	/* up to an hour: the overhead benchmark measures in windows of one long storm */
	if (seconds <= 0 || seconds > 3600 || nproc < 1 || nproc > MAX_PROCS) {
		fprintf(stderr, "rststorm: SECONDS must be in (0, 3600], NPROC in [1, %d]\n", MAX_PROCS);
		return 2;
	}
	int is_refused = !strcmp(mode, "refused"), is_unread = !strcmp(mode, "unread");
	int is_mixed = !strcmp(mode, "mixed"), is_conn = !strcmp(mode, "conn");
	if (!(is_refused || is_unread || is_mixed || is_conn)) {
		fprintf(stderr, "rststorm: unknown mode %s\n", mode);
		return 2;
	}
	int lfd = is_refused ? -1 : listener(port, 4096);
	struct tally *tallies = mmap(NULL, sizeof(struct tally) * nproc, PROT_READ | PROT_WRITE,
				     MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (tallies == MAP_FAILED) {
		perror("rststorm: mmap");
		return 2;
	}
	memset(tallies, 0, sizeof(struct tally) * nproc);
	double start = now(), deadline = start + seconds;
	pace_start = start;
	pace_rate = argc == 6 ? atof(argv[5]) / nproc : 0;
	pid_t pids[MAX_PROCS];
	for (int i = 0; i < nproc; i++) {
		pids[i] = fork();
		if (pids[i] < 0) {
			perror("rststorm: fork");
			return 2;
		}
		if (pids[i] == 0) {
			prctl(PR_SET_PDEATHSIG, SIGKILL);    /* a storm stopped early stops whole */
			if (is_refused || (is_mixed && i % 2))
				refused(is_mixed ? port + 1 : port, deadline, &tallies[i]);
			else if (is_conn)
				conn(lfd, port, deadline, &tallies[i]);
			else
				unread(lfd, port, deadline, &tallies[i]);
			_exit(0);
		}
	}
	for (int i = 0; i < nproc; i++)
		waitpid(pids[i], NULL, 0);
	double took = now() - start;
	struct rusage ru;
	getrusage(RUSAGE_CHILDREN, &ru);   /* the workers' CPU: their syscalls, softirq work and any BPF */
	double cpu = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
	uint64_t ops = 0, errors = 0;
	for (int i = 0; i < nproc; i++) {
		ops += tallies[i].ops;
		errors += tallies[i].errors;
	}
	printf("{\"mode\":\"%s\",\"ops\":%llu,\"errors\":%llu,\"seconds\":%.3f,\"procs\":%d,\"cpu_s\":%.3f}\n", mode,
	       (unsigned long long)ops, (unsigned long long)errors, took, nproc, cpu);
	return 0;
}
