/* rst.bpf.c — RSTs sent and received, from tracepoints (no kprobes, no kernel headers). Uses
 * maps.bpf.c, sock.bpf.c and owners.bpf.c.
 *
 *   tcp:tcp_send_reset      every RST the host sends (Linux 4.16+, the loader's floor), with the
 *                           kernel's reason since 6.10. Before 6.10 it has no reason and misses replies
 *                           sent with no socket: kprobe.bpf.c takes RSTs sent there where it can run.
 *   tcp:tcp_receive_reset   every RST a socket accepted (tcp_reset(), Linux 4.15+): the "Connection
 *                           reset by peer" side. An RST the kernel discards (out of window, no
 *                           socket) is not seen, and a received RST carries no reason.
 * In softirq the task on the CPU did not cause the RST: user space names the socket's owner instead
 * (or the process that connected it, owners.bpf.c).
 *
 *   HAVE_RST_REASON       tcp:tcp_send_reset carries `enum sk_rst_reason reason` and sockaddr
 *                         addresses (Linux 6.10+); without it the older field layout is used.
 *   HAVE_RECEIVE_RESET_COOKIE  tcp:tcp_receive_reset carries sock_cookie (Linux 6.7+).
 *   RST_SENT_BY_KPROBE    RSTs sent come from kprobe.bpf.c (kernels whose tracepoint has no reason).
 */
#ifdef HAVE_RST_REASON
enum sk_rst_reason { RSTTRACE_SK_RST_REASON_PLACEHOLDER = 0 }; /* named by the tracepoint format */
#endif

/* Copy an address out of a struct sockaddr_in / sockaddr_in6 (family at 0, port at 2,
 * IPv4 address at 4, IPv6 address at 8). */
static __always_inline void sockaddr_addr(const __u8 *sa, __u16 family, __u8 *out)
{
	if (family == AF_INET)
		__builtin_memcpy(out, sa + 4, 4);
	else
		__builtin_memcpy(out, sa + 8, 16);
}

#ifndef RST_SENT_BY_KPROBE
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

	struct rsttrace_event *e = new_event(RSTTRACE_RST_SENT, SLOT_RST_SENT_TP);
	if (!e)
		return 0;
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
	if (!pid_wanted(e))
		return 0;
	void *sk = (void *)args->skaddr;
	void *skb = (void *)args->skbaddr;
	if (sk) {
		read_socket(sk, e);
#ifdef CONNECT_OWNERS
		if (e->state != TCP_LISTEN)
			connector_of(sk, e);
#endif
		/* A listener answering the 3rd ACK with RST (tcp_abort_on_overflow=1 gives INVALID_SYN):
		 * its queues tell whether this was an accept-queue overflow. */
		if (e->state == TCP_LISTEN) {
			read_listener(sk, e);
			/* The tracepoint took the addresses from the listener (remote 0.0.0.0:0); the
			 * segment being answered has the real ones. */
			struct segment seg = {};
			if (skb)
				parse_segment(skb, 1, &seg);
			if (seg.ok)
				fill_from_segment(e, &seg);
		}
	}
	if (skb) {   /* a reply: remember what it answered; without a socket the netns comes from the device */
		e->tcp_flags = tcp_flags_of_skb(skb);
		if (!sk)
			e->netns = netns_of_skb(skb);
	}
	emit(args, e);
	return 0;
}

#endif /* RST_SENT_BY_KPROBE: kprobe.bpf.c reports RSTs sent instead */

/* tcp:tcp_receive_reset — a socket accepted an incoming RST (tcp_reset(), since Linux 4.15): the
 * "Connection reset by peer" side. Runs in softirq or, when the socket was owned by the user, in
 * release_sock() of the owner. sport/saddr are the socket's local side. */
TRACEPOINT_PROBE(tcp, tcp_receive_reset)
{
	__u16 family = args->family;
	if (!family_wanted(family) || !port_wanted(args->sport, args->dport))
		return 0;

	struct rsttrace_event *e = new_event(RSTTRACE_RST_RECEIVED, SLOT_RST_RECEIVED_TP);
	if (!e)
		return 0;
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
	if (!pid_wanted(e))
		return 0;
	void *sk = (void *)args->skaddr;
	if (sk) {
		__u8 state = 0;
		bpf_probe_read_kernel(&state, sizeof(state), sk + OFF_SOCK_STATE);
		e->state = state;
		read_socket(sk, e);
#ifdef CONNECT_OWNERS
		connector_of(sk, e);
#endif
	}
#ifdef ORIGIN_PACKETS
	origin_of_received(e);     /* origin.bpf.c: not from where the peer's packets come from? */
#endif
	emit(args, e);
	return 0;
}
