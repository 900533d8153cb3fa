/* common.bpf.c — maps and helpers shared by every rsttrace BPF program (one ring buffer, one set of
 * counters, one filter). The loader (tracer/kernel/loader.py) pastes this file
 * and each hook file into one compilation unit (bcc only rewrites its map syntax in the main source). Feature macros (set by tracer/kernel/loader.py):
 *   FILTER_PORTS          only events whose local or remote port is in map `port_filter`.
 *   FILTER_FAMILY=N       only AF_INET (2) or AF_INET6 (10).
 *   FILTER_PID=N          only events caused by process N; softirq events cannot be judged here
 *                         (the task on the CPU is not the culprit), user space decides them.
 *   SOFTIRQ_LO0/HI0, SOFTIRQ_LO1/HI1  address ranges of the kernel's softirq entry functions
 *                         (handle_softirqs / __do_softirq): a frame in them means softirq context.
 *   OFF_*                 struct member offsets from the running kernel's BTF (tracer/kernel/offsets.py).
 */
#include "rsttrace.h"

#define AF_INET 2
#define AF_INET6 10
#define TCP_TIME_WAIT 6
#define TCP_NEW_SYN_RECV 12
#define STACK_DEPTH 48

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_PERCPU_ARRAY(stats, __u64, RSTTRACE_STAT_MAX);
BPF_HASH(port_filter, __u16, __u8, 1024);
/* Exact counts per (kind, kernel reason, local port, ...), kept in the kernel whether or not the
 * record reaches user space: the truth when the ring buffer overflows or output is rate-limited. */
BPF_PERCPU_HASH(counts, struct rsttrace_count_key, __u64, RSTTRACE_COUNT_KEYS);

struct stack_scratch {
	__u64 ip[STACK_DEPTH];
};
BPF_PERCPU_ARRAY(stack_scratch, struct stack_scratch, 1);
/* Events are built here (a 168-byte record does not fit the 512-byte BPF stack with the rest). */
BPF_PERCPU_ARRAY(event_scratch, struct rsttrace_event, 1);

static __always_inline void count(int slot)
{
	__u64 *v = stats.lookup(&slot);
	if (v)
		*v += 1;
}

/* A zeroed per-CPU record to fill (tracepoint programs do not nest on one CPU). */
static __always_inline struct rsttrace_event *new_event(__u32 kind)
{
	int zero = 0;
	struct rsttrace_event *e = event_scratch.lookup(&zero);
	if (!e)
		return 0;
	__builtin_memset(e, 0, sizeof(*e));
	e->ktime_ns = bpf_ktime_get_ns();
	e->kind = kind;
	return e;
}

/* Count the event exactly, then hand a copy to user space (or count it as lost). */
static __always_inline void emit(void *ctx, struct rsttrace_event *e)
{
	struct rsttrace_count_key key = {};
	key.kind = e->kind;
	key.kernel_reason = e->kernel_reason;
	key.lport = e->lport;
	key.tcp_flags = e->tcp_flags;
	key.flags = e->flags & (RSTTRACE_F_LINGER | RSTTRACE_F_INFERRED);
	key.linger_zero = (e->flags & RSTTRACE_F_LINGER) && e->linger_jiffies == 0;
	__u64 one = 1, *n = counts.lookup(&key);
	if (n)
		*n += 1;
	else
		counts.update(&key, &one);
	if (events.ringbuf_output(e, sizeof(*e), 0) == 0)
		count(RSTTRACE_STAT_SUBMITTED);
	else
		count(RSTTRACE_STAT_LOST);
}

static __always_inline int port_wanted(__u16 lport, __u16 rport)
{
#ifdef FILTER_PORTS
	if (port_filter.lookup(&lport) || port_filter.lookup(&rport))
		return 1;
	return 0;
#else
	return 1;
#endif
}

static __always_inline int family_wanted(__u16 family)
{
#ifdef FILTER_FAMILY
	return family == FILTER_FAMILY;
#else
	return family == AF_INET || family == AF_INET6;
#endif
}

/* Walk the kernel stack once: keep the innermost frames as evidence and report whether a
 * softirq entry function is on it. Softirq work (packet receive, TCP timers) runs on whatever task
 * was interrupted, so its pid/comm must not be reported as the culprit. */
static __always_inline int walk_stack(void *ctx, struct rsttrace_event *e)
{
	int zero = 0;
	struct stack_scratch *s = stack_scratch.lookup(&zero);
	if (!s)
		return 0;
	long len = bpf_get_stack(ctx, s->ip, sizeof(s->ip), 0);
	if (len <= 0)
		return 0;
	int frames = len / 8;
	int softirq = 0;
#pragma unroll
	for (int i = 0; i < RSTTRACE_CALLERS; i++)
		e->callers[i] = i < frames ? s->ip[i] : 0;
#pragma clang loop unroll(disable)
	for (int i = 0; i < STACK_DEPTH; i++) {
		if (i >= frames)
			break;
		__u64 ip = s->ip[i];
		if ((ip >= SOFTIRQ_LO0 && ip < SOFTIRQ_HI0) || (ip >= SOFTIRQ_LO1 && ip < SOFTIRQ_HI1)) {
			softirq = 1;
			break;
		}
	}
	return softirq;
}

static __always_inline __u32 netns_of_net(void *net)
{
	__u32 inum = 0;
	if (net)
		bpf_probe_read_kernel(&inum, sizeof(inum), net + OFF_NET_NS_INUM);
	return inum;
}

static __always_inline __u32 netns_of_sock(void *sk)
{
	void *net = 0;
	bpf_probe_read_kernel(&net, sizeof(net), sk + OFF_SOCK_NET);
	return netns_of_net(net);
}

static __always_inline __u32 netns_of_skb(void *skb)
{
	void *dev = 0, *net = 0;
	bpf_probe_read_kernel(&dev, sizeof(dev), skb + OFF_SKB_DEV);
	if (!dev)
		return 0;
	bpf_probe_read_kernel(&net, sizeof(net), dev + OFF_NETDEV_NET);
	return netns_of_net(net);
}

/* TCP flags byte of a received segment (the one a reply RST answers). */
static __always_inline __u8 tcp_flags_of_skb(void *skb)
{
	unsigned char *head = 0;
	__u16 thoff = 0;
	__u8 flags = 0;
	bpf_probe_read_kernel(&head, sizeof(head), skb + OFF_SKB_HEAD);
	bpf_probe_read_kernel(&thoff, sizeof(thoff), skb + OFF_SKB_TRANSPORT_HEADER);
	if (head)
		bpf_probe_read_kernel(&flags, sizeof(flags), head + thoff + 13);
	return flags;
}

/* Socket details that make a reason concrete: owner inode, unread bytes, SO_LINGER.
 * Only full sockets have these fields; request and TIME_WAIT minisocks are smaller structs. */
static __always_inline void read_socket(void *sk, struct rsttrace_event *e)
{
	e->flags |= RSTTRACE_F_HAVE_SOCKET;
	e->skaddr = (__u64)sk;
	e->netns = netns_of_sock(sk);
	if (e->state == TCP_TIME_WAIT || e->state == TCP_NEW_SYN_RECV)
		return;
	e->flags |= RSTTRACE_F_FULLSOCK;

	void *socket = 0;
	bpf_probe_read_kernel(&socket, sizeof(socket), sk + OFF_SOCK_SOCKET);
	if (socket)   /* struct socket_alloc { struct socket socket; struct inode vfs_inode; } */
		bpf_probe_read_kernel(&e->sock_ino, sizeof(e->sock_ino), socket + OFF_SOCKET_ALLOC_INODE + OFF_INODE_INO);

	__u32 rcv_nxt = 0, copied_seq = 0;
	bpf_probe_read_kernel(&rcv_nxt, sizeof(rcv_nxt), sk + OFF_TCP_RCV_NXT);
	bpf_probe_read_kernel(&copied_seq, sizeof(copied_seq), sk + OFF_TCP_COPIED_SEQ);
	e->unread_bytes = rcv_nxt - copied_seq;

	unsigned long sk_flags = 0;
	bpf_probe_read_kernel(&sk_flags, sizeof(sk_flags), sk + OFF_SOCK_FLAGS);
	if (sk_flags & (1UL << SOCK_LINGER_BIT)) {
		e->flags |= RSTTRACE_F_LINGER;
		bpf_probe_read_kernel(&e->linger_jiffies, sizeof(e->linger_jiffies), sk + OFF_SOCK_LINGERTIME);
	}
}

static __always_inline void fill_task(struct rsttrace_event *e)
{
	e->tgid = bpf_get_current_pid_tgid() >> 32;
	e->uid = (__u32)bpf_get_current_uid_gid();
	bpf_get_current_comm(e->comm, sizeof(e->comm));
}

static __always_inline int pid_wanted(struct rsttrace_event *e)
{
#ifdef FILTER_PID
	if (!(e->flags & RSTTRACE_F_SOFTIRQ) && e->tgid != FILTER_PID)
		return 0;
#endif
	return 1;
}
