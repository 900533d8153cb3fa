/* rst.bpf.c — RSTs sent and received, from tracepoints (no kprobes, no kernel headers).
 *
 * Compiled by bcc at start-up (tracer/kernel/loader.py) against the header-free tree in
 * bpf/kernel-headers. Every kernel struct field is read with bpf_probe_read_kernel() at an offset
 * resolved from the running kernel's BTF and passed in as an OFF_* macro. Feature macros:
 *   HAVE_RST_REASON       tcp:tcp_send_reset carries `enum sk_rst_reason reason` and sockaddr
 *                         addresses (Linux 6.10+); without it the older field layout is used.
 *   FILTER_PORTS          only events whose local or remote port is in map `port_filter`.
 *   FILTER_FAMILY=N       only AF_INET (2) or AF_INET6 (10).
 *   FILTER_PID=N          only events caused by process N; softirq events cannot be judged here
 *                         (the task on the CPU is not the culprit), user space decides them.
 *   SOFTIRQ_LO0/HI0, SOFTIRQ_LO1/HI1  address ranges of the kernel's softirq entry functions
 *                         (handle_softirqs / __do_softirq): a frame in them means softirq context.
 */
#include "rsttrace.h"

#ifdef HAVE_RST_REASON
enum sk_rst_reason { RSTTRACE_SK_RST_REASON_PLACEHOLDER = 0 }; /* named by the tracepoint format */
#endif

#define AF_INET 2
#define AF_INET6 10
#define TCP_TIME_WAIT 6
#define TCP_NEW_SYN_RECV 12
#define STACK_DEPTH 48

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_PERCPU_ARRAY(stats, __u64, RSTTRACE_STAT_MAX);
BPF_HASH(port_filter, __u16, __u8, 1024);

struct stack_scratch {
	__u64 ip[STACK_DEPTH];
};
BPF_PERCPU_ARRAY(stack_scratch, struct stack_scratch, 1);

static __always_inline void count(int slot)
{
	__u64 *v = stats.lookup(&slot);
	if (v)
		*v += 1;
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

/* Copy an address out of a struct sockaddr_in / sockaddr_in6 (family at 0, port at 2,
 * IPv4 address at 4, IPv6 address at 8). */
static __always_inline void sockaddr_addr(const __u8 *sa, __u16 family, __u8 *out)
{
	if (family == AF_INET)
		__builtin_memcpy(out, sa + 4, 4);
	else
		__builtin_memcpy(out, sa + 8, 16);
}

/* tcp:tcp_send_reset — every RST this host sends: tcp_send_active_reset() (aborts by the local
 * side) and tcp_v4_send_reset()/tcp_v6_send_reset() (replies to segments). Since Linux 6.10 it
 * carries the kernel's `reason` and fires for replies with no socket (NO_SOCKET); before 6.10 it
 * had neither (the kprobe backend covers those kernels). The local side is the RST's source. */
TRACEPOINT_PROBE(tcp, tcp_send_reset)
{
#ifdef HAVE_RST_REASON
	__u16 family = 0, lport = 0, rport = 0;
	bpf_probe_read_kernel(&family, sizeof(family), args->saddr);
	if (!family_wanted(family))
		return 0;
	lport = ((__u16)args->saddr[2] << 8) | args->saddr[3];
	rport = ((__u16)args->daddr[2] << 8) | args->daddr[3];
#else
	__u16 family = args->family, lport = args->sport, rport = args->dport;
	if (!family_wanted(family))
		return 0;
#endif
	if (!port_wanted(lport, rport))
		return 0;

	struct rsttrace_event *e = events.ringbuf_reserve(sizeof(struct rsttrace_event));
	if (!e) {
		count(RSTTRACE_STAT_LOST);
		return 0;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->ktime_ns = bpf_ktime_get_ns();
	e->kind = RSTTRACE_RST_SENT;
	e->family = family;
	e->lport = lport;
	e->rport = rport;
	e->state = args->state;
#ifdef HAVE_RST_REASON
	e->kernel_reason = args->reason;
	sockaddr_addr(args->saddr, family, e->laddr);
	sockaddr_addr(args->daddr, family, e->raddr);
#else
	e->kernel_reason = RSTTRACE_NO_REASON;
	if (family == AF_INET) {
		__builtin_memcpy(e->laddr, args->saddr, 4);
		__builtin_memcpy(e->raddr, args->daddr, 4);
	} else {
		__builtin_memcpy(e->laddr, args->saddr_v6, 16);
		__builtin_memcpy(e->raddr, args->daddr_v6, 16);
	}
#endif
	fill_task(e);
	if (walk_stack(args, e))
		e->flags |= RSTTRACE_F_SOFTIRQ;
	if (!pid_wanted(e)) {
		events.ringbuf_discard(e, 0);
		return 0;
	}
	void *sk = (void *)args->skaddr;
	void *skb = (void *)args->skbaddr;
	if (sk)
		read_socket(sk, e);
	if (skb) {   /* a reply: remember what it answered; without a socket the netns comes from the device */
		e->tcp_flags = tcp_flags_of_skb(skb);
		if (!sk)
			e->netns = netns_of_skb(skb);
	}
	events.ringbuf_submit(e, 0);
	count(RSTTRACE_STAT_SUBMITTED);
	return 0;
}

/* tcp:tcp_receive_reset — a socket accepted an incoming RST (tcp_reset(), since Linux 4.15): the
 * "Connection reset by peer" side. Runs in softirq or, when the socket was owned by the user, in
 * release_sock() of the owner. sport/saddr are the socket's local side. */
TRACEPOINT_PROBE(tcp, tcp_receive_reset)
{
	__u16 family = args->family;
	if (!family_wanted(family) || !port_wanted(args->sport, args->dport))
		return 0;

	struct rsttrace_event *e = events.ringbuf_reserve(sizeof(struct rsttrace_event));
	if (!e) {
		count(RSTTRACE_STAT_LOST);
		return 0;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->ktime_ns = bpf_ktime_get_ns();
	e->kind = RSTTRACE_RST_RECEIVED;
	e->kernel_reason = RSTTRACE_NO_REASON;
	e->family = family;
	e->lport = args->sport;
	e->rport = args->dport;
	if (family == AF_INET) {
		__builtin_memcpy(e->laddr, args->saddr, 4);
		__builtin_memcpy(e->raddr, args->daddr, 4);
	} else {
		__builtin_memcpy(e->laddr, args->saddr_v6, 16);
		__builtin_memcpy(e->raddr, args->daddr_v6, 16);
	}
#ifdef HAVE_RECEIVE_RESET_COOKIE
	e->sock_cookie = args->sock_cookie;
#endif
	fill_task(e);
	if (walk_stack(args, e))
		e->flags |= RSTTRACE_F_SOFTIRQ;
	if (!pid_wanted(e)) {
		events.ringbuf_discard(e, 0);
		return 0;
	}
	void *sk = (void *)args->skaddr;
	if (sk) {
		__u8 state = 0;
		bpf_probe_read_kernel(&state, sizeof(state), sk + OFF_SOCK_STATE);
		e->state = state;
		read_socket(sk, e);
	}
	events.ringbuf_submit(e, 0);
	count(RSTTRACE_STAT_SUBMITTED);
	return 0;
}
