/* rsttrace.h — the one event record shared by every BPF hook and the Python decoder.
 *
 * This layout is the contract between kernel and user space: tracer/kernel/layout.py mirrors it
 * with ctypes, and tests/unit/test_record_layout.py compiles this header with the system C compiler
 * and checks every field's offset and size against the Python side. Change both or neither.
 *
 * Fields are grouped (this connection / the event's shape / this connection), each group ordered so
 * that the struct has no hidden padding, not even at its end.
 */
#ifndef RSTTRACE_H
#define RSTTRACE_H

#define RSTTRACE_COMM_LEN 16
#define RSTTRACE_CALLERS 4
#define RSTTRACE_NO_REASON 0xffffffffu   /* the hook gave no kernel reason */
#define RSTTRACE_UNKNOWN 0xffffffffu     /* a u32 the hook could not read */

/* What happened (rsttrace vocabulary, not a kernel enum). */
enum rsttrace_kind {
	RSTTRACE_RST_SENT = 1,
	RSTTRACE_RST_RECEIVED = 2,
	RSTTRACE_SYN_DROPPED = 3,   /* SYN dropped at tcp_conn_request: accept or SYN queue full */
	RSTTRACE_ACK_DROPPED = 4,   /* 3rd ACK dropped: accept queue full when the child is created */
	RSTTRACE_SYN_COOKIE = 5,    /* SYN queue full, answered with a SYN cookie */
	RSTTRACE_CONNECTION = 6,    /* a connection's story ended (bpf/story.bpf.c): struct rsttrace_story */
};

/* How a connection's story ended (RSTTRACE_CONNECTION's `verdict`). */
enum rsttrace_outcome {
	RSTTRACE_OUTCOME_ESTABLISHED = 1,       /* established on both ends, after the drops */
	RSTTRACE_OUTCOME_NEVER_ESTABLISHED = 2, /* SYN_SENT -> CLOSE: timed out, refused, or given up */
	RSTTRACE_OUTCOME_CLIENT_ONLY = 3,       /* connect() succeeded, the server never had the connection */
	RSTTRACE_OUTCOME_RESET = 4,             /* established on the client, then reset */
	RSTTRACE_OUTCOME_OPEN = 5,              /* still open when rsttrace stopped, or idle too long */
};

/* A listener's decision on a SYN or a final ACK: what the kernel counted for it (bpf/netstat.bpf.c), or
 * tcp_conn_request()'s tests replayed on the queue state it met (RSTTRACE_F_INFERRED). */
enum rsttrace_verdict {
	RSTTRACE_VERDICT_NONE = 0,
	RSTTRACE_VERDICT_ACCEPT_QUEUE_FULL = 1,  /* sk_acceptq_is_full(): ListenOverflows */
	RSTTRACE_VERDICT_SYN_QUEUE_FULL = 2,     /* request queue full, syncookies off: TCPReqQFullDrop */
	RSTTRACE_VERDICT_SYN_BACKLOG_RESERVE = 3,/* last quarter of tcp_max_syn_backlog kept for proven peers */
	RSTTRACE_VERDICT_SYN_COOKIE = 4,         /* request queue full (or syncookies=2): SyncookiesSent */
	RSTTRACE_VERDICT_LISTEN_DROP_OTHER = 5,  /* dropped, neither queue full: ListenDrops alone (no child
	                                          * made at the final ACK: memory, route) */
	RSTTRACE_VERDICT_RST_NOT_FROM_PEER = 6,  /* rst_received: its TTL differs from the peer's handshake
	                                          * (bpf/origin.bpf.c): sent from elsewhere on the path */
};

/* Which kernel function a kprobe/fentry program hooked, or which tracepoint saw a reset made outside TCP. fentry programs run from a trampoline
 * before the function's frame exists, so the stack does not show the function itself: this does. */
enum rsttrace_hook {
	RSTTRACE_HOOK_NONE = 0,
	RSTTRACE_HOOK_TCP_SEND_ACTIVE_RESET = 1,
	RSTTRACE_HOOK_TCP_V4_SEND_RESET = 2,
	RSTTRACE_HOOK_TCP_V6_SEND_RESET = 3,
	RSTTRACE_HOOK_TCP_CONN_REQUEST = 4,
	RSTTRACE_HOOK_TCP_V4_SYN_RECV_SOCK = 5,
	RSTTRACE_HOOK_TCP_V6_SYN_RECV_SOCK = 6,
	/* Tracepoints that see resets TCP did not make (bpf/origin.bpf.c) */
	RSTTRACE_HOOK_NET_DEV_QUEUE = 7,        /* an RST leaving a device, made outside TCP */
	RSTTRACE_HOOK_ICMP_SEND = 8,            /* an ICMP unreachable answering a TCP segment (kernel_reason: code) */
};

/* A connection's story (bpf/story.bpf.c), carried by an RSTTRACE_CONNECTION record in the bytes of
 * linger_jiffies and callers[], which such a record does not use (same size, checked there). The
 * event's own fields are the socket that ended the story: its addresses, netns, state and task. */
struct rsttrace_story {
	__u64 start_ns;         /* connect() where it was seen (STORY_F_CONNECT_SEEN), else the first drop */
	__u16 syn_drops;        /* SYNs the listener dropped */
	__u16 syn_cookies;      /* SYNs answered with a cookie */
	__u16 ack_drops;        /* final ACKs (or first data) dropped at a full accept queue */
	__u16 syn_retrans;      /* the client's SYN retransmits */
	__u16 synack_retrans;   /* the server's SYN-ACK retransmits */
	__u16 data_retrans;     /* the client's retransmits once it thought itself connected */
	__u16 rsts;             /* RSTs the listener answered final ACKs with (tcp_abort_on_overflow) */
	__u8 old_state;         /* the state the ending socket left */
	__u8 flags;             /* RSTTRACE_STORY_F_* */
	__u32 server_netns;     /* netns inode of the listener, 0 where no listener event was seen */
	__u32 server_tgid;      /* the listener's owner (its listen() caller), 0 if unknown */
	__s32 err;              /* the ending socket's sk_err: the errno the application sees */
	__u32 client_netns;     /* netns inode of the client socket, 0 where it is not on this host */
};
/* Key of a story in bpf/story.bpf.c's map `stories`, which user space reads too (idle, exit):
 * the connection's addresses and ports, client first. */
struct rsttrace_story_key {
	__u8 caddr[16];         /* the client's address (IPv4 in the first 4 bytes) */
	__u8 saddr[16];         /* the server's */
	__u16 cport;            /* host byte order */
	__u16 sport;
	__u16 family;
	__u16 pad;
};
#define RSTTRACE_STORY_F_CONNECT_SEEN  0x01  /* start_ns is when connect() was called */
#define RSTTRACE_STORY_F_SERVER_SEEN   0x02  /* the listener's side was seen (drops, resets) */
#define RSTTRACE_STORY_F_CLIENT_UP     0x04  /* the client reached ESTABLISHED */
#define RSTTRACE_STORY_F_BY_CLIENT     0x08  /* the client's socket ended the story (else the server's) */

/* Bits of rsttrace_event.flags. */
#define RSTTRACE_F_SOFTIRQ      0x01  /* ran in softirq: the task on the CPU is not the culprit */
#define RSTTRACE_F_HAVE_SOCKET  0x02  /* the hook had a socket (skaddr != 0) */
#define RSTTRACE_F_LINGER       0x04  /* SO_LINGER was set on the socket */
#define RSTTRACE_F_FULLSOCK     0x08  /* a full socket: unread_bytes/linger fields are meaningful */
#define RSTTRACE_F_QUEUES       0x10  /* the queue fields below were read */
#define RSTTRACE_F_INFERRED     0x20  /* inferred: rsttrace replayed the kernel's test on the state it read */
#define RSTTRACE_F_ORPHAN       0x40  /* a full socket with no struct socket: never accept()ed, or closed */
#define RSTTRACE_F_UNREAD       0x80  /* unread_bytes > 0 */

struct rsttrace_event {
	/* This connection, at this moment. */
	__u64 ktime_ns;         /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u64 skaddr;           /* kernel socket address, identity only (0: no socket) */
	__u64 sock_cookie;      /* socket cookie where the hook gives one, else 0 */
	__u64 sock_ino;         /* inode of the owning struct socket (0: orphaned / none) */
	/* The event's shape, from linger_jiffies to owner_comm: what happened, where in the kernel, who
	 * — the same bytes for every event of a storm (tracer/fastpath.py keys its templates on them). */
	__u64 linger_jiffies;   /* sk_lingertime when RSTTRACE_F_LINGER */
	__u64 callers[RSTTRACE_CALLERS]; /* innermost kernel frames, for evidence */
	__u32 kind;             /* enum rsttrace_kind */
	__u32 kernel_reason;    /* raw kernel enum value (sk_rst_reason / skb_drop_reason) or RSTTRACE_NO_REASON */
	__u32 tgid;             /* task on the CPU (meaningful only without RSTTRACE_F_SOFTIRQ) */
	__u32 uid;
	__u32 netns;            /* network namespace inode */
	__s32 state;            /* TCP state of the socket, 0 if none */
	__u32 owner_tgid;       /* listener events: the process that called listen(); RSTs on a client
	                         * socket: the process that called connect() (0: not seen) */
	__u32 app_errors;       /* RSTs: failed syscalls of the process in the window before it (bpf/app.bpf.c),
	                         * which user space reads from the kernel's map; 0: none, or not kept */
	__u16 family;           /* AF_INET / AF_INET6 */
	__u8 flags;             /* RSTTRACE_F_* */
	__u8 tcp_flags;         /* flags of the segment a reply RST answered / a drop concerned (0: none) */
	__u8 verdict;           /* enum rsttrace_verdict: what the listener decided for a SYN */
	__u8 hook;              /* enum rsttrace_hook: the kernel function hooked (function hooks only) */
	__u8 syncookies;        /* net.ipv4.tcp_syncookies of that netns */
	__u8 abort_on_overflow; /* net.ipv4.tcp_abort_on_overflow of that netns */
	char comm[RSTTRACE_COMM_LEN];
	char owner_comm[RSTTRACE_COMM_LEN]; /* comm of owner_tgid, when it called listen()/connect() */
	/* This connection again: bytes, queues, endpoints. */
	__u32 unread_bytes;     /* rcv_nxt - copied_seq: received, never read by the application */
	__u32 accept_qlen;      /* listener sk_ack_backlog (RSTTRACE_F_QUEUES) */
	__u32 accept_qmax;      /* listener sk_max_ack_backlog */
	__u32 syn_qlen;         /* listener request-queue (SYN queue) length */
	__u32 somaxconn;        /* net.core.somaxconn of the listener's netns (RSTTRACE_F_QUEUES) */
	__u32 max_syn_backlog;  /* net.ipv4.tcp_max_syn_backlog of that netns */
	__s32 listen_backlog;   /* the backlog argument given to listen(), -1 if not seen */
	__u16 lport;            /* host byte order */
	__u16 rport;
	__u8 laddr[16];         /* IPv4 in the first 4 bytes */
	__u8 raddr[16];
};

/* Key of the exact per-CPU counts map: enough of the event for user space to name the reason
 * (tracer/enrich/reasons.py classify()) without the record itself. */
#define RSTTRACE_COUNT_KEYS 16384
struct rsttrace_count_key {
	__u32 kind;
	__u32 kernel_reason;
	__u16 service_port;     /* the service's port, never an ephemeral one where a socket tells
	                         * (maps.bpf.c service_port()) — bounds the keys */
	__u8 tcp_flags;
	__u8 flags;             /* RSTTRACE_F_LINGER | _INFERRED | _ORPHAN | _HAVE_SOCKET | _UNREAD */
	__u8 linger_zero;
	__u8 verdict;           /* enum rsttrace_verdict */
	__u8 queue_full;        /* listener accept queue over its limit (accept_qlen > accept_qmax) */
	__u8 state;             /* TCP state */
	__u64 callers[2];       /* innermost two frames when the kernel gave no reason: user space
	                         * infers the reason from them (tracer/enrich/reasons.py) */
	__u8 hook;              /* enum rsttrace_hook: the function hooked, or who made the reset */
	__u8 pad[3];
	__u32 netns;            /* netns inode: per-(netns, port) counts for metrics */
};

/* Per-CPU statistics slots (BPF_PERCPU_ARRAY stats). */
enum rsttrace_stat {
	RSTTRACE_STAT_SUBMITTED = 0,  /* records put into the ring buffer */
	RSTTRACE_STAT_LOST = 1,       /* records that found the ring buffer full */
	RSTTRACE_STAT_UNCOUNTED = 2,  /* events that found the counts map full (exact counts incomplete) */
	RSTTRACE_STAT_AGGREGATED = 3, /* events counted per shape during a storm instead of written */
	RSTTRACE_STAT_STORM_FULL = 4, /* storm events that found the shapes map full (written one by one) */
	RSTTRACE_STAT_STORIES_FULL = 5, /* connections not followed: the stories map was full */
	RSTTRACE_STAT_APP_PATHS_UNREAD = 6, /* failed syscalls whose path could not be read (bpf/app.bpf.c) */
	RSTTRACE_STAT_MAX = 7,
};

#endif
