/* origin.bpf.c — who really sent an RST (subject file, compiled with ORIGINS; after app.bpf.c).
 * Uses maps.bpf.c and sock.bpf.c. The TCP tracepoints see only what TCP itself does; three kinds of
 * reset pass by them:
 *
 *   net:net_dev_queue     (--origins) every packet leaving through a device. An RST that TCP did not
 *                         make — no socket on the skb (TCP's own replies carry its per-CPU control
 *                         socket, Linux 4.x+; IPv6 replies do not, but have tcp_v6_send_response() on
 *                         the stack) and not forwarded (skb_iif 0) — was made by netfilter's REJECT
 *                         (nf_send_reset/nf_send_reset6) or another kernel part outside TCP: reported as
 *                         an `rst_sent` of hook NET_DEV_QUEUE, the stack as evidence of which. Every RST
 *                         is counted per netns here (device_rsts), for reconciliation with TcpOutRsts.
 *   icmp:icmp_send        (Linux 6.12+) an ICMP destination unreachable answering a TCP segment: TCP
 *                         answers with RST, never ICMP, so netfilter's REJECT (nf_send_unreach) or a
 *                         prohibit route sent it. `rst_sent` of hook ICMP_SEND, kernel_reason = ICMP code.
 *                         REJECTs answering net/host unreachable look like routing failures: not kept.
 *   net:netif_receive_skb (--origins) every packet entering through a device: the TTL and timestamp
 *                         option of each flow's SYN or SYN-ACK (peer_looks), and of each RST, compared
 *                         with its flow's (rst_looks). A received RST whose TTL differs from the peer's
 *                         handshake was not sent from where the peer's packets come from: a middlebox
 *                         forged it. tcp:tcp_receive_reset then carries RSTTRACE_VERDICT_RST_NOT_FROM_PEER.
 *   skb:kfree_skb         reason NO_SOCKET for an RST (Linux 5.17+): an RST arrived for a connection this
 *                         host does not have; reported as an `rst_received` without a socket. Any other
 *                         drop of an RST TCP made, on its way out: counted (device_rsts.tcp_dropped).
 *
 *   ORIGINS                 this file is in: ICMP REJECTs and RSTs for no socket, which cost nothing until
 *                           they happen.
 *   ORIGIN_PACKETS          --origins: the per-packet hooks as well (net_dev_queue, netif_receive_skb), and
 *                           the accounting of TCP's RSTs dropped on their way out.
 *   TCP_V6_REPLY_LO/HI      tcp_v6_send_response()'s text: an IPv6 RST from it is TCP's own.
 *   ORIGIN_ICMP             icmp:icmp_send exists.
 *   ORIGIN_RECEIVE_HOOK     this file attaches net:netif_receive_skb itself (listen.bpf.c calls
 *                           origin_received() from its own program otherwise).
 *   ORIGIN_NO_SOCKET=N      skb_drop_reason NO_SOCKET; ORIGIN_FREE_HOOK: this file attaches
 *                           skb:kfree_skb itself (listen.bpf.c calls origin_freed() otherwise).
 */
#ifdef ORIGINS

#define ICMP_DEST_UNREACH 3
#define SLOT_DEVICE_RST		(HOOK_SLOTS + 4)      /* net:net_dev_queue */
#define SLOT_ICMP_REJECT	(HOOK_SLOTS + 5)      /* icmp:icmp_send */
#define SLOT_RST_NO_SOCKET	(HOOK_SLOTS + 6)      /* skb:kfree_skb, an RST for no socket */
_Static_assert(SCRATCH_SLOTS == HOOK_SLOTS + 7, "origin.bpf.c's scratch slots");

#ifdef ORIGIN_PACKETS
/* A flow as one end sees it: its netns (0 where the end is not known yet), local side first. */
struct flow_key {
	__u32 netns;
	__u16 family;
	__u16 lport;            /* host byte order */
	__u16 rport;
	__u16 pad;
	__u8 laddr[16];
	__u8 raddr[16];
};
/* What the peer's packets look like on arrival: from its SYN (we serve) or SYN-ACK (we connect). */
struct peer_look {
	__u64 seen_ns;
	__u8 ttl;               /* IPv4 TTL or IPv6 hop limit */
	__u8 timestamps;        /* the TCP timestamp option was there */
	__u8 pad[6];
};
BPF_TABLE("lru_hash", struct flow_key, struct peer_look, peer_looks, 65536);
/* A received RST, and the peer's handshake it was compared with (read by user space too). */
struct rst_look {
	__u64 seen_ns;
	__u8 ttl;
	__u8 timestamps;
	__u8 peer_ttl;          /* 0: no handshake seen for this flow (it began before rsttrace) */
	__u8 peer_timestamps;
	__u8 not_from_peer;     /* the TTL differs: sent from elsewhere than the peer's packets */
	__u8 pad[3];
};
BPF_TABLE("lru_hash", struct flow_key, struct rst_look, rst_looks, 8192);
/* RSTs made outside TCP on this host, under the flow as their receiver sees it (netns 0), whatever
 * the filters: a client's received RST is matched with the rule that made it in another netns even
 * when only the client's netns is traced. */
struct made_rst {
	__u64 seen_ns;
	__u32 netns;            /* where it was made */
	__u32 pad;
};
BPF_TABLE("lru_hash", struct flow_key, struct made_rst, made_rsts, 4096);
/* RSTs leaving through a device, per netns: TcpOutRsts counts TCP's own (by_tcp), and those freed on
 * their way out before a device (tcp_dropped: a netfilter OUTPUT drop, no route, a full qdisc);
 * not_by_tcp are the REJECTs' and others'; forwarded ones are someone else's. */
struct device_rsts {
	__u64 by_tcp;
	__u64 not_by_tcp;
	__u64 forwarded;
	__u64 tcp_dropped;
};
BPF_PERCPU_HASH(device_rsts, __u32, struct device_rsts, 1024);

/* An IPv4/IPv6 + TCP header at `at`: addresses, ports, flags, TTL and whether the timestamp option is
 * there. One read in the usual case (IPv4 without options, or IPv6; extension headers are not
 * followed). */
struct packet {
	struct segment seg;
	__u8 ttl;
	__u8 timestamps;
};

static __always_inline int read_packet(unsigned char *at, struct packet *p, int need_options)
{
	__u8 pkt[64];                        /* the IP and TCP headers; then the TCP options */
	if (!at || bpf_probe_read_kernel(pkt, 60, at) != 0)
		return 0;
	__u8 version = pkt[0] >> 4, proto;
	int hlen;
	if (version == 4) {
		if ((pkt[0] & 0xf) != 5)
			return 0;                /* IP options: not read */
		proto = pkt[9];
		hlen = 20;
		p->ttl = pkt[8];
	} else if (version == 6) {
		proto = pkt[6];
		hlen = 40;
		p->ttl = pkt[7];
	} else {
		return 0;
	}
	if (proto != IPPROTO_TCP)
		return 0;
	__u8 flags = pkt[hlen + 13];
	p->seg.flags = flags;
	if (!(flags & (TCPHDR_SYN | TCPHDR_RST)))
		return 0;                    /* neither a handshake nor a reset: the common case, done */
	p->seg.sport = (__u16)pkt[hlen] << 8 | pkt[hlen + 1];
	p->seg.dport = (__u16)pkt[hlen + 2] << 8 | pkt[hlen + 3];
	ip_addresses(pkt, version, &p->seg);
	p->seg.ok = 1;
	if (!need_options)
		return 1;
	int optlen = (pkt[hlen + 12] >> 4) * 4 - 20;
	if (optlen <= 0)
		return 1;
	if (bpf_probe_read_kernel(pkt, 40, at + hlen + 20) != 0)    /* options: 40 bytes at most */
		return 1;
	/* Options: kind 0 ends them, kind 1 is one byte, the rest are kind, length, data. */
	int i = 0;
#pragma clang loop unroll(disable)
	for (int n = 0; n < 16; n++) {
		if (i >= optlen || i > 38)
			break;
		__u8 kind = pkt[i & 63];
		if (kind == 0)
			break;
		if (kind == 1) {
			i++;
			continue;
		}
		if (kind == 8) {
			p->timestamps = 1;
			break;
		}
		__u8 len = pkt[(i + 1) & 63];
		if (len < 2)
			break;
		i += len;
	}
	return 1;
}

/* A TCP RST on its way out (net_dev_queue) or freed (kfree_skb): its headers, the socket on the skb
 * (TCP's own RSTs carry one, IPv6 replies aside) and the device it came in by (0: made on this host).
 * 0 when the skb holds no RST. */
static __always_inline int read_rst_skb(void *skb, struct packet *p, void **sk, __u32 *iif)
{
	unsigned char *head = 0;
	__u16 nh = 0, th = 0;
	read_skb_offsets(skb, &head, &nh, &th);
	if (!head || nh == (__u16)~0U || !read_packet(head + nh, p, 0) || !p->seg.ok || !(p->seg.flags & TCPHDR_RST))
		return 0;
	bpf_probe_read_kernel(sk, sizeof(*sk), skb + OFF_SKB_SK);
	bpf_probe_read_kernel(iif, sizeof(*iif), skb + OFF_SKB_IIF);
	return 1;
}

/* The flow of a received packet, as the receiving end sees it. */
static __always_inline void flow_of_received(struct flow_key *k, __u32 netns, struct segment *seg)
{
	k->netns = netns;
	k->family = seg->family;
	k->lport = seg->dport;
	k->rport = seg->sport;
	__builtin_memcpy(k->laddr, seg->daddr, 16);
	__builtin_memcpy(k->raddr, seg->saddr, 16);
}

/* Every packet entering through a device. skb->data is the network header there (the device
 * pulled its own header; network_header itself is set only after this tracepoint on some paths). */
static __always_inline void origin_received(void *skb)
{
	unsigned char *data = 0;
	bpf_probe_read_kernel(&data, sizeof(data), skb + OFF_SKB_DATA);
	struct packet p = {};
	if (!read_packet(data, &p, 1) || !p.seg.ok)
		return;
	if (!family_wanted(p.seg.family) || !port_wanted(p.seg.dport, p.seg.sport))
		return;
	struct flow_key key = {};
	flow_of_received(&key, netns_of_skb(skb), &p.seg);
	if (p.seg.flags & TCPHDR_SYN) {
		struct peer_look look = {};
		look.seen_ns = bpf_ktime_get_ns();
		look.ttl = p.ttl;
		look.timestamps = p.timestamps;
		peer_looks.update(&key, &look);
		return;
	}
	struct rst_look rst = {};
	rst.seen_ns = bpf_ktime_get_ns();
	rst.ttl = p.ttl;
	rst.timestamps = p.timestamps;
	struct peer_look *peer = peer_looks.lookup(&key);
	if (peer) {
		rst.peer_ttl = peer->ttl;
		rst.peer_timestamps = peer->timestamps;
		rst.not_from_peer = peer->ttl != p.ttl;
	}
	rst_looks.update(&key, &rst);
}

/* tcp:tcp_receive_reset's event (rst.bpf.c), in the softirq that received the RST or in release_sock()
 * soon after: mark it when the RST did not come from where the peer's packets come from. */
static __always_inline void origin_of_received(struct rsttrace_event *e)
{
	struct flow_key key = {};
	key.netns = e->netns;
	key.family = e->family;
	key.lport = e->lport;
	key.rport = e->rport;
	__builtin_memcpy(key.laddr, e->laddr, 16);
	__builtin_memcpy(key.raddr, e->raddr, 16);
	struct rst_look *rst = rst_looks.lookup(&key);
	if (rst && rst->not_from_peer && e->ktime_ns - rst->seen_ns < 1000000000ULL)
		e->verdict = RSTTRACE_VERDICT_RST_NOT_FROM_PEER;
}

#ifdef ORIGIN_RECEIVE_HOOK
/* net:netif_receive_skb (raw: skb) — see origin_received(). */
RAW_TRACEPOINT_PROBE(netif_receive_skb)
{
	origin_received((void *)ctx->args[0]);
	return 0;
}
#endif

/* Whether TCP made this IPv6 RST: its replies leave tcp_v6_send_response() without a socket. The
 * stack was walked into the event's scratch. */
static __always_inline int made_by_tcp_v6(struct rsttrace_event *e)
{
#ifdef TCP_V6_REPLY_LO
	struct scratch *s = (struct scratch *)e;
#pragma unroll
	for (int i = 0; i < 10; i++) {
		__u64 ip = s->ip[i];
		if (ip - TCP_V6_REPLY_LO < TCP_V6_REPLY_HI - TCP_V6_REPLY_LO)
			return 1;
	}
#endif
	return 0;
}

enum { AT_DEVICE_BY_TCP, AT_DEVICE_NOT_BY_TCP, AT_DEVICE_FORWARDED, TCP_DROPPED };

static __always_inline void device_count(__u32 netns, int what)
{
	struct device_rsts *d = device_rsts.lookup(&netns);
	if (!d) {
		struct device_rsts zero = {};
		device_rsts.update(&netns, &zero);
		d = device_rsts.lookup(&netns);
		if (!d)
			return;
	}
	if (what == AT_DEVICE_BY_TCP)
		d->by_tcp += 1;
	else if (what == AT_DEVICE_NOT_BY_TCP)
		d->not_by_tcp += 1;
	else if (what == AT_DEVICE_FORWARDED)
		d->forwarded += 1;
	else
		d->tcp_dropped += 1;
}

/* net:net_dev_queue (raw: skb) — every packet leaving through a device, in the netns of the device. */
RAW_TRACEPOINT_PROBE(net_dev_queue)
{
	void *skb = (void *)ctx->args[0];
	struct packet p = {};
	void *sk = 0;
	__u32 iif = 0;
	if (!read_rst_skb(skb, &p, &sk, &iif))
		return 0;
	__u32 netns = netns_of_skb(skb);
	if (sk || iif) {
		device_count(netns, iif ? AT_DEVICE_FORWARDED : AT_DEVICE_BY_TCP);
		return 0;
	}
	struct rsttrace_event *e = new_event(RSTTRACE_RST_SENT, SLOT_DEVICE_RST);
	if (!e)
		return 0;
	/* Evidence from the frames above the device's own (__dev_queue_xmit, ip_finish_output2): the
	 * output function, then whoever made the RST. */
	if (walk_stack_skip(ctx, e, RAW_TP_STACK_SKIP + 2))
		e->flags |= RSTTRACE_F_SOFTIRQ;
	if (p.seg.family == AF_INET6 && made_by_tcp_v6(e)) {
		device_count(netns, AT_DEVICE_BY_TCP);
		return 0;
	}
	device_count(netns, AT_DEVICE_NOT_BY_TCP);
	/* Under the flow its receiver sees: the RST's destination is that end's local side. */
	struct flow_key key = {};
	flow_of_received(&key, 0, &p.seg);
	struct made_rst made = {};
	made.seen_ns = e->ktime_ns;
	made.netns = netns;
	made_rsts.update(&key, &made);

	if (!family_wanted(p.seg.family) || !port_wanted(p.seg.sport, p.seg.dport))
		return 0;
	e->hook = RSTTRACE_HOOK_NET_DEV_QUEUE;
	e->kernel_reason = RSTTRACE_NO_REASON;
	e->family = p.seg.family;
	e->netns = netns;
	/* This host's side is the RST's source (the address it claims to come from). */
	e->lport = p.seg.sport;
	e->rport = p.seg.dport;
	__builtin_memcpy(e->laddr, p.seg.saddr, 16);
	__builtin_memcpy(e->raddr, p.seg.daddr, 16);
	/* An RST with ACK answers a segment without one: a SYN (nf_send_reset, like TCP, sets ACK only then). */
	if (p.seg.flags & TCPHDR_ACK)
		e->tcp_flags = TCPHDR_SYN;
	fill_task(e);
	if (!pid_wanted(e))
		return 0;
	emit(ctx, e);
	return 0;
}

#endif /* ORIGIN_PACKETS */

#ifdef ORIGIN_ICMP
/* icmp:icmp_send (raw: skb_in, type, code; Linux 6.12+) — an ICMP error about a received packet. For
 * a TCP segment, a destination unreachable is a REJECT's answer (nf_send_unreach) or a prohibit
 * route's: TCP itself answers with RST. */
RAW_TRACEPOINT_PROBE(icmp_send)
{
	if ((int)ctx->args[1] != ICMP_DEST_UNREACH)
		return 0;
	/* Protocol or port unreachable, net, host or admin prohibited: what REJECT rules answer (and
	 * prohibit routes). Net and host unreachable are left out: routing failures send those too. */
	__u32 code = (__u32)ctx->args[2];
	if (code != 2 && code != 3 && code != 9 && code != 10 && code != 13)
		return 0;
	void *skb = (void *)ctx->args[0];
	struct segment seg = {};
	parse_segment(skb, 0, &seg);
	if (!seg.ok || !family_wanted(seg.family) || !port_wanted(seg.dport, seg.sport))
		return 0;
	struct rsttrace_event *e = new_event(RSTTRACE_RST_SENT, SLOT_ICMP_REJECT);
	if (!e)
		return 0;
	e->hook = RSTTRACE_HOOK_ICMP_SEND;
	e->kernel_reason = code;         /* the ICMP code (port, host, admin prohibited ...) */
	fill_from_segment(e, &seg);
	e->netns = netns_of_skb(skb);
	fill_task(e);
	if (walk_stack_skip(ctx, e, RAW_TP_STACK_SKIP))
		e->flags |= RSTTRACE_F_SOFTIRQ;
	if (!pid_wanted(e))
		return 0;
	emit(ctx, e);
	return 0;
}
#endif

#ifdef ORIGIN_NO_SOCKET
#ifdef ORIGIN_PACKETS
/* skb:kfree_skb, any other drop: an RST TCP made, freed on its way out before any device (skb_iif 0;
 * TCP's own: a socket on the skb, or tcp_v6_send_response() on the stack) — TcpOutRsts counted it. */
static __always_inline void origin_dropped(void *ctx, void *skb)
{
	struct packet p = {};
	void *sk = 0;
	__u32 iif = 0;
	if (!read_rst_skb(skb, &p, &sk, &iif))
		return;
	if (iif)
		return;          /* received: not on its way out */
	if (!sk) {
		if (p.seg.family != AF_INET6)
			return;      /* IPv4: TCP's RSTs carry its control socket; this one is a REJECT's */
		struct rsttrace_event *e = new_event(RSTTRACE_RST_SENT, SLOT_RST_NO_SOCKET);
		if (!e)
			return;
		walk_stack_skip(ctx, e, RAW_TP_STACK_SKIP);
		if (!made_by_tcp_v6(e))
			return;
	}
	device_count(sk ? netns_of_sock(sk) : netns_of_skb(skb), TCP_DROPPED);
}
#endif /* ORIGIN_PACKETS */

/* skb:kfree_skb with reason NO_SOCKET (Linux 5.17+): a received RST that found no socket — the
 * connection is gone here (restart, a timeout, a crossing RST) while the peer still had it. TCP
 * never answers an RST, so nothing else shows it. */
static __always_inline void origin_freed(void *ctx, void *skb)
{
	struct segment seg = {};
	parse_segment(skb, 1, &seg);
	if (!seg.ok || !(seg.flags & TCPHDR_RST) || !family_wanted(seg.family) || !port_wanted(seg.dport, seg.sport))
		return;
	struct rsttrace_event *e = new_event(RSTTRACE_RST_RECEIVED, SLOT_RST_NO_SOCKET);
	if (!e)
		return;
	e->kernel_reason = ORIGIN_NO_SOCKET;
	fill_from_segment(e, &seg);
	e->tcp_flags = 0;
	e->netns = netns_of_skb(skb);
	fill_task(e);
	if (walk_stack_skip(ctx, e, RAW_TP_STACK_SKIP))
		e->flags |= RSTTRACE_F_SOFTIRQ;
	if (!pid_wanted(e))
		return;
#ifdef ORIGIN_PACKETS
	origin_of_received(e);
#endif
	emit(ctx, e);
}

#ifdef ORIGIN_FREE_HOOK
/* skb:kfree_skb (raw: skb, location, reason, ...) — see origin_freed(). */
RAW_TRACEPOINT_PROBE(kfree_skb)
{
	if ((__u32)ctx->args[2] == ORIGIN_NO_SOCKET)
		origin_freed(ctx, (void *)ctx->args[0]);
#ifdef ORIGIN_PACKETS
	else
		origin_dropped(ctx, (void *)ctx->args[0]);
#endif
	return 0;
}
#endif
#endif /* ORIGIN_NO_SOCKET */

#endif /* ORIGINS */
