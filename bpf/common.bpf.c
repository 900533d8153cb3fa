/* common.bpf.c — maps and helpers shared by every rsttrace BPF program (one ring buffer, one set of
 * counters, one filter). The loader (tracer/kernel/loader.py) pastes this file
 * and each hook file into one compilation unit (bcc only rewrites its map syntax in the main source). Feature macros (set by tracer/kernel/loader.py):
 *   FILTER_PORTS          only events whose local or remote port is in map `port_filter`.
 *   FILTER_FAMILY=N       only AF_INET (2) or AF_INET6 (10).
 *   FILTER_NETNS          only events whose network namespace inode is in map `netns_filter`
 *                         (judged in emit(), once every hook has found the event's netns).
 *   FILTER_PID=N          only events caused by process N; softirq events cannot be judged here
 *                         (the task on the CPU is not the culprit), user space decides them.
 *   SOFTIRQ_LO0/HI0, SOFTIRQ_LO1/HI1  address ranges of the kernel's softirq entry functions
 *                         (handle_softirqs / __do_softirq): a frame in them means softirq context.
 *   OFF_*                 struct member offsets from the running kernel's BTF (tracer/kernel/offsets.py).
 *   SYNQ_FULL_GT          inet_csk_reqsk_queue_is_full() tests qlen > max (Linux 6.13+, "allow a
 *                         connection when sk_max_ack_backlog is zero"); else qlen >= max.
 *   CONNECT_OWNERS        sock:inet_sock_set_state is hooked (listen.bpf.c): client sockets of traced
 *                         ports carry the process that connected them (owner_tgid/owner_comm).
 *   STATE_HOOK_BTF        that hook is a BTF tracepoint (tp_btf, Linux 5.5+), not a raw one: its
 *                         reads of the socket are plain loads (STATE_SK_LOAD).
 */
#include "rsttrace.h"

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define TCP_SYN_SENT 2
#define TCP_SYN_RECV 3
#define TCP_TIME_WAIT 6
#define TCP_LISTEN 10
#define TCP_NEW_SYN_RECV 12
#define STACK_DEPTH 48
#define TCPHDR_SYN 0x02
#define TCPHDR_RST 0x04
#define TCPHDR_ACK 0x10
#ifndef BPF_RB_NO_WAKEUP
#define BPF_RB_NO_WAKEUP 1       /* enum in uapi linux/bpf.h, Linux 5.8+ (the header tree here has none) */
#endif

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_PERCPU_ARRAY(stats, __u64, RSTTRACE_STAT_MAX);
/* Traced ports: 1 at the port's index. An array, not a hash: the verifier inlines its lookup into a
 * bounds check and a load, and port_wanted() runs on every state change and SYN of the host. */
BPF_ARRAY(port_filter, __u8, 65536);
BPF_HASH(netns_filter, __u32, __u8, 64);
/* Exact counts per (kind, kernel reason, netns, service port, ...), kept in the kernel whether or not the
 * record reaches user space: the truth when the ring buffer overflows or output is rate-limited. */
BPF_PERCPU_HASH(counts, struct rsttrace_count_key, __u64, RSTTRACE_COUNT_KEYS);

/* Listening sockets by (netns, local port): filled from listen() (inet_sock_set_state) and from
 * tracepoints that name a listener (sk_data_ready on a queued child, kfree_skb's rx_sk), so that a
 * packet can be matched to the listener it is headed for. One entry per (netns, port): with
 * SO_REUSEPORT groups or per-address listeners on one port, the last one seen stands for all. */
struct listener_key {
	__u64 net;              /* struct net * */
	__u16 port;             /* host byte order */
	__u16 pad16;
	__u32 pad32;
};
struct listener_val {
	__u64 sk;
	__s32 backlog;          /* listen() argument, -1 if the listener predates rsttrace */
	__u32 owner_tgid;       /* the process that called listen(), 0 if the listener predates rsttrace */
	char owner_comm[RSTTRACE_COMM_LEN];
	__u32 netns;            /* inode: user space tells which listeners are known (Session) */
	__u32 synq_seen;        /* SYN queue length at its last SYN, less the children since (report_syn_outcome) */
};
BPF_HASH(listeners, struct listener_key, struct listener_val, 65536);
/* How many entries `listeners` holds. The per-packet SYN hook returns at once while it is 0 (no
 * listener on a traced port is known): a busy host whose traced ports have no listener pays one
 * array lookup per packet. Kept exact: +1 only when an insert created an entry, -1 only when a
 * delete removed one. */
BPF_ARRAY(listener_count, __s64, 1);

#ifdef NETSTAT_PERCPU
/* bpf/netstat.bpf.c: a netns is watched while it has a listener on a traced port. */
static __always_inline void netstat_listener_added(void *net);
static __always_inline void netstat_listener_removed(void *net, void *sk);
#else
static __always_inline void netstat_listener_added(void *net) {}
static __always_inline void netstat_listener_removed(void *net, void *sk) {}
#endif

/* The listener rsttrace knows on (netns, port), or NULL. */
static __always_inline struct listener_val *listener_at(void *net, __u16 port)
{
	struct listener_key key = {};
	key.net = (__u64)net;
	key.port = port;
	return listeners.lookup(&key);
}

#ifdef CONNECT_OWNERS
/* Client sockets on traced ports, with the process that called connect() on them (recorded at the
 * SYN_SENT state change, in process context: listen.bpf.c). An RST for a client arrives in softirq,
 * and the client usually closes the socket at once: user space would find no owner in /proc any more.
 * Direct-mapped by struct sock *: a connect() takes the slot its socket hashes to, replacing whatever
 * was there — no lock, no allocation. (An LRU hash did the same job at ~350 ns per connect(): its
 * update took 0.74 % of a connect storm's CPU, scripts/bench/profile kernel --own-port.) Never
 * deleted: an entry is trusted only for the socket, remote address and port it was made for. */
#define CONNECTOR_SLOTS 16384            /* a power of 2 */
struct connector {
	__u64 sk;               /* 0 while the slot is being written */
	__u64 raddr[2];
	__u16 rport;            /* host byte order */
	__u16 pad16;
	__u32 tgid;
	char comm[RSTTRACE_COMM_LEN];
};
BPF_ARRAY(connectors, struct connector, CONNECTOR_SLOTS);

static __always_inline struct connector *connector_slot(void *sk)
{
	/* Fibonacci hashing: slab objects sit a fixed stride apart, their low bits say little. */
	__u32 slot = (((__u64)sk >> 4) * 0x9E3779B97F4A7C15ULL) >> 50;
	_Static_assert(CONNECTOR_SLOTS == 1 << (64 - 50), "the shift takes log2(CONNECTOR_SLOTS) bits");
	return connectors.lookup(&slot);
}
#endif

/* Keeps the compiler from moving loads and stores across it (the connector slot's `sk` past the
 * fields it guards: x86-64 orders stores with stores and loads with loads, so this is all a writer
 * and a reader on two CPUs need there; a ctx read ahead of a branch, bpf/listen.bpf.c). */
#define compiler_barrier() asm volatile("" ::: "memory")

/* Events are built in per-CPU scratch (a 208-byte record and a 48-frame stack do not fit the
 * 512-byte BPF stack with the rest) — one slot per program, because programs of different hooks
 * nest on one CPU: a softirq's skb:kfree_skb or net:netif_receive_skb (raw tracepoints) runs inside
 * a tcp:tcp_send_reset program that close() entered in process context. With one shared slot the
 * inner event overwrote the outer one half-built (measured on 6.18: 16-20 % of process-context RSTs
 * reported as the interrupting SYN drop; tests/kernel/test_nesting.py). A program never nests in
 * itself (one per-CPU guard per program, or one for all kprobe and classic tracepoint programs): the
 * kernel skips such a run and counts it in the program's recursion_misses, which rsttrace reports.
 * Kprobe and fentry hooks use their RSTTRACE_HOOK_* number as slot; the tracepoint programs the
 * numbers after them. */
#define HOOK_SLOTS		(RSTTRACE_HOOK_TCP_V6_SYN_RECV_SOCK + 1)
_Static_assert(HOOK_SLOTS == 7, "a new RSTTRACE_HOOK_* value needs its scratch slot");
#define SLOT_SYN_AT_RECEIVE	RSTTRACE_HOOK_NONE    /* net:netif_receive_skb (no hooked function) */
#define SLOT_ACK_AT_FREE	(HOOK_SLOTS + 0)      /* skb:kfree_skb */
#define SLOT_RST_SENT_TP	(HOOK_SLOTS + 1)      /* tcp:tcp_send_reset */
#define SLOT_RST_RECEIVED_TP	(HOOK_SLOTS + 2)      /* tcp:tcp_receive_reset */
#define SCRATCH_SLOTS		(HOOK_SLOTS + 3)
struct scratch {
	struct rsttrace_event event;     /* first: walk_stack finds its slot's frames from the event */
	__u64 ip[STACK_DEPTH];
};
BPF_PERCPU_ARRAY(scratch, struct scratch, SCRATCH_SLOTS);

static __always_inline void count(int slot)
{
	__u64 *v = stats.lookup(&slot);
	if (v)
		*v += 1;
}

/* A zeroed per-CPU record to fill, in the calling program's own slot (see struct scratch). */
static __always_inline struct rsttrace_event *new_event(__u32 kind, int slot)
{
	struct scratch *sc = scratch.lookup(&slot);
	if (!sc)
		return 0;
	struct rsttrace_event *e = &sc->event;
	__builtin_memset(e, 0, sizeof(*e));
	e->ktime_ns = bpf_ktime_get_ns();
	e->kind = kind;
	return e;
}

static __always_inline int netns_wanted(__u32 netns)
{
#ifdef FILTER_NETNS
	return netns_filter.lookup(&netns) != 0;
#else
	return 1;
#endif
}

/* Storms (tracer/storm.py). When more than storm_ctl.high_bytes of the ring buffer wait to be read,
 * user space is falling behind: from then until user space says the storm has calmed, each event is
 * counted per shape — its exact-count key, process and window (epoch) — and only the first
 * STORM_SAMPLES of a shape per CPU and window are written. Nothing is lost: user space reads each
 * window's counts a window after it closed (no program still adds to it) and writes them as
 * `aggregate` records; delivered + aggregated + lost = what the programs saw. */
#define STORM_SAMPLES 2
/* bcc gives a program no name for the map object itself, only its methods; it refers to each map by
 * its place among the declarations (bpf_pseudo_fd(1, -N)). `events` is the first one above: a map
 * declared before it would make this another map, which the verifier refuses for this helper. */
#define EVENTS_MAP ((void *)bpf_pseudo_fd(1, -1))
#ifndef BPF_RB_AVAIL_DATA
#define BPF_RB_AVAIL_DATA 0      /* enum in uapi linux/bpf.h, Linux 5.8+ */
#endif
struct storm_ctl {
	__u64 high_bytes;       /* user space: unread ring data above which a storm starts */
	__u32 epoch;            /* user space: the window counts go to now */
	__u32 aggregating;      /* set here when a storm starts; cleared by user space when it calms */
};
BPF_ARRAY(storm_ctl, struct storm_ctl, 1);
struct storm_key {
	struct rsttrace_count_key shape;
	__u32 epoch;
	__u32 tgid;             /* the process: the task in process context, the socket's known owner in softirq */
	char comm[RSTTRACE_COMM_LEN];
};
struct storm_count {
	__u64 aggregated;       /* counted, not written */
	__u64 samples;          /* written */
};
BPF_F_TABLE("percpu_hash", struct storm_key, struct storm_count, storm_shapes, 4096, BPF_F_NO_PREALLOC);

/* Whether a storm takes this event into its counts instead of the ring buffer. */
static __always_inline int storm_absorbs(struct rsttrace_event *e, struct rsttrace_count_key *shape)
{
	int zero = 0;
	struct storm_ctl *ctl = storm_ctl.lookup(&zero);
	if (!ctl)
		return 0;
	if (!ctl->aggregating) {
		if (bpf_ringbuf_query(EVENTS_MAP, BPF_RB_AVAIL_DATA) <= ctl->high_bytes)
			return 0;
		ctl->aggregating = 1;
	}
	struct storm_key key = {};
	key.shape = *shape;
	key.epoch = ctl->epoch;
	if (e->flags & RSTTRACE_F_SOFTIRQ) {
		key.tgid = e->owner_tgid;
		__builtin_memcpy(key.comm, e->owner_comm, sizeof(key.comm));
	} else {
		key.tgid = e->tgid;
		__builtin_memcpy(key.comm, e->comm, sizeof(key.comm));
	}
	struct storm_count *n = storm_shapes.lookup(&key);
	if (!n) {
		struct storm_count first = {};
		storm_shapes.insert(&key, &first);
		n = storm_shapes.lookup(&key);
		if (!n) {
			count(RSTTRACE_STAT_STORM_FULL);    /* written one by one (or lost), still counted */
			return 0;
		}
	}
	if (n->samples < STORM_SAMPLES) {
		n->samples += 1;
		return 0;
	}
	n->aggregated += 1;
	count(RSTTRACE_STAT_AGGREGATED);
	return 1;
}

/* Count the event exactly, then hand a copy to user space (or count it as lost, or as part of a
 * storm's aggregate). */
static __always_inline void emit(void *ctx, struct rsttrace_event *e)
{
	if (!netns_wanted(e->netns))
		return;
	struct rsttrace_count_key key = {};
	key.kind = e->kind;
	key.kernel_reason = e->kernel_reason;
	key.service_port = (e->kind == RSTTRACE_RST_SENT || e->kind == RSTTRACE_RST_RECEIVED) && e->rport < e->lport
			   ? e->rport : e->lport;
	key.netns = e->netns;
	key.tcp_flags = e->tcp_flags;
	key.flags = e->flags & (RSTTRACE_F_LINGER | RSTTRACE_F_INFERRED | RSTTRACE_F_ORPHAN | RSTTRACE_F_HAVE_SOCKET |
				RSTTRACE_F_UNREAD);
	key.state = e->state;
	key.linger_zero = (e->flags & RSTTRACE_F_LINGER) && e->linger_jiffies == 0;
	key.verdict = e->verdict;
	key.queue_full = (e->flags & RSTTRACE_F_QUEUES) && e->accept_qlen > e->accept_qmax;
	if (e->kernel_reason == RSTTRACE_NO_REASON && e->kind == RSTTRACE_RST_SENT) {
		key.callers[0] = e->callers[0];
		key.callers[1] = e->callers[1];
		key.hook = e->hook;
	}
	__u64 one = 1, *n = counts.lookup(&key);
	if (n)
		*n += 1;
	else if (counts.update(&key, &one) != 0)
		count(RSTTRACE_STAT_UNCOUNTED);     /* map full: said in every count rsttrace reports */
	if (storm_absorbs(e, &key))
		return;
	/* No wakeup: user space polls the ring on a timer (tracer/kernel/ringbuf.py); a wakeup per record
	 * would cost every sender an irq_work and the reader a context switch. */
	if (events.ringbuf_output(e, sizeof(*e), BPF_RB_NO_WAKEUP) == 0)
		count(RSTTRACE_STAT_SUBMITTED);
	else
		count(RSTTRACE_STAT_LOST);
}

static __always_inline int port_wanted(__u16 lport, __u16 rport)
{
#ifdef FILTER_PORTS
	__u32 l = lport, r = rport;
	__u8 *at_l = port_filter.lookup(&l), *at_r = port_filter.lookup(&r);
	return (at_l && *at_l) || (at_r && *at_r);
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
static __always_inline int walk_stack_skip(void *ctx, struct rsttrace_event *e, __u64 skip)
{
	struct scratch *s = (struct scratch *)e;     /* e is the event of a scratch slot */
	long len = bpf_get_stack(ctx, s->ip, sizeof(s->ip), skip & 0xff);
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

static __always_inline int walk_stack(void *ctx, struct rsttrace_event *e)
{
	return walk_stack_skip(ctx, e, 0);
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

/* The struct net a received skb arrived in: its device's, or once tcp_v4/v6_rcv() has cleared skb->dev
 * (Linux 4.4+, before a listener's handling), its input route's device's — in the same netns (for a
 * local route, the netns's loopback device). Bit 0 of _skb_refdst: not refcounted. */
static __always_inline void *net_of_skb(void *skb)
{
	void *dev = 0, *net = 0;
	bpf_probe_read_kernel(&dev, sizeof(dev), skb + OFF_SKB_DEV);
	if (!dev) {
		__u64 refdst = 0;
		bpf_probe_read_kernel(&refdst, sizeof(refdst), skb + OFF_SKB_REFDST);
		if (refdst & ~1ULL)
			bpf_probe_read_kernel(&dev, sizeof(dev), (void *)(refdst & ~1ULL) + OFF_DST_DEV);
	}
	if (dev)
		bpf_probe_read_kernel(&net, sizeof(net), dev + OFF_NETDEV_NET);
	return net;
}

static __always_inline __u32 netns_of_skb(void *skb)
{
	void *net = net_of_skb(skb);
	return net ? netns_of_net(net) : 0;
}

/* skb->head, ->network_header and ->transport_header: one read where they sit within 32 bytes of
 * each other (the loader defines SKB_SPAN_LO/LEN then; 6.18: bytes 178-199), else three. These
 * run for every packet the host receives while a listener on a traced port exists. */
static __always_inline void read_skb_offsets(void *skb, unsigned char **head, __u16 *nh, __u16 *th)
{
#ifdef SKB_SPAN_LO
	__u8 f[SKB_SPAN_LEN];           /* not zeroed first: a failed read zeroes it */
	if (bpf_probe_read_kernel(f, sizeof(f), skb + SKB_SPAN_LO) != 0)
		return;
	__builtin_memcpy(head, f + (OFF_SKB_HEAD - SKB_SPAN_LO), sizeof(*head));
	__builtin_memcpy(nh, f + (OFF_SKB_NETWORK_HEADER - SKB_SPAN_LO), sizeof(*nh));
	__builtin_memcpy(th, f + (OFF_SKB_TRANSPORT_HEADER - SKB_SPAN_LO), sizeof(*th));
#else
	bpf_probe_read_kernel(head, sizeof(*head), skb + OFF_SKB_HEAD);
	bpf_probe_read_kernel(nh, sizeof(*nh), skb + OFF_SKB_NETWORK_HEADER);
	bpf_probe_read_kernel(th, sizeof(*th), skb + OFF_SKB_TRANSPORT_HEADER);
#endif
}

/* TCP flags byte of a received segment (the one a reply RST answers). */
static __always_inline __u8 tcp_flags_of_skb(void *skb)
{
	unsigned char *head = 0;
	__u16 nh = 0, thoff = 0;
	__u8 flags = 0;
	read_skb_offsets(skb, &head, &nh, &thoff);
	if (head)
		bpf_probe_read_kernel(&flags, sizeof(flags), head + thoff + 13);
	return flags;
}

static __always_inline void *net_of_sock(void *sk)
{
	void *net = 0;
	bpf_probe_read_kernel(&net, sizeof(net), sk + OFF_SOCK_NET);
	return net;
}

/* The netns sysctls that decide a listener's fate (all per network namespace). */
static __always_inline void read_net_sysctls(void *net, struct rsttrace_event *e)
{
	if (!net)
		return;
	bpf_probe_read_kernel(&e->somaxconn, sizeof(e->somaxconn), net + OFF_NET_SOMAXCONN);
	bpf_probe_read_kernel(&e->max_syn_backlog, sizeof(e->max_syn_backlog), net + OFF_NET_MAX_SYN_BACKLOG);
	bpf_probe_read_kernel(&e->syncookies, sizeof(e->syncookies), net + OFF_NET_SYNCOOKIES);
	bpf_probe_read_kernel(&e->abort_on_overflow, sizeof(e->abort_on_overflow), net + OFF_NET_ABORT_ON_OVERFLOW);
}

/* A listener's queues at this moment: accept queue (sk_ack_backlog / sk_max_ack_backlog, which
 * is min(listen() backlog, somaxconn)) and SYN queue (icsk_accept_queue.qlen). */
static __always_inline void read_listener(void *sk, struct rsttrace_event *e)
{
	bpf_probe_read_kernel(&e->accept_qlen, sizeof(e->accept_qlen), sk + OFF_SOCK_ACK_BACKLOG);
	bpf_probe_read_kernel(&e->accept_qmax, sizeof(e->accept_qmax), sk + OFF_SOCK_MAX_ACK_BACKLOG);
	bpf_probe_read_kernel(&e->syn_qlen, sizeof(e->syn_qlen), sk + OFF_ICSK_SYN_QLEN);
	read_net_sysctls(net_of_sock(sk), e);
	e->flags |= RSTTRACE_F_QUEUES;
	e->listen_backlog = -1;
	__u16 port = 0;
	bpf_probe_read_kernel(&port, sizeof(port), sk + OFF_SOCK_NUM);
	struct listener_val *known = listener_at(net_of_sock(sk), port);
	if (known && known->sk == (__u64)sk) {
		e->listen_backlog = known->backlog;
		e->owner_tgid = known->owner_tgid;
		__builtin_memcpy(e->owner_comm, known->owner_comm, sizeof(e->owner_comm));
	}
}

static __always_inline void listeners_changed(__s64 by)
{
	int zero = 0;
	__s64 *n = listener_count.lookup(&zero);
	if (n)
		__sync_fetch_and_add(n, by);
}

static __always_inline int have_listeners(void)
{
	int zero = 0;
	__s64 *n = listener_count.lookup(&zero);
	return n && *n > 0;
}

/* Remember a listener met on the way (one that existed before rsttrace started). */
static __always_inline void learn_listener(void *sk)
{
	struct listener_key key = {};
	__u16 port = 0;
	bpf_probe_read_kernel(&port, sizeof(port), sk + OFF_SOCK_NUM);
	if (!port_wanted(port, 0))
		return;
	key.net = (__u64)net_of_sock(sk);
	key.port = port;
	if (listeners.lookup(&key))     /* known (the usual case): a lookup takes no lock, an insert would */
		return;
	struct listener_val val = {};
	val.sk = (__u64)sk;
	val.backlog = -1;
	val.netns = netns_of_net((void *)key.net);
	bpf_probe_read_kernel(&val.synq_seen, sizeof(val.synq_seen), sk + OFF_ICSK_SYN_QLEN);
	if (listeners.insert(&key, &val) == 0) {  /* never overwrites an entry made at listen() */
		listeners_changed(1);
		netstat_listener_added((void *)key.net);
	}
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
	else
		e->flags |= RSTTRACE_F_ORPHAN;

	__u32 rcv_nxt = 0, copied_seq = 0;
	bpf_probe_read_kernel(&rcv_nxt, sizeof(rcv_nxt), sk + OFF_TCP_RCV_NXT);
	bpf_probe_read_kernel(&copied_seq, sizeof(copied_seq), sk + OFF_TCP_COPIED_SEQ);
	e->unread_bytes = rcv_nxt - copied_seq;
	if (e->unread_bytes)
		e->flags |= RSTTRACE_F_UNREAD;

	unsigned long sk_flags = 0;
	bpf_probe_read_kernel(&sk_flags, sizeof(sk_flags), sk + OFF_SOCK_FLAGS);
	if (sk_flags & (1UL << SOCK_LINGER_BIT)) {
		e->flags |= RSTTRACE_F_LINGER;
		bpf_probe_read_kernel(&e->linger_jiffies, sizeof(e->linger_jiffies), sk + OFF_SOCK_LINGERTIME);
	}
}

/* inet_sock_set_state's program (listen.bpf.c) runs 10 times per connection on the host, and on its
 * way out for a port nobody traces it reads one field. As a BTF tracepoint (STATE_HOOK_BTF: tp_btf,
 * Linux 5.5+, loaded by tracer/kernel/loader.py) the verifier knows the argument is a struct sock and
 * checks a plain load against BTF once, at load time (a bad address at run time reads as 0): about
 * 1 ns. As a raw tracepoint the read must be bpf_probe_read_kernel(): ~50 ns on a machine with the
 * SRSO mitigation (scripts/bench/dispatch.py), most of what rsttrace adds to an untraced connection.
 * Inline asm, because bcc rewrites a plain dereference into a probe read. */
#ifdef STATE_HOOK_BTF
#define STATE_HOOK_PROBE(event) int tp_btf__##event(struct bpf_raw_tracepoint_args *ctx)
#define STATE_SK_LOAD(size, sk, off) ({ __##size v_; \
	asm volatile("%0 = *(" #size " *)(%1 + %2)" : "=r"(v_) : "r"(sk), "i"(off)); v_; })
#else
#define STATE_HOOK_PROBE(event) RAW_TRACEPOINT_PROBE(event)
#define STATE_SK_LOAD(size, sk, off) ({ __##size v_ = 0; \
	bpf_probe_read_kernel(&v_, sizeof(v_), (void *)(sk) + (off)); v_; })
#endif

/* The same socket as a plain number, for the code that hashes it or keeps it: the verifier allows
 * a BTF pointer an offset and no other arithmetic. One probe read, on traced ports' paths only. */
static __always_inline void *state_sk_number(struct bpf_raw_tracepoint_args *ctx)
{
#ifdef STATE_HOOK_BTF
	void *sk = 0;
	bpf_probe_read_kernel(&sk, sizeof(sk), &ctx->args[0]);
	return sk;
#else
	return (void *)ctx->args[0];
#endif
}

#ifdef CONNECT_OWNERS
/* In connect() (inet_sock_set_state, newstate SYN_SENT): remember who connects this socket, if it
 * goes to a traced port. `sk` is the hook's argument (STATE_SK_LOAD reads it); runs at every
 * connect() on the host. */
static __always_inline void remember_connector(struct bpf_raw_tracepoint_args *ctx, void *sk)
{
	__u16 dport = STATE_SK_LOAD(u16, sk, OFF_SOCK_DPORT);
	dport = (dport >> 8) | (dport << 8);          /* skc_dport is big-endian */
	if (!port_wanted(0, dport))
		return;
	__u16 family = STATE_SK_LOAD(u16, sk, OFF_SOCK_FAMILY);
	__u64 raddr[2] = {};
	void *skn = state_sk_number(ctx);
	if (family == AF_INET) {
		__u32 daddr = STATE_SK_LOAD(u32, sk, OFF_SOCK_DADDR);
		__builtin_memcpy(raddr, &daddr, 4);
	} else if (family == AF_INET6) {
		bpf_probe_read_kernel(raddr, 16, skn + OFF_SOCK_V6_DADDR);
	} else {
		return;
	}
	struct connector *c = connector_slot(skn);
	if (!c)
		return;
	c->sk = 0;                      /* a reader on another CPU sees no entry, not half of one */
	compiler_barrier();
	c->raddr[0] = raddr[0];
	c->raddr[1] = raddr[1];
	c->rport = dport;
	c->tgid = bpf_get_current_pid_tgid() >> 32;
	bpf_get_current_comm(c->comm, sizeof(c->comm));
	compiler_barrier();
	c->sk = (__u64)skn;
}

/* The process that connected this socket, if its slot still holds the connection it was made for. */
static __always_inline void connector_of(void *sk, struct rsttrace_event *e)
{
	struct connector *c = connector_slot(sk);
	if (!c || c->sk != (__u64)sk)
		return;
	compiler_barrier();
	__u64 raddr[2] = {};
	__builtin_memcpy(raddr, e->raddr, sizeof(raddr));
	if (c->rport != e->rport || c->raddr[0] != raddr[0] || c->raddr[1] != raddr[1])
		return;
	__u32 tgid = c->tgid;
	__builtin_memcpy(e->owner_comm, c->comm, sizeof(e->owner_comm));
	compiler_barrier();
	if (c->sk != (__u64)sk) {       /* rewritten meanwhile: what was copied may be half of each */
		__builtin_memset(e->owner_comm, 0, sizeof(e->owner_comm));
		return;
	}
	e->owner_tgid = tgid;
}
#endif

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

/* IP and TCP header of a received segment: addresses (local = destination), ports, flags. */
struct segment {
	__u16 family;
	__u16 sport;
	__u16 dport;
	__u8 flags;
	__u8 ok;
	__u8 saddr[16];
	__u8 daddr[16];
};

/* The IP and TCP headers of a segment, in as few reads as possible: this runs for every packet
 * the host receives (netif_receive_skb), so a non-TCP or non-SYN packet must cost little — two reads,
 * no copying. `syn_only`: stop (seg->ok 0) unless it is a SYN without ACK or RST, before the
 * addresses are copied. */
static __always_inline void parse_segment_if(void *skb, int transport_known, int syn_only, struct segment *seg)
{
	unsigned char *head = 0;
	__u16 nh = 0, th = 0;
	read_skb_offsets(skb, &head, &nh, &th);
	/* An IPv6 header and a TCP header, or an IPv4 one without options and a TCP header: one read
	 * covers both in the usual case (the head buffer has room past the headers: skb_shared_info).
	 * Not zeroed first: a failed read zeroes it. */
	__u8 pkt[54];
	if (!head || bpf_probe_read_kernel(pkt, sizeof(pkt), head + nh) != 0)
		return;
	__u8 version = pkt[0] >> 4, proto, hlen;
	if (version == 4) {
		proto = pkt[9];
		hlen = (pkt[0] & 0xf) * 4;
	} else if (version == 6) {
		proto = pkt[6];                  /* extension headers are not followed */
		hlen = 40;
	} else {
		return;
	}
	if (proto != IPPROTO_TCP)
		return;
	if (!transport_known)
		th = nh + hlen;
	__u8 tcp[14];                       /* ports, sequence and ack numbers, offset, flags */
	if (th == nh + 20)
		__builtin_memcpy(tcp, pkt + 20, sizeof(tcp));
	else if (th == nh + 40)
		__builtin_memcpy(tcp, pkt + 40, sizeof(tcp));
	else if (bpf_probe_read_kernel(tcp, sizeof(tcp), head + th) != 0)
		return;
	seg->flags = tcp[13];
	if (syn_only && (seg->flags & (TCPHDR_SYN | TCPHDR_ACK | TCPHDR_RST)) != TCPHDR_SYN)
		return;
	seg->sport = (__u16)tcp[0] << 8 | tcp[1];
	seg->dport = (__u16)tcp[2] << 8 | tcp[3];
	if (version == 4) {
		seg->family = AF_INET;
		__builtin_memcpy(seg->saddr, pkt + 12, 4);
		__builtin_memcpy(seg->daddr, pkt + 16, 4);
	} else {
		seg->family = AF_INET6;
		__builtin_memcpy(seg->saddr, pkt + 8, 16);
		__builtin_memcpy(seg->daddr, pkt + 24, 16);
	}
	seg->ok = 1;
}

static __always_inline void parse_segment(void *skb, int transport_known, struct segment *seg)
{
	parse_segment_if(skb, transport_known, 0, seg);
}

static __always_inline void fill_from_segment(struct rsttrace_event *e, struct segment *seg)
{
	e->family = seg->family;
	e->lport = seg->dport;
	e->rport = seg->sport;
	e->tcp_flags = seg->flags;
	__builtin_memcpy(e->laddr, seg->daddr, 16);
	__builtin_memcpy(e->raddr, seg->saddr, 16);
}

/* The listener's verdict on a SYN, as tcp_conn_request() (Linux 4.4+) takes it:
 *   1. SYN queue full (or syncookies=2): cookie if syncookies, else drop   (TCPReqQFullDrop)
 *   2. accept queue full (sk_acceptq_is_full: qlen > max): drop             (ListenOverflows)
 *   3. syncookies off and less than a quarter of tcp_max_syn_backlog left: drop unless the peer is
 *      "proven" (a TCP metrics entry rsttrace cannot see)                    (ListenDrops only) */
struct queue_state {
	__u32 accept_qlen, accept_qmax, syn_qlen, max_syn_backlog;
	__u8 syncookies;
};

/* Just what the verdict needs: most SYNs find room, and then nothing else is read or built. Where
 * fields sit together, one read takes them (SK_BACKLOG_SPAN: sk_ack_backlog and sk_max_ack_backlog,
 * adjacent since 4.14; NET_SYN_SPAN: the two netns sysctls, ~100 bytes apart on 6.18). `net`: the
 * listener's netns where the caller has it (0: read from the socket). */
static __always_inline void read_queues(void *sk, void *net, struct queue_state *q)
{
	if (!net)
		net = net_of_sock(sk);
#ifdef SK_BACKLOG_SPAN_LO
	__u8 b[SK_BACKLOG_SPAN_LEN];
	if (bpf_probe_read_kernel(b, sizeof(b), sk + SK_BACKLOG_SPAN_LO) == 0) {
		__builtin_memcpy(&q->accept_qlen, b + (OFF_SOCK_ACK_BACKLOG - SK_BACKLOG_SPAN_LO), 4);
		__builtin_memcpy(&q->accept_qmax, b + (OFF_SOCK_MAX_ACK_BACKLOG - SK_BACKLOG_SPAN_LO), 4);
	}
#else
	bpf_probe_read_kernel(&q->accept_qlen, sizeof(q->accept_qlen), sk + OFF_SOCK_ACK_BACKLOG);
	bpf_probe_read_kernel(&q->accept_qmax, sizeof(q->accept_qmax), sk + OFF_SOCK_MAX_ACK_BACKLOG);
#endif
	bpf_probe_read_kernel(&q->syn_qlen, sizeof(q->syn_qlen), sk + OFF_ICSK_SYN_QLEN);
	if (!net)
		return;
#ifdef NET_SYN_SPAN_LO
	__u8 n[NET_SYN_SPAN_LEN];
	if (bpf_probe_read_kernel(n, sizeof(n), net + NET_SYN_SPAN_LO) == 0) {
		q->syncookies = n[OFF_NET_SYNCOOKIES - NET_SYN_SPAN_LO];
		__builtin_memcpy(&q->max_syn_backlog, n + (OFF_NET_MAX_SYN_BACKLOG - NET_SYN_SPAN_LO), 4);
	}
#else
	bpf_probe_read_kernel(&q->syncookies, sizeof(q->syncookies), net + OFF_NET_SYNCOOKIES);
	bpf_probe_read_kernel(&q->max_syn_backlog, sizeof(q->max_syn_backlog), net + OFF_NET_MAX_SYN_BACKLOG);
#endif
}

static __always_inline __u8 syn_verdict(struct queue_state *q)
{
#ifdef SYNQ_FULL_GT
	int synq_full = q->syn_qlen > q->accept_qmax;
#else
	int synq_full = q->syn_qlen >= q->accept_qmax;
#endif
	if (q->syncookies == 2)
		synq_full = 1;
	if (synq_full && !q->syncookies)
		return RSTTRACE_VERDICT_SYN_QUEUE_FULL;
	if (q->accept_qlen > q->accept_qmax)
		return RSTTRACE_VERDICT_ACCEPT_QUEUE_FULL;
	if (synq_full)
		return RSTTRACE_VERDICT_SYN_COOKIE;
	if (!q->syncookies && (int)q->max_syn_backlog - (int)q->syn_qlen < (int)(q->max_syn_backlog >> 2))
		return RSTTRACE_VERDICT_SYN_BACKLOG_RESERVE;
	return RSTTRACE_VERDICT_NONE;
}

/* A SYN event: the verdict and the queues it was taken on. */
static __always_inline void emit_syn_verdict(void *ctx, void *sk, struct queue_state *q, __u8 verdict,
					     struct segment *seg, __u8 hook, __u64 stack_skip, int inferred)
{
	struct rsttrace_event *e = new_event(RSTTRACE_SYN_DROPPED, hook);   /* the hook is the slot */
	if (!e)
		return;
	read_listener(sk, e);
	/* The queues the verdict was taken on (a second read may already see others). */
	e->accept_qlen = q->accept_qlen;
	e->accept_qmax = q->accept_qmax;
	e->syn_qlen = q->syn_qlen;
	e->verdict = verdict;
	if (e->verdict == RSTTRACE_VERDICT_SYN_COOKIE)
		e->kind = RSTTRACE_SYN_COOKIE;
	e->kernel_reason = RSTTRACE_NO_REASON;
	e->hook = hook;
	if (inferred)
		e->flags |= RSTTRACE_F_INFERRED;
	e->state = TCP_LISTEN;
	fill_from_segment(e, seg);
	fill_task(e);
	if (walk_stack_skip(ctx, e, stack_skip))
		e->flags |= RSTTRACE_F_SOFTIRQ;
	read_socket(sk, e);         /* the listener's owner inode and netns */
	emit(ctx, e);
}

/* A SYN is about to meet listener `sk` (netif_receive_skb, or tcp_conn_request's entry): replay
 * tcp_conn_request()'s verdict on the queues read now, and report a drop or a cookie (nothing when
 * the SYN is accepted). */
static __always_inline void report_syn_verdict(void *ctx, void *sk, void *net, struct segment *seg, __u8 hook,
					       __u64 stack_skip)
{
	struct queue_state q = {};
	read_queues(sk, net, &q);
	__u8 verdict = syn_verdict(&q);
	if (verdict != RSTTRACE_VERDICT_NONE)
		emit_syn_verdict(ctx, sk, &q, verdict, seg, hook, stack_skip, 1);
}

/* A SYN has met the listener (skb:consume_skb in tcp_rcv_state_process, right after
 * tcp_conn_request() returned): tell its verdict from the queues now. A dropped SYN and a cookie
 * leave the queues as they found them; an accepted one has added its request to the SYN queue. The
 * tests only grow stricter as the queues grow, so:
 *   - no verdict on the queues now: accepted — unless the SYN queue did not grow and the accept
 *     queue is one short of full: an accept() took a child since, and the SYN met a full queue;
 *   - a verdict even with one request less in the SYN queue: not accepted, and that verdict (the
 *     queues now are the ones it met — the accept queue full, incident 1, is always this case);
 *   - else the SYN met the SYN queue at the edge: it took the last place or found none. It took it
 *     if the SYN queue grew since the listener's previous SYN (synq_seen: that SYN's figure, less
 *     the children created since, which left the queue). Requests that expire, and children made
 *     from a cookie, are not seen: the one case reported by inference on inference (hooks.py). */
static __always_inline void report_syn_outcome(void *ctx, struct listener_val *listener, void *net,
					       struct segment *seg, __u64 stack_skip)
{
	void *sk = (void *)listener->sk;
	struct queue_state q = {};
	read_queues(sk, net, &q);
	__u32 seen = listener->synq_seen;
	listener->synq_seen = q.syn_qlen;
	struct queue_state met = q;     /* the queues the SYN met, as far as they can be told */
	__u8 verdict = syn_verdict(&q);
	if (verdict == RSTTRACE_VERDICT_NONE) {
		/* An accept() on another CPU between the decision and now may have taken one child from a
		 * full accept queue: a SYN that added no request met the queue one longer. */
		met.accept_qlen++;
		if (q.syn_qlen > seen || q.accept_qlen != q.accept_qmax ||
		    syn_verdict(&met) != RSTTRACE_VERDICT_ACCEPT_QUEUE_FULL)
			return;
		verdict = RSTTRACE_VERDICT_ACCEPT_QUEUE_FULL;
	} else if (q.syn_qlen > seen) {
		met.syn_qlen--;
		if (syn_verdict(&met) == RSTTRACE_VERDICT_NONE)
			return;                 /* it took the last place */
		met = q;
	}
	emit_syn_verdict(ctx, sk, &met, verdict, seg, RSTTRACE_HOOK_NONE, stack_skip, 1);
}
