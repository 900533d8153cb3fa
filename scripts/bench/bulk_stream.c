/* bulk_stream: one TCP stream as fast as it goes, for scripts/bench/bulk (run each end in its netns;
 * every mode is bounded in time).
 *
 *   bulk_stream recv PORT MAX_SECONDS        listen on 0.0.0.0:PORT, print "ready", accept one
 *                                            connection and read it to EOF (or MAX_SECONDS)
 *   bulk_stream send ADDR PORT SECONDS       connect to ADDR:PORT, write for SECONDS, shut down the
 *                                            sending side and wait for the receiver's close (every byte
 *                                            read)
 *
 * Buffers of 128 KiB, the kernel's own socket buffer autotuning. Each prints one JSON line on stdout:
 * {"mode":..., "bytes":N, "seconds":S, "cpu_s":S} (seconds: connect to the receiver's close for send,
 * first byte to EOF for recv; cpu_s: the process's user+system CPU, softirq work done in its context
 * included, from getrusage).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BUF (128 * 1024)

static char buf[BUF];

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double cpu_s(void)
{
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

static void report(const char *mode, uint64_t bytes, double seconds, double cpu)
{
	printf("{\"mode\":\"%s\",\"bytes\":%llu,\"seconds\":%.6f,\"cpu_s\":%.4f}\n", mode,
	       (unsigned long long)bytes, seconds, cpu);
	fflush(stdout);
}

static int do_recv(int port, int max_seconds)
{
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_ANY)};
	int one = 1, lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (lfd < 0 || setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) ||
	    bind(lfd, (struct sockaddr *)&a, sizeof(a)) || listen(lfd, 1)) {
		perror("bulk_stream: listen");
		return 1;
	}
	alarm(max_seconds);             /* the bound: SIGALRM ends the process */
	printf("ready\n");
	fflush(stdout);
	int fd = accept(lfd, NULL, NULL);
	if (fd < 0) {
		perror("bulk_stream: accept");
		return 1;
	}
	close(lfd);
	double c0 = cpu_s(), t0 = 0;
	uint64_t bytes = 0;
	for (;;) {
		ssize_t n = read(fd, buf, BUF);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			perror("bulk_stream: read");
			return 1;
		}
		if (n == 0)
			break;
		if (!bytes)
			t0 = now();
		bytes += n;
	}
	double t1 = now();
	close(fd);
	report("recv", bytes, bytes ? t1 - t0 : 0, cpu_s() - c0);
	return 0;
}

static int do_send(const char *addr, int port, double seconds)
{
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
	if (inet_pton(AF_INET, addr, &a.sin_addr) != 1) {
		fprintf(stderr, "bulk_stream: bad address %s\n", addr);
		return 2;
	}
	alarm((unsigned)seconds + 30);
	memset(buf, 'x', BUF);
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	double c0 = cpu_s(), t0 = now();
	if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof(a))) {
		perror("bulk_stream: connect");
		return 1;
	}
	uint64_t bytes = 0;
	double end = t0 + seconds;
	while (now() < end) {
		ssize_t n = write(fd, buf, BUF);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			perror("bulk_stream: write");
			return 1;
		}
		bytes += n;
	}
	shutdown(fd, SHUT_WR);
	/* the receiver closes after reading EOF: every byte has been read by then */
	while (read(fd, buf, BUF) > 0)
		;
	double t1 = now();
	close(fd);
	report("send", bytes, t1 - t0, cpu_s() - c0);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 4 && !strcmp(argv[1], "recv"))
		return do_recv(atoi(argv[2]), atoi(argv[3]));
	if (argc == 5 && !strcmp(argv[1], "send"))
		return do_send(argv[2], atoi(argv[3]), atof(argv[4]));
	fprintf(stderr, "usage: bulk_stream recv PORT MAX_SECONDS | send ADDR PORT SECONDS\n");
	return 2;
}
