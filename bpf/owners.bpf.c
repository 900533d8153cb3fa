/* owners.bpf.c — who called connect() on a client socket of a traced port, so that an RST the client
 * gets or sends in softirq names the process it hit (owner_tgid/owner_comm). Used by listen.bpf.c
 * (remember_connector) and rst.bpf.c (connector_of); uses maps.bpf.c and sock.bpf.c.
 *
 * Relies on sock:inet_sock_set_state (Linux 4.16+) firing in connect() itself, in the caller's
 * context (tcp_v4/v6_connect() set SYN_SENT). It cannot name the owner of a socket connected before
 * rsttrace started, nor of one whose slot a later connect() took.
 *
 *   CONNECT_OWNERS        sock:inet_sock_set_state is hooked (listen.bpf.c): this file is compiled in.
 */

#ifdef CONNECT_OWNERS
/* Client sockets on traced ports, with the process that called connect() on them (recorded at the
 * SYN_SENT state change, in process context: listen.bpf.c). An RST for a client arrives in softirq,
 * and the client usually closes the socket at once: user space would find no owner in /proc any more.
 * Direct-mapped by struct sock *: a connect() takes the slot its socket hashes to, replacing whatever
 * was there — no lock, no allocation (an LRU hash's update takes locks, at every connect() on the
 * host). Never deleted: an entry is trusted only for the socket, remote address and port it was made for. */
#define CONNECTOR_SLOTS 16384            /* a power of 2 */
struct connector {
	__u64 sk;               /* 0 while the slot is being written */
	__u64 raddr[2];
	__u16 rport;            /* host byte order */
	__u16 pad16;
	__u32 tgid;
	char comm[RSTTRACE_COMM_LEN];
	__u64 connect_ns;       /* when connect() was called: where a connection's story starts (story.bpf.c) */
};
BPF_ARRAY(connectors, struct connector, CONNECTOR_SLOTS);

static __always_inline struct connector *connector_slot(void *sk)
{
	/* Fibonacci hashing: slab objects sit a fixed stride apart, their low bits say little. */
	__u32 slot = (((__u64)sk >> 4) * 0x9E3779B97F4A7C15ULL) >> 50;
	_Static_assert(CONNECTOR_SLOTS == 1 << (64 - 50), "the shift takes log2(CONNECTOR_SLOTS) bits");
	return connectors.lookup(&slot);
}

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
#ifdef STORIES
	c->connect_ns = bpf_ktime_get_ns();
#endif
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

#ifdef STORIES
/* When this socket's connect() was called, if its slot still holds it (0 if not known). */
static __always_inline __u64 connect_time_of(void *sk, struct rsttrace_event *e)
{
	struct connector *c = connector_slot(sk);
	if (!c || c->sk != (__u64)sk || c->rport != e->rport)
		return 0;
	compiler_barrier();
	__u64 ns = c->connect_ns;
	compiler_barrier();
	return c->sk == (__u64)sk ? ns : 0;
}
#endif
#endif
