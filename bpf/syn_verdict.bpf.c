/* syn_verdict.bpf.c — a listener's verdict on a SYN, told from its queues and the netns sysctls, for
 * the hooks that meet SYNs the kernel drops without a drop reason or tracepoint: listen.bpf.c
 * (skb:consume_skb, net:netif_receive_skb), kprobe.bpf.c (tcp_conn_request()) and netstat.bpf.c (the
 * queues beside the kernel's own counts). Uses maps.bpf.c and sock.bpf.c.
 *
 * It replays tcp_conn_request()'s tests (Linux 4.4+) on queues read a moment before or after the
 * kernel's decision, so its verdicts are inferences (RSTTRACE_F_INFERRED). It cannot see the TCP
 * metrics entry that lets a "proven" peer through the SYN backlog's reserve, nor, between two SYNs, a
 * request that expired or a child made from a cookie (report_syn_outcome).
 *
 *   SYNQ_FULL_GT          inet_csk_reqsk_queue_is_full() tests qlen > max (Linux 6.13+, "allow a
 *                         connection when sk_max_ack_backlog is zero"); else qlen >= max.
 *   SK_BACKLOG_SPAN_LO/LEN, NET_SYN_SPAN_LO/LEN   one read covers the accept queue's length and
 *                         limit, or the two netns sysctls, where they sit close.
 */

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
 * adjacent since 4.14; NET_SYN_SPAN: the two netns sysctls, where they sit close). `net`: the
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
