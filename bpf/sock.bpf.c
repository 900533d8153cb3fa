/* sock.bpf.c — reads of the kernel's objects: a socket's netns, owner and state, a received skb's
 * netns and TCP/IP headers, a listener's queues and the netns sysctls that govern them, and the
 * listeners rsttrace knows (map `listeners`). Uses maps.bpf.c.
 *
 * No kernel headers: every field is read at an offset from the running kernel's BTF (OFF_* macros,
 * tracer/kernel/offsets.py) with bpf_probe_read_kernel() (Linux 5.5+), so one source fits any kernel
 * whose BTF names the field. It cannot tell the owner, unread bytes or linger of a request or
 * TIME_WAIT minisock (smaller structs without those fields), and does not follow IPv6 extension
 * headers.
 *
 *   OFF_*                 struct member offsets from the running kernel's BTF.
 *   SKB_SPAN_LO/LEN       one read covers skb->head and the header offsets, where they sit close.
 *   STATE_HOOK_BTF        sock:inet_sock_set_state is hooked as a BTF tracepoint (tp_btf, Linux 5.5+),
 *                         not a raw one: its reads of the socket are plain loads (STATE_SK_LOAD).
 *   NETSTAT_PERCPU        netstat.bpf.c is in: it watches a netns while it has a listener on a traced port.
 */

/* Network namespaces */

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

static __always_inline void *net_of_sock(void *sk)
{
	void *net = 0;
	bpf_probe_read_kernel(&net, sizeof(net), sk + OFF_SOCK_NET);
	return net;
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

/* Received segments */

/* skb->head, ->network_header and ->transport_header: one read where they sit within 32 bytes of
 * each other (the loader defines SKB_SPAN_LO/LEN then), else three. These
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

/* The family and addresses of an IPv4 (version 4) or IPv6 header read into `ip`. */
static __always_inline void ip_addresses(const __u8 *ip, __u8 version, struct segment *seg)
{
	if (version == 4) {
		seg->family = AF_INET;
		__builtin_memcpy(seg->saddr, ip + 12, 4);
		__builtin_memcpy(seg->daddr, ip + 16, 4);
	} else {
		seg->family = AF_INET6;
		__builtin_memcpy(seg->saddr, ip + 8, 16);
		__builtin_memcpy(seg->daddr, ip + 24, 16);
	}
}

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
	ip_addresses(pkt, version, seg);
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

/* Sockets */

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

/* inet_sock_set_state's program (listen.bpf.c) runs at every state change of every socket on the
 * host, and on its way out for a port nobody traces it reads one field. As a BTF tracepoint
 * (STATE_HOOK_BTF: tp_btf, Linux 5.5+, loaded by tracer/kernel/loader.py) the verifier knows the
 * argument is a struct sock and checks a plain load against BTF once, at load time (a bad address at
 * run time reads as 0). As a raw tracepoint the read must be a bpf_probe_read_kernel() call, which
 * costs far more than a load: most of what rsttrace adds to an untraced connection.
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

/* Listeners */

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
