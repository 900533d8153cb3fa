/* netstat.bpf.c — the kernel's own listen-queue counters, read on the CPU that counted them, for the
 * SYN and final-ACK hooks of listen.bpf.c (pasted after this file). Uses maps.bpf.c, sock.bpf.c and
 * syn_verdict.bpf.c (struct queue_state).
 *
 * tcp_conn_request() (Linux 4.4+) counts its verdict on a SYN, and tcp_v4/v6_syn_recv_sock() an
 * accept-queue overflow at the handshake's final ACK, in the listener netns's per-CPU SNMP counters
 * (net->mib.net_statistics: what /proc/net/netstat sums over CPUs), on the CPU handling the packet.
 * The hooks after them run on that CPU in the same softirq, before anything else there can move those
 * counters: skb:consume_skb in tcp_rcv_state_process() for a SYN (6.3+), skb:kfree_skb in
 * tcp_v4/v6_rcv() or cookie_v4/v6_check() for a final ACK (6.9+). So what this CPU's counters moved
 * since its previous read of that netns is what the kernel counted for this packet: its verdict,
 * not a replay of its tests. A SYN to an untraced port is only counted (reading the counters there
 * would tax every connection of the host): when one came between two reads, a move is taken for this
 * SYN only where the listener's own drop count moved (a drop) or its SYN queue can have been full (a
 * cookie), and the rest is put down to the other ports. Final-ACK drops are read for every port.
 *
 * A netns is watched while it has a listener on a traced port. When the first one is learned, every
 * CPU's counters are read: the baseline of that CPU's first packet. A SYN on which the kernel does
 * not run the hook (seen with RPS: an IPI's softirq on a CPU busy in process context; the kernel
 * reports only some of those runs as skipped) leaves its moves to the next SYN on that CPU.
 *
 * A CPU's copy of a per-CPU variable is at its per-CPU offset from the variable's address; on x86-64
 * the per-CPU variable this_cpu_off holds that offset (Linux 2.6.30+). It is found from this CPU's
 * runqueue (task->se.cfs_rq->rq: CONFIG_FAIR_GROUP_SCHED) less the runqueue's place in the per-CPU
 * section (BTF DATASEC), and checked against the per-CPU cpu_number. BTF of 6.18 has no per-CPU type
 * tags on net_statistics, so bpf_this_cpu_ptr() cannot be used. The oncpu__ programs at the end are
 * run by user space on a chosen CPU (BPF_PROG_TEST_RUN with BPF_F_TEST_RUN_ON_CPU, Linux 5.10+),
 * never attached.
 *
 *   NETSTAT_PERCPU     this file is compiled in
 *   NETSTAT_CPUS       possible CPUs (cpu_offsets entries, the snapshot loop)
 *   MIB_*              LINUX_MIB_* indexes, PERCPU_* DATASEC offsets, OFF_* (tracer/kernel/offsets.py)
 */

#define NS_SYNCOOKIES_SENT	0      /* SyncookiesSent: cookie_init_sequence() */
#define NS_LISTEN_OVERFLOWS	1      /* ListenOverflows: accept queue full, at a SYN or a final ACK */
#define NS_LISTEN_DROPS		2      /* ListenDrops: every drop tcp_listendrop() counts */
#define NS_REQQ_DO_COOKIES	3      /* TCPReqQFullDoCookies: SYN queue full (or syncookies=2), cookies on */
#define NS_REQQ_DROP		4      /* TCPReqQFullDrop: SYN queue full, cookies off */
#define NS_COUNTERS		5
#define OFFSET_UNUSABLE		1ULL   /* in cpu_offsets: the way to this CPU's offset failed its check */

/* Each CPU's per-CPU offset, once a program has run there (0: not yet). */
BPF_ARRAY(cpu_offsets, __u64, NETSTAT_CPUS);

struct netstat_key {
	__u64 net;              /* struct net * */
	__u32 cpu;
	__u32 pad;
};
/* One watched netns on one CPU: its counters as last read there, and what moved for no event of a
 * traced port. User space sums the CPUs: the kernel's totals, alive or not (tracer/enrich). */
struct netstat_cpu {
	__u64 count[NS_COUNTERS];
	__u64 other_ports[NS_COUNTERS];   /* moved while SYNs to untraced ports came (or their ACKs dropped) */
	__u64 unexplained[NS_COUNTERS];   /* moved where no hook saw a decision (counted by the kernel only) */
	__u64 cookie;                     /* net_cookie: the netns these were read from */
	__u64 at;                         /* where this CPU's copy of its counters is (struct linux_mib) */
	__u32 netns;
	__u32 pad;
};
BPF_F_TABLE("hash", struct netstat_key, struct netstat_cpu, netstat_seen, NETSTAT_CPUS * 256, BPF_F_NO_PREALLOC);

/* Each listener's drop count (sk_drops) as this CPU last saw it: a drop the netns counters show at a
 * SYN is this listener's only if its own count moved since — else it belongs to another listener (a
 * SYN to an untraced port, or one the hook did not run for). */
BPF_F_TABLE("percpu_hash", __u64, __u32, listener_drops_seen, 4096, BPF_F_NO_PREALLOC);

/* SYNs to ports rsttrace does not trace, handled on this CPU since its last read of a netns: their
 * drops and cookies may be in what the next read finds (netstat_untraced_since). Counting them costs
 * a SYN to another port one map update, where reading the counters would cost it several reads. */
BPF_PERCPU_ARRAY(syns_untraced, __u64, 1);

/* Watched netns: how many listeners on traced ports rsttrace knows there. */
struct netstat_net {
	__u64 cookie;
	__s64 listeners;
};
BPF_HASH(netstat_nets, __u64, struct netstat_net, 1024);

/* This CPU's per-CPU offset (x86-64: the value of its this_cpu_off), 0 where it cannot be found. */
static __always_inline __u64 find_this_cpu_offset(__u32 cpu)
{
	void *task = (void *)bpf_get_current_task();
	void *cfs_rq = 0, *rq = 0;
	bpf_probe_read_kernel(&cfs_rq, sizeof(cfs_rq), task + OFF_TASK_SE_CFS_RQ);
	if (!cfs_rq)
		return 0;
	bpf_probe_read_kernel(&rq, sizeof(rq), cfs_rq + OFF_CFS_RQ_RQ);
	if (!rq)
		return 0;
	void *base = rq - PERCPU_RUNQUEUES;      /* this CPU's copy of the per-CPU section */
	__u64 offset = 0;
	__s32 number = -1;
	bpf_probe_read_kernel(&number, sizeof(number), base + PERCPU_CPU_NUMBER);
	if (number != (__s32)cpu)
		return 0;
	bpf_probe_read_kernel(&offset, sizeof(offset), base + PERCPU_THIS_CPU_OFF);
	return offset;
}

/* The per-CPU offset of `cpu`; found and kept when `cpu` is the CPU this runs on. */
static __always_inline __u64 cpu_offset(__u32 cpu, int here)
{
	__u64 *slot = cpu_offsets.lookup(&cpu);
	if (!slot)
		return 0;
	__u64 offset = *slot;
	if (!offset && here) {
		offset = find_this_cpu_offset(cpu);
		*slot = offset ? offset : OFFSET_UNUSABLE;
	}
	return offset == OFFSET_UNUSABLE ? 0 : offset;
}

/* Where netns `net`'s counters are on the CPU whose per-CPU offset is `offset` (0: nowhere). */
static __always_inline __u64 netstat_at(void *net, __u64 offset)
{
	__u64 mib = 0;
	bpf_probe_read_kernel(&mib, sizeof(mib), net + OFF_NET_MIB_NET_STATISTICS);
	return mib ? mib + offset : 0;
}

/* The counters at `at` (a netstat_at()). */
static __always_inline int read_netstat(void *at, __u64 *out)
{
	/* struct linux_mib { unsigned long mibs[]; } */
	if (!at || bpf_probe_read_kernel(&out[NS_SYNCOOKIES_SENT], 8, at + 8 * MIB_SYNCOOKIESSENT))
		return 0;
#if MIB_LISTENDROPS == MIB_LISTENOVERFLOWS + 1
	bpf_probe_read_kernel(&out[NS_LISTEN_OVERFLOWS], 16, at + 8 * MIB_LISTENOVERFLOWS);
#else
	bpf_probe_read_kernel(&out[NS_LISTEN_OVERFLOWS], 8, at + 8 * MIB_LISTENOVERFLOWS);
	bpf_probe_read_kernel(&out[NS_LISTEN_DROPS], 8, at + 8 * MIB_LISTENDROPS);
#endif
#if MIB_TCPREQQFULLDROP == MIB_TCPREQQFULLDOCOOKIES + 1
	bpf_probe_read_kernel(&out[NS_REQQ_DO_COOKIES], 16, at + 8 * MIB_TCPREQQFULLDOCOOKIES);
#else
	bpf_probe_read_kernel(&out[NS_REQQ_DO_COOKIES], 8, at + 8 * MIB_TCPREQQFULLDOCOOKIES);
	bpf_probe_read_kernel(&out[NS_REQQ_DROP], 8, at + 8 * MIB_TCPREQQFULLDROP);
#endif
	return 1;
}

static __always_inline __u64 cookie_of_net(void *net)
{
	__u64 cookie = 0;
	bpf_probe_read_kernel(&cookie, sizeof(cookie), net + OFF_NET_COOKIE);
	return cookie;
}

/* Every CPU's counters of `net` now: the baseline of each CPU's next packet there. */
static __always_inline void netstat_snapshot(void *net, __u64 cookie)
{
	__u32 netns = netns_of_net(net);
#pragma clang loop unroll(disable)
	for (__u32 cpu = 0; cpu < NETSTAT_CPUS; cpu++) {
		__u64 offset = cpu_offset(cpu, cpu == bpf_get_smp_processor_id());
		__u64 now[NS_COUNTERS] = {}, at = offset ? netstat_at(net, offset) : 0;
		if (!read_netstat((void *)at, now))
			continue;
		struct netstat_key key = {};
		key.net = (__u64)net;
		key.cpu = cpu;
		struct netstat_cpu *seen = netstat_seen.lookup(&key);
		if (seen) {           /* kept from an earlier watch: what moved since was no traced port's */
			__builtin_memcpy(seen->count, now, sizeof(now));
			continue;
		}
		struct netstat_cpu first = {};
		__builtin_memcpy(first.count, now, sizeof(now));
		first.cookie = cookie;
		first.at = at;
		first.netns = netns;
		netstat_seen.insert(&key, &first);
	}
}

/* A listener on a traced port joined `net` (listen(), or one learned that predates rsttrace). */
static __always_inline void netstat_listener_added(void *net)
{
	__u64 key = (__u64)net, cookie = cookie_of_net(net);
	struct netstat_net *watched = netstat_nets.lookup(&key);
	if (watched && watched->cookie == cookie) {
		if (__sync_fetch_and_add(&watched->listeners, 1) > 0)
			return;
	} else {
		/* First, or another netns at the address of one that is gone: its reads are stale. */
		struct netstat_net fresh = {};
		fresh.cookie = cookie;
		fresh.listeners = 1;
		netstat_nets.update(&key, &fresh);
#pragma clang loop unroll(disable)
		for (__u32 cpu = 0; watched && cpu < NETSTAT_CPUS; cpu++) {
			struct netstat_key stale = {};
			stale.net = key;
			stale.cpu = cpu;
			struct netstat_cpu *old = netstat_seen.lookup(&stale);
			if (old && old->cookie != cookie)
				netstat_seen.delete(&stale);
		}
	}
	netstat_snapshot(net, cookie);
}

/* Listener `sk` on a traced port left `net`. The reads stay (user space's totals of a netns that is
 * gone); they are dropped when another netns takes this address (netstat_listener_added). */
static __always_inline void netstat_listener_removed(void *net, void *sk)
{
	__u64 key = (__u64)net, listener = (__u64)sk;
	listener_drops_seen.delete(&listener);
	struct netstat_net *watched = netstat_nets.lookup(&key);
	if (watched && watched->listeners > 0)
		__sync_fetch_and_add(&watched->listeners, -1);
}

/* What this CPU's counters of `net` moved since its previous read here (`moved`), and that read's
 * entry, now brought up to date; 0 where `net` has no baseline on this CPU (not watched, or this CPU
 * unknown when it was first watched: the baseline is taken now, for the next packet). */
static __always_inline struct netstat_cpu *netstat_moves(void *net, __u64 *moved)
{
	__u32 cpu = bpf_get_smp_processor_id();
	struct netstat_key key = {};
	key.net = (__u64)net;
	key.cpu = cpu;
	struct netstat_cpu *seen = netstat_seen.lookup(&key);
	if (!seen) {
		struct netstat_net *watched = netstat_nets.lookup(&key.net);
		__u64 offset;
		if (!watched || watched->listeners <= 0 || !(offset = cpu_offset(cpu, 1)))
			return 0;
		struct netstat_cpu first = {};
		first.at = netstat_at(net, offset);
		if (read_netstat((void *)first.at, first.count)) {
			first.cookie = watched->cookie;
			first.netns = netns_of_net(net);
			netstat_seen.insert(&key, &first);
		}
		return 0;
	}
	__u64 now[NS_COUNTERS] = {};
	if (!read_netstat((void *)seen->at, now))
		return 0;
#pragma unroll
	for (int i = 0; i < NS_COUNTERS; i++) {
		moved[i] = now[i] - seen->count[i];
		seen->count[i] = now[i];
	}
	return seen;
}

/* A SYN to a port rsttrace does not trace was handled here. */
static __always_inline void netstat_untraced_syn(void)
{
	int zero = 0;
	__u64 *n = syns_untraced.lookup(&zero);
	if (n)
		*n += 1;
}

/* Whether a SYN to an untraced port was handled on this CPU since the last call here. */
static __always_inline int netstat_untraced_since(void)
{
	int zero = 0;
	__u64 *n = syns_untraced.lookup(&zero);
	if (!n || !*n)
		return 0;
	*n = 0;
	return 1;
}

/* Moves no event of a traced port explains: another port's listener, or no hook at all. */
static __always_inline void netstat_keep(__u64 *into, __u64 *moved)
{
#pragma unroll
	for (int i = 0; i < NS_COUNTERS; i++)
		into[i] += moved[i];
}

/* Whether listener `sk` dropped anything since this CPU last looked (tcp_listendrop() counts each
 * of its drops in sk_drops too); looked at now. */
static __always_inline int listener_dropped(void *sk)
{
	__u64 key = (__u64)sk;
	__u32 drops = 0;
	bpf_probe_read_kernel(&drops, sizeof(drops), sk + OFF_SOCK_DROPS);
	__u32 *seen = listener_drops_seen.lookup(&key);
	if (!seen) {
		listener_drops_seen.update(&key, &drops);
		return 1;           /* never looked at here: the netns counters say */
	}
	int moved = *seen != drops;
	*seen = drops;
	return moved;
}

/* The verdict the kernel counted for a SYN (what moved: tcp_conn_request()'s drop paths and
 * tcp_syn_flood_action()), taken out of `moved`; what it leaves is no event's.
 *   - A drop is this SYN's only if the listener's own drop count moved (`dropped`): else it is a
 *     SYN whose run the kernel skipped at another listener of the netns, on this CPU.
 *   - A cookie is this SYN's only where the SYN queue can have been full (one place of slack: other
 *     CPUs complete handshakes between the decision and `q`, read after it) or syncookies=2.
 *   - ListenDrops alone is the reserve of tcp_max_syn_backlog's last quarter where that applies
 *     (syncookies off, the SYN queue in it); otherwise it stays: an ICMP error that removed a
 *     half-open connection (tcp_req_err()) counts the same, and a SYN refused for a route or memory
 *     is rare. */
static __always_inline __u8 counted_syn_verdict(__u64 *moved, struct queue_state *q, int dropped)
{
	if (dropped && moved[NS_LISTEN_OVERFLOWS] && moved[NS_LISTEN_DROPS]) {
		moved[NS_LISTEN_OVERFLOWS]--;
		moved[NS_LISTEN_DROPS]--;
		if (moved[NS_REQQ_DO_COOKIES])      /* the SYN queue was full too, with cookies on */
			moved[NS_REQQ_DO_COOKIES]--;
		return RSTTRACE_VERDICT_ACCEPT_QUEUE_FULL;
	}
	if (dropped && moved[NS_REQQ_DROP] && moved[NS_LISTEN_DROPS]) {
		moved[NS_REQQ_DROP]--;
		moved[NS_LISTEN_DROPS]--;
		return RSTTRACE_VERDICT_SYN_QUEUE_FULL;
	}
	if (moved[NS_SYNCOOKIES_SENT] && (q->syncookies == 2 || q->syn_qlen + 1 >= q->accept_qmax)) {
		moved[NS_SYNCOOKIES_SENT]--;
		if (moved[NS_REQQ_DO_COOKIES])
			moved[NS_REQQ_DO_COOKIES]--;
		return RSTTRACE_VERDICT_SYN_COOKIE;
	}
	/* The reserve's own test (max - qlen < max / 4), one request of slack: other CPUs change the
	 * SYN queue between the decision and this read. */
	if (dropped && moved[NS_LISTEN_DROPS] && !q->syncookies &&
	    (int)q->max_syn_backlog - (int)q->syn_qlen <= (int)(q->max_syn_backlog >> 2)) {
		moved[NS_LISTEN_DROPS]--;
		return RSTTRACE_VERDICT_SYN_BACKLOG_RESERVE;
	}
	return RSTTRACE_VERDICT_NONE;
}

/* The verdict the kernel counted for a final ACK it dropped with TCP_LISTEN_OVERFLOW (or a cookie's
 * ACK, NO_SOCKET): accept queue full (ListenOverflows), or no child made for another reason
 * (ListenDrops alone: memory, route). NONE: nothing moved — not a counted drop. */
static __always_inline __u8 counted_ack_verdict(__u64 *moved)
{
	if (moved[NS_LISTEN_OVERFLOWS] && moved[NS_LISTEN_DROPS]) {
		moved[NS_LISTEN_OVERFLOWS]--;
		moved[NS_LISTEN_DROPS]--;
		return RSTTRACE_VERDICT_ACCEPT_QUEUE_FULL;
	}
	if (moved[NS_LISTEN_DROPS]) {
		moved[NS_LISTEN_DROPS]--;
		return RSTTRACE_VERDICT_LISTEN_DROP_OTHER;
	}
	return RSTTRACE_VERDICT_NONE;
}

/* Run by user space on a CPU with a watched netns's struct net * as its one argument, once the hooks
 * are detached (at exit): what the kernel counted there since that CPU's last read, which no hook
 * saw — the kernel did not run one, or nothing came after it — is kept as such. Loaded, never
 * attached (tracer/kernel/loader.py). */
int oncpu__netstat_flush(struct bpf_raw_tracepoint_args *ctx)
{
	__u64 moved[NS_COUNTERS] = {};
	struct netstat_cpu *seen = netstat_moves((void *)ctx->args[0], moved);
	if (seen)
		netstat_keep(netstat_untraced_since() ? seen->other_ports : seen->unexplained, moved);
	return 0;
}

/* Run on each CPU by user space at start (BPF_PROG_TEST_RUN, tracer/kernel/loader.py): every CPU's
 * offset is known before the first listener is watched. Loaded, never attached. */
int oncpu__learn_cpu_offset(struct bpf_raw_tracepoint_args *ctx)
{
	cpu_offset(bpf_get_smp_processor_id(), 1);
	return 0;
}
