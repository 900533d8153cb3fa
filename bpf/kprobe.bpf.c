/* kprobe.bpf.c — the hooks of the design card on kernel functions, for kernels with fentry or
 * kprobes (most production kernels, e.g. Debian 12's 6.1): RSTs sent where tcp:tcp_send_reset has
 * no reason (< 6.10, and before 6.10 it did not fire for RSTs with no socket), and the listen-queue
 * drops at the functions that decide them. Uses maps.bpf.c, sock.bpf.c and syn_verdict.bpf.c.
 *
 * Each hook body is written once and entered either from an fentry program (KFUNC_PROBE: BTF-typed,
 * Linux 5.5+, cheaper: no int3) when FENTRY_* is defined, or from a kprobe (kprobe__ prefix)
 * otherwise; bcc attaches both kinds at load. Kernel functions are no stable interface: the
 * capability probe looks each one up in the kernel's BTF (and tries fentry on it) before planning it.
 * No function says why it resets: the reason of an RST is inferred in user space
 * (tracer/enrich/reasons.py infer_rst_reason) from the hooked function, the callers on the kernel
 * stack and the socket's state; what cannot be told apart stays `unknown`. The queue verdicts are
 * replayed on entry (RSTTRACE_F_INFERRED).
 *
 *   FENTRY_RST / FENTRY_SYN / FENTRY_ACK   enter that group through fentry (the kernel attaches
 *                    BPF_PROG_TYPE_TRACING programs to its functions), else through kprobes
 *
 *   KPROBE_RST       hook tcp_send_active_reset() and tcp_v4/v6_send_reset()     (Linux 2.6+)
 *   KPROBE_LISTEN_SYN  hook tcp_conn_request()                                  (Linux 4.4+)
 *   KPROBE_LISTEN_ACK  hook tcp_v4/v6_syn_recv_sock()                            (Linux 2.6+)
 *   HAVE_IPV6_RESET    the IPv6 functions exist (CONFIG_IPV6)
 * kprobes: x86_64 only, arguments are read from struct pt_regs registers.
 */

/* Under fentry the stack starts with the BPF program and its trampoline; the hooked function
 * itself is not on it (e->hook names it). */
#define FENTRY_STACK_SKIP 2
#ifdef FENTRY_RST
#define RST_STACK_SKIP FENTRY_STACK_SKIP
#else
#define RST_STACK_SKIP 0
#endif
#ifdef FENTRY_SYN
#define SYN_STACK_SKIP FENTRY_STACK_SKIP
#else
#define SYN_STACK_SKIP 0
#endif
#ifdef FENTRY_ACK
#define ACK_STACK_SKIP FENTRY_STACK_SKIP
#else
#define ACK_STACK_SKIP 0
#endif

struct pt_regs {   /* arch/x86/include/asm/ptrace.h (x86_64), stable layout */
	unsigned long r15, r14, r13, r12, bp, bx, r11, r10, r9, r8, ax, cx, dx, si, di, orig_ax, ip, cs, flags, sp, ss;
};
#define ARG1(ctx) ((void *)(ctx)->di)
#define ARG2(ctx) ((void *)(ctx)->si)
#define ARG3(ctx) ((void *)(ctx)->dx)
#define ARG4(ctx) ((void *)(ctx)->cx)

/* Family, addresses and ports of a full or mini socket (struct sock_common is at their start). */
static __always_inline void fill_from_sock(struct rsttrace_event *e, void *sk)
{
	__u16 family = 0, dport = 0, sport = 0;
	bpf_probe_read_kernel(&family, sizeof(family), sk + OFF_SOCK_FAMILY);
	/* inet_sport, not skc_num: tcp_set_state(TCP_CLOSE) unbinds the port (inet_num = 0) before
	 * __tcp_close() sends its reset. */
	bpf_probe_read_kernel(&sport, sizeof(sport), sk + OFF_INET_SPORT);
	bpf_probe_read_kernel(&dport, sizeof(dport), sk + OFF_SOCK_DPORT);
	e->lport = __builtin_bswap16(sport);
	e->rport = __builtin_bswap16(dport);
	e->family = family;
	if (family == AF_INET) {
		bpf_probe_read_kernel(e->laddr, 4, sk + OFF_SOCK_RCV_SADDR);
		bpf_probe_read_kernel(e->raddr, 4, sk + OFF_SOCK_DADDR);
	} else {
		bpf_probe_read_kernel(e->laddr, 16, sk + OFF_SOCK_V6_RCV_SADDR);
		bpf_probe_read_kernel(e->raddr, 16, sk + OFF_SOCK_V6_DADDR);
	}
}

static __always_inline __u8 sock_state(void *sk)
{
	__u8 state = 0;
	bpf_probe_read_kernel(&state, sizeof(state), sk + OFF_SOCK_STATE);
	return state;
}

#ifdef KPROBE_RST
/* tcp_send_active_reset(struct sock *sk, gfp_t priority[, enum sk_rst_reason]) — the local side
 * aborts: close with unread data, SO_LINGER {1,0}, disconnect, keepalive/linger2 timers, memory. */
static __always_inline int active_reset(void *ctx, void *sk)
{
	if (!sk)
		return 0;
	struct rsttrace_event *e = new_event(RSTTRACE_RST_SENT, RSTTRACE_HOOK_TCP_SEND_ACTIVE_RESET);
	if (!e)
		return 0;
	e->hook = RSTTRACE_HOOK_TCP_SEND_ACTIVE_RESET;
	fill_from_sock(e, sk);
	if (!family_wanted(e->family) || !port_wanted(e->lport, e->rport))
		return 0;
	e->kernel_reason = RSTTRACE_NO_REASON;
	e->state = sock_state(sk);
	fill_task(e);
	if (walk_stack_skip(ctx, e, RST_STACK_SKIP))
		e->flags |= RSTTRACE_F_SOFTIRQ;
	if (!pid_wanted(e))
		return 0;
	read_socket(sk, e);
	emit(ctx, e);
	return 0;
}

/* tcp_v4_send_reset(const struct sock *sk, struct sk_buff *skb) — a reply to a received segment:
 * no socket (closed port), TIME_WAIT, a listener refusing a 3rd ACK, data after close, invalid
 * segments. It returns at once for a segment that is itself an RST: so does this probe. */
static __always_inline int reply_reset(void *ctx, void *sk, void *skb, __u8 hook)
{
	struct segment seg = {};
	parse_segment(skb, 1, &seg);
	if (!seg.ok || (seg.flags & TCPHDR_RST))
		return 0;
	if (!family_wanted(seg.family) || !port_wanted(seg.dport, seg.sport))
		return 0;
	struct rsttrace_event *e = new_event(RSTTRACE_RST_SENT, hook);
	if (!e)
		return 0;
	e->kernel_reason = RSTTRACE_NO_REASON;
	e->hook = hook;
	fill_from_segment(e, &seg);
	fill_task(e);
	if (walk_stack_skip(ctx, e, RST_STACK_SKIP))
		e->flags |= RSTTRACE_F_SOFTIRQ;
	if (!pid_wanted(e))
		return 0;
	if (sk) {
		e->state = sock_state(sk);
		read_socket(sk, e);
		if (e->state == TCP_LISTEN)
			read_listener(sk, e);
	} else {
		e->netns = netns_of_skb(skb);
	}
	emit(ctx, e);
	return 0;
}

#ifdef FENTRY_RST
KFUNC_PROBE(tcp_send_active_reset, void *sk)
{
	return active_reset(ctx, sk);
}

KFUNC_PROBE(tcp_v4_send_reset, void *sk, void *skb)
{
	return reply_reset(ctx, sk, skb, RSTTRACE_HOOK_TCP_V4_SEND_RESET);
}
#ifdef HAVE_IPV6_RESET
KFUNC_PROBE(tcp_v6_send_reset, void *sk, void *skb)
{
	return reply_reset(ctx, sk, skb, RSTTRACE_HOOK_TCP_V6_SEND_RESET);
}
#endif
#else
int kprobe__tcp_send_active_reset(struct pt_regs *ctx)
{
	return active_reset(ctx, ARG1(ctx));
}

int kprobe__tcp_v4_send_reset(struct pt_regs *ctx)
{
	return reply_reset(ctx, ARG1(ctx), ARG2(ctx), RSTTRACE_HOOK_TCP_V4_SEND_RESET);
}
#ifdef HAVE_IPV6_RESET
int kprobe__tcp_v6_send_reset(struct pt_regs *ctx)
{
	return reply_reset(ctx, ARG1(ctx), ARG2(ctx), RSTTRACE_HOOK_TCP_V6_SEND_RESET);
}
#endif
#endif /* FENTRY_RST */
#endif /* KPROBE_RST */

#ifdef KPROBE_LISTEN_SYN
/* tcp_conn_request(rsk_ops, af_ops, struct sock *sk, struct sk_buff *skb) — a SYN reaches a
 * listener. Its verdict (accept queue full, SYN queue full, cookie) is replayed from the queue
 * state read on entry, under the same conditions the function tests next (syn_verdict()). */
static __always_inline int conn_request(void *ctx, void *sk, void *skb)
{
	struct segment seg = {};
	parse_segment(skb, 1, &seg);
	if (!seg.ok || !family_wanted(seg.family) || !port_wanted(seg.dport, seg.sport))
		return 0;
#ifdef APP_ERRORS
	app_note_syn(netns_of_sock(sk), seg.dport);
#endif
	report_syn_verdict(ctx, sk, 0, &seg, RSTTRACE_HOOK_TCP_CONN_REQUEST, SYN_STACK_SKIP);
	return 0;
}

#ifdef FENTRY_SYN
KFUNC_PROBE(tcp_conn_request, void *rsk_ops, void *af_ops, void *sk, void *skb)
{
	return conn_request(ctx, sk, skb);
}
#else
int kprobe__tcp_conn_request(struct pt_regs *ctx)
{
	return conn_request(ctx, ARG3(ctx), ARG4(ctx));
}
#endif
#endif /* KPROBE_LISTEN_SYN */

#ifdef KPROBE_LISTEN_ACK
/* tcp_v4_syn_recv_sock(const struct sock *sk, struct sk_buff *skb, ...) — the 3rd ACK is to
 * become a child socket; its first test is sk_acceptq_is_full(sk), which drops the ACK
 * (ListenOverflows; with tcp_abort_on_overflow=1 the caller then resets it). */
static __always_inline int syn_recv_sock(void *ctx, void *sk, void *skb, int family, __u8 hook)
{
	struct segment seg = {};
	parse_segment(skb, 1, &seg);
	if (!seg.ok || seg.family != family || !port_wanted(seg.dport, seg.sport) || !family_wanted(seg.family))
		return 0;
	struct rsttrace_event *e = new_event(RSTTRACE_ACK_DROPPED, hook);
	if (!e)
		return 0;
	read_listener(sk, e);
	if (e->accept_qlen <= e->accept_qmax)
		return 0;
	e->kernel_reason = RSTTRACE_NO_REASON;
	e->hook = hook;
	e->verdict = RSTTRACE_VERDICT_ACCEPT_QUEUE_FULL;
	e->flags |= RSTTRACE_F_INFERRED;
	e->state = TCP_LISTEN;
	fill_from_segment(e, &seg);
	fill_task(e);
	if (walk_stack_skip(ctx, e, ACK_STACK_SKIP))
		e->flags |= RSTTRACE_F_SOFTIRQ;
	read_socket(sk, e);
	emit(ctx, e);
	return 0;
}

/* tcp_v6_syn_recv_sock hands IPv4-mapped handshakes to tcp_v4_syn_recv_sock: count IPv6 only. */
#ifdef FENTRY_ACK
KFUNC_PROBE(tcp_v4_syn_recv_sock, void *sk, void *skb)
{
	return syn_recv_sock(ctx, sk, skb, AF_INET, RSTTRACE_HOOK_TCP_V4_SYN_RECV_SOCK);
}
#ifdef HAVE_IPV6_RESET
KFUNC_PROBE(tcp_v6_syn_recv_sock, void *sk, void *skb)
{
	return syn_recv_sock(ctx, sk, skb, AF_INET6, RSTTRACE_HOOK_TCP_V6_SYN_RECV_SOCK);
}
#endif
#else
int kprobe__tcp_v4_syn_recv_sock(struct pt_regs *ctx)
{
	return syn_recv_sock(ctx, ARG1(ctx), ARG2(ctx), AF_INET, RSTTRACE_HOOK_TCP_V4_SYN_RECV_SOCK);
}
#ifdef HAVE_IPV6_RESET
int kprobe__tcp_v6_syn_recv_sock(struct pt_regs *ctx)
{
	return syn_recv_sock(ctx, ARG1(ctx), ARG2(ctx), AF_INET6, RSTTRACE_HOOK_TCP_V6_SYN_RECV_SOCK);
}
#endif
#endif
#endif /* KPROBE_LISTEN_ACK */
