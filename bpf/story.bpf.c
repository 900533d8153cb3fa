/* story.bpf.c — what a drop did to its connection: per connection (4-tuple), the listener's drops,
 * both ends' retransmits, and how it ended, handed to user space as one RSTTRACE_CONNECTION record
 * (struct rsttrace_story) when it ends. Uses maps.bpf.c, sock.bpf.c and owners.bpf.c; emit()
 * (maps.bpf.c) starts and feeds stories from the listener events it counts (story_note).
 *
 * A story starts at a SYN or final ACK the listener dropped (or answered with RST:
 * tcp_abort_on_overflow), or at a client's SYN retransmit on a traced port, and ends at the first of:
 *   the client's SYN_SENT -> CLOSE      never established: timed out, refused, or given up (sk_err 0)
 *   the server child's SYN_RECV -> ESTABLISHED, or the client's SYN_SENT -> ESTABLISHED where the
 *                                       server is not on this host: established, late
 *   the client's ESTABLISHED -> any     reset (sk_err ECONNRESET), or closed while the server never
 *                                       had the connection (its final ACK dropped): client only
 * A story whose ends are both elsewhere or silent (a remote client that gave up) is ended by user
 * space, idle or at exit (tracer/enrich/stories.py).
 *
 *   sock:inet_sock_set_state  (4.16+) the ends: story_state_change(), called from listen.bpf.c's
 *                             program, or from this file's own where that file is not compiled
 *                             (STORY_STATE_HOOK: the kprobe/fentry backend).
 *   tcp:tcp_retransmit_skb    (4.15+; `state` 5.2+) SYN and data retransmits of a client socket.
 *   tcp:tcp_retransmit_synack (4.15+) the listener's SYN-ACK retransmits.
 * Keyed by addresses and ports alone, client first (not by netns): a client and a server in two
 * netns of this host, joined by veth without NAT, share one story. Two netns that both hold the same
 * 4-tuple at once share one too. Behind NAT the two ends are two stories.
 *
 * With --port it also counts the handshakes each traced listener completes (the connections that
 * got through, beside the stories of those that did not).
 *
 *   STORIES               compiled in (the plan's `stories`; off with --no-stories).
 *   STORY_STATE_HOOK      this file attaches sock:inet_sock_set_state itself.
 *   FILTER_PORTS          (maps.bpf.c) the handshakes are counted.
 */
#ifdef STORIES

#define TCP_ESTABLISHED 1
#define TCP_CLOSE 7
#define ECONNRESET 104

/* Half-open connections under a flood can outnumber this: a story that finds the map full is not
 * followed, and counted (RSTTRACE_STAT_STORIES_FULL). Preallocated: with BPF_F_NO_PREALLOC a story
 * lost its first drop during a burst in the 6.1 VM's kprobe programs (an insert refused, most likely
 * its per-CPU element cache empty before the refill ran); a preallocated map refuses only when full. */
#define STORY_SLOTS 65536
struct story_val {
	struct rsttrace_story story;
	__u64 last_ns;          /* the last thing that happened to it: user space ends idle stories */
};
BPF_HASH(stories, struct rsttrace_story_key, struct story_val, STORY_SLOTS);
/* Stories that ended lately, and when: a segment of such a connection that still meets the full
 * queue afterwards (the closed client's FIN or retransmitted data) belongs to the story already told,
 * and starts none — in the same listener's netns: the key has no netns, and another netns of this
 * host may use the same addresses and ports at once (loopback in each, the same ephemeral port
 * sequence: it is not per netns). Least recently used first out: forgetting one only lets such a
 * segment start an `open` story again. */
#define STORY_ENDED_SLOTS 8192
#define STORY_ENDED_NS (60ULL * 1000000000ULL)  /* a 4-tuple is not reused sooner (TIME_WAIT) */
struct story_ended {
	__u64 ns;               /* when it ended */
	__u32 server_netns;     /* its listener's netns (0: its server side was not seen) */
	__u32 pad;
};
BPF_F_TABLE("lru_hash", struct rsttrace_story_key, struct story_ended, stories_ended, STORY_ENDED_SLOTS, 0);

#ifdef FILTER_PORTS
/* Handshakes completed per listener (netns, port) of a traced port: the connections that got
 * through, beside the stories of those that did not (bpf/rsttrace.h has no record for them). Only
 * with --port: it costs a hash update per connection, which every connection of the host would pay. */
struct handshake_key {
	__u32 netns;
	__u16 port;
	__u16 pad;
};
BPF_HASH(handshakes, struct handshake_key, __u64, 4096);

static __always_inline void count_handshake(void *sk, __u16 port)
{
	if (!port_wanted(port, 0))
		return;
	struct handshake_key key = {};
	key.netns = netns_of_sock(sk);
	key.port = port;
	__u64 one = 1, *n = handshakes.lookup(&key);
	if (n)
		__sync_fetch_and_add(n, 1);
	else if (handshakes.insert(&key, &one) != 0 && (n = handshakes.lookup(&key)))
		__sync_fetch_and_add(n, 1);     /* another CPU made it meanwhile */
}
#endif

/* How many entries `stories` holds: the hooks of every connection on the host return at once while
 * it is 0. Slot 0, kept here like listener_count: +1 only for an insert that made an entry, -1 for a
 * delete that removed one. Slot 1: the stories user space took out of the map (idle, or at exit),
 * written by user space alone — so neither side's update can lose the other's. */
BPF_ARRAY(story_count, __s64, 2);

_Static_assert(sizeof(struct rsttrace_story) == sizeof(__u64) * (1 + RSTTRACE_CALLERS),
	       "a story travels in linger_jiffies and callers[]");

static __always_inline int have_stories(void)
{
	int zero = 0, one = 1;
	__s64 *made = story_count.lookup(&zero), *taken = story_count.lookup(&one);
	return made && taken && *made - *taken > 0;
}

static __always_inline void stories_changed(__s64 by)
{
	int zero = 0;
	__s64 *n = story_count.lookup(&zero);
	if (n)
		__sync_fetch_and_add(n, by);
}

static __always_inline void bump(__u16 *counter)
{
	if (*counter != 0xffff)
		*counter += 1;
}

/* A new story for `key`, or NULL where the map is full (counted). */
static __always_inline struct story_val *story_start(struct rsttrace_story_key *key, __u64 now)
{
	struct story_val fresh = {};
	fresh.story.start_ns = now;
	fresh.last_ns = now;
	int err = stories.insert(key, &fresh);
	if (err == 0)
		stories_changed(1);
	struct story_val *v = stories.lookup(key);
	if (!v)
		count(RSTTRACE_STAT_STORIES_FULL);
	return v;
}

/* emit() (maps.bpf.c) hands every listener event and RST here, after the netns filter. The
 * listener's side: local is the listener, remote the client. */
static __always_inline void story_note(struct rsttrace_event *e)
{
	/* A listener's answer to a final ACK its full accept queue refused (tcp_abort_on_overflow): on
	 * 6.10+ it comes before the drop itself (skb:kfree_skb), so it starts the story too. */
	int overflow_rst = e->kind == RSTTRACE_RST_SENT && e->state == TCP_LISTEN &&
			   (e->tcp_flags & (TCPHDR_SYN | TCPHDR_ACK)) == TCPHDR_ACK &&
			   (e->flags & RSTTRACE_F_QUEUES) && e->accept_qlen > e->accept_qmax;
	int starts = e->kind == RSTTRACE_SYN_DROPPED || e->kind == RSTTRACE_ACK_DROPPED || overflow_rst;
	if (!starts) {
		if (e->kind != RSTTRACE_SYN_COOKIE && e->kind != RSTTRACE_RST_SENT)
			return;
		if (e->kind == RSTTRACE_RST_SENT && e->state != TCP_LISTEN)
			return;
		if (!have_stories())
			return;
	}
	struct rsttrace_story_key key = {};
	__builtin_memcpy(key.caddr, e->raddr, 16);
	__builtin_memcpy(key.saddr, e->laddr, 16);
	key.cport = e->rport;
	key.sport = e->lport;
	key.family = e->family;
	struct story_val *v = stories.lookup(&key);
	if (!v) {
		if (!starts)
			return;
		struct story_ended *ended = stories_ended.lookup(&key);
		if (ended && e->ktime_ns - ended->ns < STORY_ENDED_NS &&
		    (!ended->server_netns || ended->server_netns == e->netns))
			return;     /* told already: a late segment of a connection whose story ended */
		v = story_start(&key, e->ktime_ns);
		if (!v)
			return;
	}
	v->story.flags |= RSTTRACE_STORY_F_SERVER_SEEN;
	v->story.server_netns = e->netns;
	if (e->owner_tgid)
		v->story.server_tgid = e->owner_tgid;
	if (e->kind == RSTTRACE_SYN_DROPPED)
		bump(&v->story.syn_drops);
	else if (e->kind == RSTTRACE_ACK_DROPPED)
		bump(&v->story.ack_drops);
	else if (e->kind == RSTTRACE_SYN_COOKIE)
		bump(&v->story.syn_cookies);
	else
		bump(&v->story.rsts);
	v->last_ns = e->ktime_ns;
}

/* The story key of a tracepoint's (s, d) addresses: the client is s where `client_is_source`. */
#define STORY_KEY_FROM_ARGS(key, args, client_is_source) do {                                    \
	(key).family = (args)->family;                                                               \
	const __u8 *c4 = (client_is_source) ? (args)->saddr : (args)->daddr;                         \
	const __u8 *s4 = (client_is_source) ? (args)->daddr : (args)->saddr;                         \
	const __u8 *c6 = (client_is_source) ? (args)->saddr_v6 : (args)->daddr_v6;                   \
	const __u8 *s6 = (client_is_source) ? (args)->daddr_v6 : (args)->saddr_v6;                   \
	if ((key).family == AF_INET) {                                                               \
		__builtin_memcpy((key).caddr, c4, 4);                                                \
		__builtin_memcpy((key).saddr, s4, 4);                                                \
	} else {                                                                                     \
		__builtin_memcpy((key).caddr, c6, 16);                                               \
		__builtin_memcpy((key).saddr, s6, 16);                                               \
	}                                                                                            \
	(key).cport = (client_is_source) ? (args)->sport : (args)->dport;                            \
	(key).sport = (client_is_source) ? (args)->dport : (args)->sport;                            \
} while (0)

/* tcp:tcp_retransmit_skb (4.15+, `state` 5.2+): a socket retransmits. In SYN_SENT it is a client
 * whose SYN went unanswered: that starts a story on a traced port (the server may be elsewhere);
 * in any other state it counts only for a story under way (a client whose final ACK was dropped). */
TRACEPOINT_PROBE(tcp, tcp_retransmit_skb)
{
	int syn = args->state == TCP_SYN_SENT;
	if (!syn && !have_stories())
		return 0;
	if (!family_wanted(args->family))
		return 0;
	struct rsttrace_story_key key = {};
	STORY_KEY_FROM_ARGS(key, args, 1);
	__u64 now = bpf_ktime_get_ns();
	struct story_val *v = stories.lookup(&key);
	if (!v && (!syn || !port_wanted(key.cport, key.sport)))
		return 0;
	/* A socket in a netns not watched is not this story's to tell (a client elsewhere, as a
	 * server host sees it). */
	__u32 netns = netns_of_sock((void *)args->skaddr);
	if (!netns_wanted(netns))
		return 0;
	if (!v) {
		v = story_start(&key, now);
		if (!v)
			return 0;
		v->story.client_netns = netns;
	}
	if (syn)
		bump(&v->story.syn_retrans);
	else
		bump(&v->story.data_retrans);
	v->last_ns = now;
	return 0;
}

/* tcp:tcp_retransmit_synack (4.15+): the listener resends a SYN-ACK (its request waits for a final
 * ACK: lost, or dropped at a full accept queue). Source is the server. */
TRACEPOINT_PROBE(tcp, tcp_retransmit_synack)
{
	if (!have_stories())
		return 0;
	struct rsttrace_story_key key = {};
	STORY_KEY_FROM_ARGS(key, args, 0);
	struct story_val *v = stories.lookup(&key);
	if (!v || !netns_wanted(netns_of_sock((void *)args->skaddr)))
		return 0;
	bump(&v->story.synack_retrans);
	v->last_ns = bpf_ktime_get_ns();
	return 0;
}

/* The story's end, as seen by socket `sk` (local side `by_client` or not), into an event. */
static __always_inline void story_end(struct bpf_raw_tracepoint_args *ctx, void *sk, struct rsttrace_story_key *key,
				      struct story_val *v, int oldstate, int newstate, int by_client, __u32 netns)
{
	struct rsttrace_story story = v->story;
	__s32 err = 0;
	bpf_probe_read_kernel(&err, sizeof(err), sk + OFF_SOCK_ERR);
	__u8 outcome;
	if (oldstate == TCP_SYN_SENT)
		outcome = newstate == TCP_ESTABLISHED ? RSTTRACE_OUTCOME_ESTABLISHED : RSTTRACE_OUTCOME_NEVER_ESTABLISHED;
	else if (oldstate == TCP_SYN_RECV)
		outcome = RSTTRACE_OUTCOME_ESTABLISHED;
	else
		outcome = err == ECONNRESET ? RSTTRACE_OUTCOME_RESET : RSTTRACE_OUTCOME_CLIENT_ONLY;
	story.old_state = oldstate;
	story.err = err;
	if (by_client) {
		story.flags |= RSTTRACE_STORY_F_BY_CLIENT;
		story.client_netns = netns;
	}
	if (stories.delete(key) == 0)
		stories_changed(-1);
	struct story_ended ended = {};
	ended.ns = bpf_ktime_get_ns();
	ended.server_netns = story.server_netns;
	stories_ended.update(key, &ended);

	struct rsttrace_event *e = new_event(RSTTRACE_CONNECTION, SLOT_STORY);
	if (!e)
		return;
	e->family = key->family;
	e->state = newstate;
	e->verdict = outcome;
	e->kernel_reason = RSTTRACE_NO_REASON;
	e->skaddr = (__u64)sk;
	e->netns = netns;
	e->flags |= RSTTRACE_F_HAVE_SOCKET;
	if (by_client) {
		__builtin_memcpy(e->laddr, key->caddr, 16);
		__builtin_memcpy(e->raddr, key->saddr, 16);
		e->lport = key->cport;
		e->rport = key->sport;
	} else {
		__builtin_memcpy(e->laddr, key->saddr, 16);
		__builtin_memcpy(e->raddr, key->caddr, 16);
		e->lport = key->sport;
		e->rport = key->cport;
	}
	fill_task(e);
	if (walk_stack(ctx, e))
		e->flags |= RSTTRACE_F_SOFTIRQ;
#ifdef CONNECT_OWNERS
	if (by_client) {
		connector_of(sk, e);
		__u64 connect_ns = connect_time_of(sk, e);
		if (connect_ns && connect_ns <= story.start_ns) {
			story.start_ns = connect_ns;
			story.flags |= RSTTRACE_STORY_F_CONNECT_SEEN;
		}
	}
#endif
	if (!by_client && story.server_tgid)
		e->owner_tgid = story.server_tgid;
	__builtin_memcpy(&e->linger_jiffies, &story, sizeof(story));
	emit(ctx, e);
}

/* Every state change of every socket on the host passes here (from the inet_sock_set_state
 * program): those that cannot end a story leave at once, the rest while no story exists. */
static __always_inline void story_state_change(struct bpf_raw_tracepoint_args *ctx, void *sk, int oldstate,
					       int newstate)
{
	int by_client;
	if (oldstate == TCP_SYN_SENT || oldstate == TCP_ESTABLISHED) {
		by_client = 1;
	} else if (oldstate == TCP_SYN_RECV && newstate == TCP_ESTABLISHED) {
		by_client = 0;      /* a server's child completes the handshake */
#ifdef FILTER_PORTS
		count_handshake(state_sk_number(ctx), STATE_SK_LOAD(u16, sk, OFF_SOCK_NUM));
#endif
	} else {
		return;
	}
	if (!have_stories())
		return;
	void *skn = state_sk_number(ctx);
	struct rsttrace_story_key key = {};
	key.family = STATE_SK_LOAD(u16, sk, OFF_SOCK_FAMILY);
	/* inet_sport, not skc_num: a socket going to CLOSE has given its port back (inet_put_port())
	 * before the tracepoint fires. Past struct sock, so a probe read even for a BTF tracepoint. */
	__u16 lport = 0;
	bpf_probe_read_kernel(&lport, sizeof(lport), skn + OFF_INET_SPORT);
	__u16 rport = STATE_SK_LOAD(u16, sk, OFF_SOCK_DPORT);
	lport = (lport >> 8) | (lport << 8);          /* both big-endian */
	rport = (rport >> 8) | (rport << 8);
	__u8 *local = by_client ? key.caddr : key.saddr, *remote = by_client ? key.saddr : key.caddr;
	if (key.family == AF_INET) {
		__u32 l = STATE_SK_LOAD(u32, sk, OFF_SOCK_RCV_SADDR), r = STATE_SK_LOAD(u32, sk, OFF_SOCK_DADDR);
		__builtin_memcpy(local, &l, 4);
		__builtin_memcpy(remote, &r, 4);
	} else if (key.family == AF_INET6) {
		bpf_probe_read_kernel(local, 16, skn + OFF_SOCK_V6_RCV_SADDR);
		bpf_probe_read_kernel(remote, 16, skn + OFF_SOCK_V6_DADDR);
	} else {
		return;
	}
	key.cport = by_client ? lport : rport;
	key.sport = by_client ? rport : lport;
	struct story_val *v = stories.lookup(&key);
	if (!v)
		return;
	__u32 netns = netns_of_sock(skn);
	if (!netns_wanted(netns))
		return;     /* an end in a netns not watched: the watched side ends it (or user space) */
	__u64 now = bpf_ktime_get_ns();
	if (by_client && oldstate == TCP_SYN_SENT && newstate == TCP_ESTABLISHED &&
	    (v->story.flags & RSTTRACE_STORY_F_SERVER_SEEN)) {
		/* The server is on this host too: the story goes on until its child is established, or the
		 * final ACK this client just sent is dropped at the full accept queue (client only). */
		v->story.flags |= RSTTRACE_STORY_F_CLIENT_UP;
		v->story.client_netns = netns;
		v->last_ns = now;
		return;
	}
	story_end(ctx, skn, &key, v, oldstate, newstate, by_client, netns);
}

#ifdef STORY_STATE_HOOK
/* sock:inet_sock_set_state, where listen.bpf.c (which calls story_state_change itself) is not
 * compiled: the function-hook backends. */
STATE_HOOK_PROBE(inet_sock_set_state)
{
	story_state_change(ctx, (void *)ctx->args[0], (int)ctx->args[1], (int)ctx->args[2]);
	return 0;
}
#endif
#endif /* STORIES */
