/* listen.bpf.c — listen-queue decisions and the listeners they are taken by, from tracepoints only
 * (no kprobes needed). Uses maps.bpf.c, sock.bpf.c, syn_verdict.bpf.c, owners.bpf.c, and
 * netstat.bpf.c (pasted before it) with NETSTAT_PERCPU.
 *
 *   sock:inet_sock_set_state  (Linux 4.16+) listeners entering and leaving LISTEN, their children,
 *                             and who calls connect() (owners.bpf.c).
 *   sock:sk_data_ready (6.6+), sock:sock_recv_length (6.3+)   listeners that predate rsttrace.
 *   skb:consume_skb           (`location`, 6.3+) a SYN right after tcp_conn_request() decided on it.
 *   net:netif_receive_skb     a SYN before that decision (where consume_skb cannot be used).
 *   skb:kfree_skb             (TCP_LISTEN_OVERFLOW 6.3+, rx_sk 6.11+) a final ACK the accept queue refused.
 *
 * The kernel drops a SYN in tcp_conn_request() (accept queue full, SYN queue full without cookies)
 * with consume_skb(): no drop reason. So the decision is told from what the kernel counted for it
 * (netstat.bpf.c) or from the listener's queues and the netns sysctls (syn_verdict.bpf.c, these
 * events carry RSTTRACE_F_INFERRED). The 3rd-ACK overflow does have a drop reason and is reported as
 * the kernel says it. One listener stands for each (netns, port): SO_REUSEPORT groups share it.
 *
 *   LISTEN_BACKLOG_FROM_REGS    bpf_task_pt_regs() exists (5.15+) and the machine's syscall
 *                               registers are known: listen()'s backlog argument is kept per listener.
 *   HAVE_SK_DATA_READY          sock:sk_data_ready exists (Linux 6.6+): listeners that predate
 *                               rsttrace are learned when they queue a child.
 *   HAVE_SOCK_RECV_LENGTH       sock:sock_recv_length exists (Linux 6.3+): user space learns a listener
 *                               that predates rsttrace at once, by a recv() on a copy of its fd.
 *   LISTEN_SYN_CONSUMED         SYN verdicts from skb:consume_skb after tcp_conn_request() (6.3+).
 *   LISTEN_SYN_TRACEPOINT       SYN verdicts replayed at net:netif_receive_skb (older kernels; with
 *                               kprobes, kprobe.bpf.c has them at tcp_conn_request()).
 *   LISTEN_OVERFLOW_REASON=N    skb_drop_reason value of TCP_LISTEN_OVERFLOW (from the kfree_skb
 *                               format, Linux 6.3+); absent: no 3rd-ACK events from this file.
 *   COOKIE_NO_SOCKET_REASON=N   skb_drop_reason value of NO_SOCKET, with COOKIE_CHECK0_LO/HI (and
 *                               COOKIE_CHECK1_LO/HI): cookie_v4/v6_check()'s text, where a SYN
 *                               cookie's ACK that met a full accept queue is freed (Linux 6.9+).
 */

/* sock:inet_sock_set_state (Linux 4.16+): (sk, oldstate, newstate), a TCP socket enters or leaves
 * LISTEN. It fires on every state change of every socket (several per connection), so it is a BTF
 * tracepoint where the kernel allows one (STATE_HOOK_BTF: its first reads cost no probe read,
 * sock.bpf.c), else a raw one — never the classic tracepoint, which would copy addresses into a
 * perf record each time before rsttrace could say "not a listener". With CONNECT_OWNERS it also
 * records who connects to a traced port (owners.bpf.c). */
STATE_HOOK_PROBE(inet_sock_set_state)
{
	int oldstate = (int)ctx->args[1], newstate = (int)ctx->args[2];
	void *sk = (void *)ctx->args[0];
#ifdef CONNECT_OWNERS
	if (newstate == TCP_SYN_SENT) {   /* tcp_v4/v6_connect(), in the connecting process */
		remember_connector(ctx, sk);
		return 0;
	}
#endif
	if (newstate != TCP_LISTEN && oldstate != TCP_LISTEN) {
#ifdef STORIES
		story_state_change(ctx, sk, oldstate, newstate);   /* story.bpf.c: a connection's end */
#endif
		return 0;
	}
	/* Every connection to a listener passes here once (its child: LISTEN -> SYN_RECV): the port
	 * first, the one read a connection to an untraced port pays. */
	__u16 port = STATE_SK_LOAD(u16, sk, OFF_SOCK_NUM);
	if (!port_wanted(port, 0))
		return 0;
	if (STATE_SK_LOAD(u16, sk, OFF_SOCK_PROTOCOL) != IPPROTO_TCP)   /* SCTP and DCCP listeners pass here too */
		return 0;
	sk = state_sk_number(ctx);
	struct listener_key key = {};
	key.net = (__u64)net_of_sock(sk);
	key.port = port;
	if (newstate == TCP_LISTEN) {
		struct listener_val val = {};
		val.sk = (__u64)sk;
		val.backlog = -1;
		val.netns = netns_of_net((void *)key.net);
#ifdef LISTEN_BACKLOG_FROM_REGS
		/* The kernel keeps only min(backlog, somaxconn); which of the two binds is what the user
		 * must change. We run inside listen(): its argument is in the saved user registers
		 * (bpf_task_pt_regs, 5.15+). Not a syscall tracepoint: enabling one would send every
		 * syscall on the host through the slow path. */
		void *regs = (void *)bpf_task_pt_regs(bpf_get_current_task_btf());
		__u64 nr = ~0ULL, arg = 0;
		bpf_probe_read_kernel(&nr, sizeof(nr), regs + OFF_PT_REGS_SYSCALL_NR);
		if (nr == NR_LISTEN && bpf_probe_read_kernel(&arg, sizeof(arg), regs + OFF_PT_REGS_ARG2) == 0)
			val.backlog = (__s32)arg;     /* io_uring's listen (no syscall) leaves it unknown */
#endif
		/* listen() runs in process context: the task is the listener's owner. Remembered here,
		 * the owner is named even if it exits before user space reads its drops. */
		val.owner_tgid = bpf_get_current_pid_tgid() >> 32;
		bpf_get_current_comm(val.owner_comm, sizeof(val.owner_comm));
		if (listeners.insert(&key, &val) == 0) {
			listeners_changed(1);
			netstat_listener_added((void *)key.net);
		} else {
			listeners.update(&key, &val);     /* a new listener on a port whose old one we missed */
		}
	} else {
		struct listener_val *val = listeners.lookup(&key);
		if (!val)
			return 0;
		if (val->sk == (__u64)sk) {
			if (listeners.delete(&key) == 0) {
				listeners_changed(-1);
				netstat_listener_removed((void *)key.net, sk);
			}
		} else if (newstate == TCP_SYN_RECV && val->synq_seen) {
			/* A child, cloned from the listener (inet_csk_clone_lock): its request leaves the
			 * SYN queue (report_syn_outcome). */
			val->synq_seen--;
		}
	}
	return 0;
}

/* A socket a hook names, learned if it is a TCP listener (the two learning hooks below; SCTP and DCCP
 * listeners are in LISTEN state too). */
static __always_inline void learn_if_tcp_listener(void *sk)
{
	__u8 state = 0;
	bpf_probe_read_kernel(&state, sizeof(state), sk + OFF_SOCK_STATE);
	if (state != TCP_LISTEN)
		return;
	__u16 protocol = 0;
	bpf_probe_read_kernel(&protocol, sizeof(protocol), sk + OFF_SOCK_PROTOCOL);
	if (protocol == IPPROTO_TCP)
		learn_listener(sk);
}

#ifdef HAVE_SK_DATA_READY
/* sock:sk_data_ready (Linux 6.6+), raw (sk): fires on a listener when a new child joins its accept
 * queue — and on every socket that receives data, hence raw and the early state test. Needed only
 * until every listener that predates rsttrace is known: then user space detaches it (Session). */
RAW_TRACEPOINT_PROBE(sk_data_ready)
{
	void *sk = (void *)ctx->args[0];
	learn_if_tcp_listener(sk);
	return 0;
}
#endif

#ifdef HAVE_SOCK_RECV_LENGTH
/* sock:sock_recv_length (Linux 6.3+), raw (sk, ret, flags): fires after every recvmsg() on the host,
 * whatever it returned. User space takes a copy of the fd of each listener that predates rsttrace
 * (pidfd_getfd) and calls recv(MSG_PEEK|MSG_DONTWAIT) on it — a listener answers ENOTCONN, nothing else
 * happens — so that the listener passes here and is learned before its first SYN (tracer/kernel/
 * listener_poke.py). Attached only for that moment: user space detaches it after the first pokes. */
RAW_TRACEPOINT_PROBE(sock_recv_length)
{
	void *sk = (void *)ctx->args[0];
	if (!sk || (int)ctx->args[1] != -107)      /* -ENOTCONN: what a listener answers */
		return 0;
	learn_if_tcp_listener(sk);
	return 0;
}
#endif

#ifdef LISTEN_SYN_TRACEPOINT
/* net:netif_receive_skb (raw tracepoint) — every packet entering the stack, before IP: for a SYN
 * to a known listener on a traced port, read the queues it meets and replay the verdict. */
RAW_TRACEPOINT_PROBE(netif_receive_skb)
{
#ifdef ORIGIN_PACKETS
	origin_received((void *)ctx->args[0]);       /* origin.bpf.c: handshakes' and RSTs' looks */
#endif
	if (!have_listeners())
		return 0;       /* no listener on a traced port: nothing a SYN could be dropped by */
	void *skb = (void *)ctx->args[0];
	struct segment seg = {};
	parse_segment_if(skb, 0, 1, &seg);       /* SYNs only */
	if (!seg.ok || !family_wanted(seg.family) || !port_wanted(seg.dport, seg.sport))
		return 0;

	void *net = net_of_skb(skb);
	struct listener_val *listener = listener_at(net, seg.dport);
	if (!listener)
		return 0;
	app_note_syn(listener->netns, seg.dport);
	report_syn_verdict(ctx, (void *)listener->sk, net, &seg, RSTTRACE_HOOK_NONE, RAW_TP_STACK_SKIP);
	return 0;
}

#endif /* LISTEN_SYN_TRACEPOINT */

#ifdef LISTEN_SYN_CONSUMED
#ifdef NETSTAT_PERCPU
/* A SYN to a traced listener, with what the kernel counted for it on this CPU (netstat.bpf.c): a
 * drop or a cookie is reported as the kernel counted it; moves it does not explain go to the other
 * ports (`mixed`: SYNs to untraced ports came on this CPU since its last read), else they stay
 * `unexplained`. The queues shown are read after the decision. */
static __always_inline void report_counted_syn(void *ctx, struct listener_val *listener, void *net,
					       struct segment *seg, __u64 *moved, struct netstat_cpu *counted, int mixed)
{
	void *sk = (void *)listener->sk;
	struct queue_state q = {};
	read_queues(sk, net, &q);
	listener->synq_seen = q.syn_qlen;     /* the inference's state, for a CPU that loses its baseline */
	__u8 verdict = counted_syn_verdict(moved, &q, listener_dropped(sk));
	netstat_keep(mixed ? counted->other_ports : counted->unexplained, moved);
	if (verdict != RSTTRACE_VERDICT_NONE)
		emit_syn_verdict(ctx, sk, &q, verdict, seg, RSTTRACE_HOOK_NONE, RAW_TP_STACK_SKIP, 0);
}
#endif

/* skb:consume_skb (raw: skb, location; `location` since Linux 6.3), where the caller is
 * tcp_rcv_state_process() [SYN_CONSUMER_LO, SYN_CONSUMER_HI): its LISTEN branch consumes every SYN
 * the listener has decided on — accepted, answered with a cookie, or dropped (tcp_conn_request()
 * returns 0 on its drop paths, Linux 4.4+). So this runs for the SYNs that reach a listener, after
 * the decision, instead of for every packet of the host before it (netif_receive_skb: several runs per
 * connection, parsing each). One compare turns every other consume_skb of the host away. With
 * NETSTAT_PERCPU the verdict is what the kernel counted (netstat.bpf.c); else it is told from the
 * queues (report_syn_outcome). */
RAW_TRACEPOINT_PROBE(consume_skb)
{
	__u64 location = ctx->args[1];
	if (location - SYN_CONSUMER_LO >= SYN_CONSUMER_HI - SYN_CONSUMER_LO)
		return 0;
	if (!have_listeners())
		return 0;
	void *skb = (void *)ctx->args[0];
	struct segment seg = {};
	parse_segment_if(skb, 1, 1, &seg);       /* the transport header is set by now; SYNs only */
	if (!seg.ok)
		return 0;
	if (!family_wanted(seg.family) || !port_wanted(seg.dport, seg.sport)) {
#ifdef NETSTAT_PERCPU
		netstat_untraced_syn();
#endif
		return 0;
	}
	void *net = net_of_skb(skb);        /* skb->dev is cleared by now: the route's device */
	struct listener_val *listener = listener_at(net, seg.dport);
	if (listener)
		app_note_syn(listener->netns, seg.dport);
#ifdef NETSTAT_PERCPU
	__u64 moved[NS_COUNTERS] = {};
	struct netstat_cpu *counted = netstat_moves(net, moved);
	int mixed = netstat_untraced_since();
	if (counted && !listener) {
		netstat_keep(mixed ? counted->other_ports : counted->unexplained, moved);
		return 0;
	}
	if (counted) {
		report_counted_syn(ctx, listener, net, &seg, moved, counted, mixed);
		return 0;
	}
#endif
	if (listener)
		report_syn_outcome(ctx, listener, net, &seg, RAW_TP_STACK_SKIP);
	return 0;
}
#endif /* LISTEN_SYN_CONSUMED */

#ifdef LISTEN_OVERFLOW_REASON

/* skb:kfree_skb with reason TCP_LISTEN_OVERFLOW (Linux 6.3+) — the handshake's final ACK found the
 * accept queue full when tcp_v4/v6_syn_recv_sock() was to create the child; rx_sk is the listener.
 * Raw (skb, location, reason, rx_sk: the prototype since rx_sk was added, 6.11, which the loader
 * requires): the classic tracepoint would build its record for every dropped packet of the host
 * before rsttrace could look at the reason.
 *
 * With SYN cookies the final ACK carries the cookie, and when tcp_v4/v6_syn_recv_sock() refuses it a
 * child — the accept queue full (counted in ListenOverflows), or memory short — cookie_v4/v6_check()
 * frees it with reason NO_SOCKET (Linux 6.9+) and no socket: the listener is then found by netns and
 * port, and its queues, read a moment later, may be shorter already (an accept() on another CPU):
 * RSTTRACE_F_INFERRED. */
#ifdef COOKIE_NO_SOCKET_REASON
static __always_inline int in_cookie_check(__u64 location)
{
	if (location - COOKIE_CHECK0_LO < COOKIE_CHECK0_HI - COOKIE_CHECK0_LO)
		return 1;
#ifdef COOKIE_CHECK1_LO
	if (location - COOKIE_CHECK1_LO < COOKIE_CHECK1_HI - COOKIE_CHECK1_LO)
		return 1;
#endif
	return 0;
}
#endif

RAW_TRACEPOINT_PROBE(kfree_skb)
{
	__u32 reason = (__u32)ctx->args[2];
	/* Read before any branch: clang would otherwise fold the choice below into ctx + offset,
	 * which the verifier refuses ("dereference of modified ctx ptr"). */
	void *rx_sk = (void *)ctx->args[3];
	compiler_barrier();
	int cookie_ack = 0;
	if (reason != LISTEN_OVERFLOW_REASON) {
#ifdef COOKIE_NO_SOCKET_REASON
		if (reason == COOKIE_NO_SOCKET_REASON && in_cookie_check(ctx->args[1])) {
			cookie_ack = 1;
		} else {
#ifdef ORIGIN_NO_SOCKET
			if (reason == ORIGIN_NO_SOCKET)
				origin_freed(ctx, (void *)ctx->args[0]);   /* origin.bpf.c: an RST for no socket */
#ifdef ORIGIN_PACKETS
			else
				origin_dropped(ctx, (void *)ctx->args[0]); /* ... or one of TCP's, dropped */
#endif
#endif
			return 0;
		}
#else
#ifdef ORIGIN_NO_SOCKET
		if (reason == ORIGIN_NO_SOCKET)
			origin_freed(ctx, (void *)ctx->args[0]);
#ifdef ORIGIN_PACKETS
		else
			origin_dropped(ctx, (void *)ctx->args[0]);
#endif
#endif
		return 0;
#endif
	}
	void *skb = (void *)ctx->args[0];
	struct segment seg = {};
	parse_segment(skb, 1, &seg);
	if (!seg.ok)
		return 0;
	int traced = family_wanted(seg.family) && port_wanted(seg.dport, seg.sport);
	/* The kernel's verdict where it counted one (netstat.bpf.c); else the drop reason's word,
	 * inferred for a cookie's ACK (its queue is read a moment later). */
	__u8 verdict = RSTTRACE_VERDICT_ACCEPT_QUEUE_FULL;
	int inferred = cookie_ack;
#ifdef NETSTAT_PERCPU
	__u64 moved[NS_COUNTERS] = {};
	struct netstat_cpu *counted = netstat_moves(rx_sk ? net_of_sock(rx_sk) : net_of_skb(skb), moved);
	if (counted) {
		if (!traced) {
			netstat_keep(counted->other_ports, moved);
			return 0;
		}
		verdict = counted_ack_verdict(moved);
		netstat_keep(counted->unexplained, moved);
		if (rx_sk)
			listener_dropped(rx_sk);     /* its drops seen here: not a later SYN's */
		if (verdict == RSTTRACE_VERDICT_NONE)
			return 0;       /* the kernel counted no listen drop: an invalid cookie, not a full queue */
		inferred = 0;
	}
#endif
	if (!traced)
		return 0;
	struct rsttrace_event *e = new_event(RSTTRACE_ACK_DROPPED, SLOT_ACK_AT_FREE);
	if (!e)
		return 0;
	e->kernel_reason = reason;
	e->verdict = verdict;
	if (inferred)
		e->flags |= RSTTRACE_F_INFERRED;
	fill_from_segment(e, &seg);
	fill_task(e);
	if (walk_stack_skip(ctx, e, RAW_TP_STACK_SKIP))
		e->flags |= RSTTRACE_F_SOFTIRQ;
	void *sk = cookie_ack ? 0 : rx_sk;
	if (cookie_ack) {
		struct listener_val *listener = listener_at(net_of_skb(skb), seg.dport);
		if (listener)
			sk = (void *)listener->sk;
	}
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
	emit(ctx, e);
	return 0;
}
#endif
