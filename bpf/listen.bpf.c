/* listen.bpf.c — listen-queue decisions, from tracepoints only (no kprobes needed).
 *
 * The kernel drops a SYN in tcp_conn_request() (accept queue full, SYN queue full without cookies)
 * with consume_skb(): no drop reason, no tracepoint. So rsttrace replays that decision: for each
 * SYN headed to a known listener it reads, at net:netif_receive_skb, the listener's queues and the
 * netns sysctls, and applies tcp_conn_request()'s own tests. These events carry
 * RSTTRACE_F_INFERRED. The 3rd-ACK overflow does have a drop reason (skb:kfree_skb,
 * TCP_LISTEN_OVERFLOW) and is reported as the kernel says it.
 *
 *   HAVE_SYS_ENTER_LISTEN       syscalls:sys_enter_listen exists (CONFIG_FTRACE_SYSCALLS): the
 *                               backlog argument is remembered per listener.
 *   HAVE_SK_DATA_READY          sock:sk_data_ready exists (Linux 6.6+): listeners that predate
 *                               rsttrace are learned when they queue a child.
 *   LISTEN_SYN_TRACEPOINT       SYN verdicts from net:netif_receive_skb (else kprobe.bpf.c has them).
 *   LISTEN_OVERFLOW_REASON=N    skb_drop_reason value of TCP_LISTEN_OVERFLOW (from the kfree_skb
 *                               format, Linux 6.3+); absent: no 3rd-ACK events from this file.
 */

BPF_HASH(pending_listen, __u32, __s32, 4096);   /* thread id -> backlog argument of listen() in flight */

#ifdef HAVE_SYS_ENTER_LISTEN
/* syscalls:sys_enter_listen — remember the backlog the application asks for: the kernel stores
 * only min(backlog, somaxconn), and which of the two binds is what the user must change. */
TRACEPOINT_PROBE(syscalls, sys_enter_listen)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	__s32 backlog = args->backlog;
	pending_listen.update(&tid, &backlog);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_listen)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	pending_listen.delete(&tid);
	return 0;
}
#endif

/* sock:inet_sock_set_state (Linux 4.16+) — a TCP socket enters or leaves LISTEN. */
TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
	if (args->protocol != IPPROTO_TCP || (args->newstate != TCP_LISTEN && args->oldstate != TCP_LISTEN))
		return 0;
	void *sk = (void *)args->skaddr;
	struct listener_key key = {};
	key.net = (__u64)net_of_sock(sk);
	key.port = args->sport;
	if (args->newstate == TCP_LISTEN) {
		struct listener_val val = {};
		val.sk = (__u64)sk;
		val.backlog = -1;
		__u32 tid = (__u32)bpf_get_current_pid_tgid();
		__s32 *backlog = pending_listen.lookup(&tid);
		if (backlog)
			val.backlog = *backlog;
		/* listen() runs in process context: the task is the listener's owner. Remembered here,
		 * the owner is named even if it exits before user space reads its drops. */
		val.owner_tgid = bpf_get_current_pid_tgid() >> 32;
		bpf_get_current_comm(val.owner_comm, sizeof(val.owner_comm));
		listeners.update(&key, &val);
	} else {
		struct listener_val *val = listeners.lookup(&key);
		if (val && val->sk == (__u64)sk)
			listeners.delete(&key);
	}
	return 0;
}

#ifdef HAVE_SK_DATA_READY
/* sock:sk_data_ready — fires on a listener when a new child joins its accept queue. */
TRACEPOINT_PROBE(sock, sk_data_ready)
{
	if (args->protocol != IPPROTO_TCP)
		return 0;
	void *sk = (void *)args->skaddr;
	__u8 state = 0;
	bpf_probe_read_kernel(&state, sizeof(state), sk + OFF_SOCK_STATE);
	if (state == TCP_LISTEN)
		learn_listener(sk);
	return 0;
}
#endif

#ifdef LISTEN_SYN_TRACEPOINT
/* net:netif_receive_skb (raw tracepoint) — every packet entering the stack, before IP: for a SYN
 * to a known listener on a traced port, read the queues it meets and replay the verdict. */
RAW_TRACEPOINT_PROBE(netif_receive_skb)
{
	void *skb = (void *)ctx->args[0];
	struct segment seg = {};
	parse_segment(skb, 0, &seg);
	if (!seg.ok || (seg.flags & (TCPHDR_SYN | TCPHDR_ACK | TCPHDR_RST)) != TCPHDR_SYN)
		return 0;
	if (!family_wanted(seg.family) || !port_wanted(seg.dport, seg.sport))
		return 0;

	void *dev = 0, *net = 0;
	bpf_probe_read_kernel(&dev, sizeof(dev), skb + OFF_SKB_DEV);
	if (dev)
		bpf_probe_read_kernel(&net, sizeof(net), dev + OFF_NETDEV_NET);
	struct listener_key key = {};
	key.net = (__u64)net;
	key.port = seg.dport;
	struct listener_val *listener = listeners.lookup(&key);
	if (!listener)
		return 0;
	report_syn_verdict(ctx, (void *)listener->sk, &seg, RSTTRACE_HOOK_NONE, 0);
	return 0;
}

#endif /* LISTEN_SYN_TRACEPOINT */

#ifdef LISTEN_OVERFLOW_REASON
enum skb_drop_reason { RSTTRACE_SKB_DROP_REASON_PLACEHOLDER = 0 };  /* named by the tracepoint format */

/* skb:kfree_skb with reason TCP_LISTEN_OVERFLOW (Linux 6.3+) — the handshake's final ACK found the
 * accept queue full when tcp_v4/v6_syn_recv_sock() was to create the child; rx_sk is the listener. */
TRACEPOINT_PROBE(skb, kfree_skb)
{
	if (args->reason != LISTEN_OVERFLOW_REASON)
		return 0;
	void *skb = (void *)args->skbaddr;
	struct segment seg = {};
	parse_segment(skb, 1, &seg);
	if (!seg.ok || !family_wanted(seg.family) || !port_wanted(seg.dport, seg.sport))
		return 0;
	struct rsttrace_event *e = new_event(RSTTRACE_ACK_DROPPED);
	if (!e)
		return 0;
	e->kernel_reason = args->reason;
	fill_from_segment(e, &seg);
	fill_task(e);
	if (walk_stack(args, e))
		e->flags |= RSTTRACE_F_SOFTIRQ;
	void *sk = (void *)args->rx_sk;
	if (sk) {
		__u8 state = 0;
		bpf_probe_read_kernel(&state, sizeof(state), sk + OFF_SOCK_STATE);
		e->state = state;
		read_socket(sk, e);
		if (state == TCP_LISTEN) {
			learn_listener(sk);
			read_listener(sk, e);
		}
	} else {
		e->netns = netns_of_skb(skb);
	}
	emit(args, e);
	return 0;
}
#endif
