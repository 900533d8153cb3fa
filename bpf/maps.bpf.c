/* maps.bpf.c — what every rsttrace program shares: the maps, the filters, the per-CPU record an
 * event is built in, the stack walk, and emit(), which counts each event exactly and hands it to user
 * space (or to a storm's counts). Pasted first (tracer/kernel/loader.py, compose_source): every other
 * file builds on it, and `events` must stay the first map declared (EVENTS_MAP).
 *
 * Relies on the BPF ring buffer (Linux 5.8+) and bpf_get_stack() (4.18+). It cannot tell who caused
 * an event in softirq (the task on the CPU is whatever was interrupted): it marks softirq context,
 * and user space attributes those events to the socket's owner.
 *
 *   RINGBUF_PAGES         size of the ring buffer (--ring-mb).
 *   FILTER_PORTS          only events whose local or remote port is in map `port_filter`.
 *   FILTER_FAMILY=N       only AF_INET (2) or AF_INET6 (10).
 *   FILTER_NETNS          only events whose network namespace inode is in map `netns_filter`
 *                         (judged in emit(), once every hook has found the event's netns).
 *   FILTER_PID=N          only events caused by process N; softirq events cannot be judged here
 *                         (the task on the CPU is not the culprit), user space decides them.
 *   SOFTIRQ_LO0/HI0, SOFTIRQ_LO1/HI1  address ranges of the kernel's softirq entry functions
 *                         (handle_softirqs / __do_softirq): a frame in them means softirq context.
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

/* Keeps the compiler from moving loads and stores across it (the connector slot's `sk` past the
 * fields it guards, owners.bpf.c: x86-64 orders stores with stores and loads with loads, so this is
 * all a writer and a reader on two CPUs need there; a ctx read ahead of a branch, listen.bpf.c). */
#define compiler_barrier() asm volatile("" ::: "memory")

/* The first map declared, and it must stay so: EVENTS_MAP (storm control, below) relies on it. */
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
 * SO_REUSEPORT groups or per-address listeners on one port, the last one seen stands for all.
 * Read and learned in sock.bpf.c, kept from listen() on in listen.bpf.c. */
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

/* Events are built in per-CPU scratch (the record and its STACK_DEPTH frames do not fit the
 * 512-byte BPF stack with the rest) — one slot per program, because programs of different hooks
 * nest on one CPU: a softirq's skb:kfree_skb or net:netif_receive_skb (raw tracepoints) runs inside
 * a tcp:tcp_send_reset program that close() entered in process context. With one shared slot the
 * inner event overwrote the outer one half-built: a process-context RST was reported as the SYN drop
 * that interrupted it (tests/kernel/test_nesting.py). A program never nests in
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
#define SLOT_STORY		(HOOK_SLOTS + 3)      /* sock:inet_sock_set_state, a connection's end (story.bpf.c) */
/* HOOK_SLOTS + 4 to + 6: origin.bpf.c's net:net_dev_queue, icmp:icmp_send, skb:kfree_skb */
#define SCRATCH_SLOTS		(HOOK_SLOTS + 7)
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

static __always_inline int pid_wanted(struct rsttrace_event *e)
{
#ifdef FILTER_PID
	if (!(e->flags & RSTTRACE_F_SOFTIRQ) && e->tgid != FILTER_PID)
		return 0;
#endif
	return 1;
}

static __always_inline void fill_task(struct rsttrace_event *e)
{
	e->tgid = bpf_get_current_pid_tgid() >> 32;
	e->uid = (__u32)bpf_get_current_uid_gid();
	bpf_get_current_comm(e->comm, sizeof(e->comm));
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

/* A raw tracepoint program's stack starts with itself and bpf_trace_runN(): skip both, so that the
 * evidence starts at the traced kernel function (user space drops any such frame left). */
#define RAW_TP_STACK_SKIP 2

static __always_inline int walk_stack(void *ctx, struct rsttrace_event *e)
{
	return walk_stack_skip(ctx, e, 0);
}

/* Storms (tracer/storm.py). When more than storm_ctl.high_bytes of the ring buffer wait to be read,
 * user space is falling behind: from then until user space says the storm has calmed, each event is
 * counted per shape — its exact-count key, process and window (epoch) — and only the first
 * STORM_SAMPLES of a shape per CPU and window are written. Nothing is lost: user space reads each
 * window's counts a window after it closed (no program still adds to it) and writes them as
 * `aggregate` records; delivered + aggregated + lost = what the programs saw. */
#define STORM_SAMPLES 2
/* bcc gives a program no name for the map object itself, only its methods; it refers to each map by
 * its place among the declarations (bpf_pseudo_fd(1, -N)). `events` is the first one (this file
 * is pasted first and declares it first): a map declared before it would make this another map,
 * which the verifier refuses for this helper. */
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

/* The port a count is kept under (the metrics' `port` label): the service's port, never a
 * connection's own ephemeral port, which would make a key, and a metric series, per connection.
 * A listener event's is the listening port. An RST's is the traced port where --port names one of
 * its two; else the local port where that is a listener's: the SYN it answered was for it, the
 * socket is the listener or its request, or a full socket its child; else, on a full socket, the
 * remote port (connect()ed, so the peer is the service); else, with no socket to tell by, the lower
 * of the two (ephemeral ports come from the top of the range). */
static __always_inline __u16 service_port(struct rsttrace_event *e)
{
	if (e->kind == RSTTRACE_CONNECTION)     /* ended by the client's socket: the server is remote */
		return ((struct rsttrace_story *)&e->linger_jiffies)->flags & RSTTRACE_STORY_F_BY_CLIENT ? e->rport : e->lport;
	if (e->kind != RSTTRACE_RST_SENT && e->kind != RSTTRACE_RST_RECEIVED)
		return e->lport;
#ifdef FILTER_PORTS
	__u32 l = e->lport, r = e->rport;
	__u8 *at_l = port_filter.lookup(&l), *at_r = port_filter.lookup(&r);
	if (at_l && *at_l)
		return e->lport;
	if (at_r && *at_r)
		return e->rport;
#endif
	if ((e->tcp_flags & (TCPHDR_SYN | TCPHDR_ACK)) == TCPHDR_SYN)
		return e->lport;
	if (e->skaddr && (e->state == TCP_LISTEN || e->state == TCP_NEW_SYN_RECV))
		return e->lport;
	if (e->flags & RSTTRACE_F_FULLSOCK) {
		/* A listener's child is a copy of it (sk_clone_lock(), every kernel): it keeps the
		 * listener's nonzero backlog limit. A connect()ed socket never listened: 0. */
		__u32 backlog_limit = 0;
		bpf_probe_read_kernel(&backlog_limit, sizeof(backlog_limit), (void *)e->skaddr + OFF_SOCK_MAX_ACK_BACKLOG);
		return backlog_limit ? e->lport : e->rport;
	}
	return e->rport < e->lport ? e->rport : e->lport;
}

#ifdef STORIES
/* bpf/story.bpf.c: the listener's events start and feed connections' stories. */
static __always_inline void story_note(struct rsttrace_event *e);
#else
static __always_inline void story_note(struct rsttrace_event *e) {}
#endif

#ifdef APP_ERRORS
/* bpf/app.bpf.c: how many failed syscalls the RST's process had just before it. */
static __always_inline void app_errors_of(struct rsttrace_event *e);
#else
static __always_inline void app_errors_of(struct rsttrace_event *e) {}
#endif

/* Count the event exactly, then hand a copy to user space (or count it as lost, or as part of a
 * storm's aggregate). */
static __always_inline void emit(void *ctx, struct rsttrace_event *e)
{
	if (!netns_wanted(e->netns))
		return;
	story_note(e);
	app_errors_of(e);
	struct rsttrace_count_key key = {};
	key.kind = e->kind;
	key.kernel_reason = e->kernel_reason;
	key.service_port = service_port(e);
	key.netns = e->netns;
	key.tcp_flags = e->tcp_flags;
	key.flags = e->flags & (RSTTRACE_F_LINGER | RSTTRACE_F_INFERRED | RSTTRACE_F_ORPHAN | RSTTRACE_F_HAVE_SOCKET |
				RSTTRACE_F_UNREAD);
	key.state = e->state;
	key.linger_zero = (e->flags & RSTTRACE_F_LINGER) && e->linger_jiffies == 0;
	key.verdict = e->verdict;
	key.queue_full = (e->flags & RSTTRACE_F_QUEUES) && e->accept_qlen > e->accept_qmax;
	key.hook = e->hook;
	if (e->kernel_reason == RSTTRACE_NO_REASON && e->kind == RSTTRACE_RST_SENT) {
		key.callers[0] = e->callers[0];
		key.callers[1] = e->callers[1];
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
