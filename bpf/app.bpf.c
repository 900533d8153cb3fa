/* app.bpf.c — the application's side: the system calls that failed in a process shortly before it
 * reset a connection (an nginx worker whose open() of its proxy temp file failed with EACCES, then
 * closed its upstream with the response unread), and how each traced listener's owner accepts (when
 * it last called accept(), how many it accepted, how its accept() calls failed) beside how fast
 * connections arrive. Uses maps.bpf.c and sock.bpf.c; emit() (maps.bpf.c) asks app_errors_of() how
 * many failures an RST's process had lately, so user space reads them (tracer/enrich/app.py).
 *
 *   raw_syscalls:sys_exit    (CONFIG_FTRACE_SYSCALLS) one program for every syscall's exit, as a BTF
 *                            tracepoint (APP_HOOK_BTF: tp_btf, 5.5+; its reads of the saved registers
 *                            are plain loads) or a raw one. Not the per-syscall syscalls:sys_exit_*
 *                            tracepoints: those are classic tracepoints, whose programs share one
 *                            per-CPU guard with every kprobe and classic tracepoint program — a
 *                            softirq's RST hook that fired while one ran would be skipped. A raw
 *                            tracepoint's program has a guard of its own. There is no program at
 *                            syscall entry: the arguments are read at exit from the registers the
 *                            syscall saved (x86-64: the return value goes to ax, the rest stay).
 * Attaching any syscall tracepoint sends every syscall of every task through the kernel's slower
 * tracing entry: the price of this file is paid by the whole host (scripts/bench/syscalls). io_uring's
 * accept and openat never pass through these syscalls: a blind spot.
 *
 * Paths stay in the kernel map, for the tasks the filters let through (FILTER_PID, FILTER_COMM,
 * FILTER_CGROUP, FILTER_NETNS), until an event of that task takes them; nothing but the path string
 * is read from user memory.
 *
 *   APP_ERRORS               compiled in (--app-errors).
 *   APP_HOOK_BTF             raw_syscalls:sys_exit as a BTF tracepoint.
 *   APP_WINDOW_NS            how long before an event a failure still explains it (--app-errors-window).
 *   APP_SYS_<name>=<id>      a syscall kept; <id> is its place in tracer/kernel/hooks.py APP_SYSCALLS.
 *   NR_<name>                its number on this machine.
 *   OFF_PT_REGS_SYSCALL_NR/ARG1/ARG2  where the saved registers keep the syscall number, 1st and 2nd
 *                            argument (tracer/kernel/offsets.py, shared with listen.bpf.c).
 *   FILTER_COMM              only tasks whose comm is in map `comm_filter`.
 *   FILTER_CGROUP=N          only tasks in (or below) one of the N cgroups of map `cgroup_filter`.
 */
#ifdef APP_ERRORS

#define EINTR 4
#define EAGAIN 11
#define ENOMEM 12
#define ENFILE 23
#define EMFILE 24
#define ENOBUFS 105
#define EINPROGRESS 115
#define ERESTARTSYS 512          /* ..516 (ERESTART_RESTARTBLOCK): seen at sys_exit, before signal */
#define ERESTART_LAST 516        /* handling turns them into EINTR or a restart */
#define RLIMIT_NOFILE 7

/* How a syscall's failure is told: which argument is kept. */
#define APP_ARG_NONE 0
#define APP_ARG_PATH0 1          /* the 1st argument is a path (open, creat, mkdir, rename, unlink) */
#define APP_ARG_PATH1 2          /* the 2nd (the *at variants: a directory fd first) */
#define APP_ARG_FD0 3            /* the 1st argument is a file descriptor */

/* The last failures per process (thread group), newest at next-1. A process that fails often keeps
 * only its last APP_SLOTS: older ones are overwritten, which is what a window of seconds wants. */
#define APP_SLOTS 8              /* a power of 2 */
#define APP_PATH_LEN 128
#define APP_F_PATH_UNREAD 0x1    /* the path could not be read from user memory */
struct app_failure {
	__u64 ns;               /* bpf_ktime_get_ns() at the syscall's exit; 0 while being written */
	__u32 tid;
	__s32 fd;               /* the fd argument (APP_ARG_FD0), else -1 */
	__u16 call;             /* APP_SYS_* id: tracer/kernel/hooks.py APP_SYSCALLS */
	__u16 err;              /* errno */
	__u16 path_len;         /* bytes of path read, with its NUL (0: none) */
	__u16 flags;            /* APP_F_* */
	char path[APP_PATH_LEN];
};
struct app_failures {
	__u32 next;             /* slots written, ever: the newest is at (next - 1) % APP_SLOTS */
	__u32 pad;
	struct app_failure f[APP_SLOTS];
};
/* Least recently used first out: a host with more failing processes than this keeps the latest. */
#define APP_TASKS 2048
BPF_F_TABLE("lru_hash", __u32, struct app_failures, app_failures, APP_TASKS, 0);
/* A zeroed value to insert from: it does not fit the 512-byte stack. Never written. */
BPF_PERCPU_ARRAY(app_zero, struct app_failures, 1);

#ifdef FILTER_CGROUP
BPF_CGROUP_ARRAY(cgroup_filter, 8);
#endif

#ifdef FILTER_COMM
struct comm_key {
	char comm[RSTTRACE_COMM_LEN];
};
BPF_HASH(comm_filter, struct comm_key, __u8, 64);
#endif

/* Per traced listener (netns, port): its owner's accept() calls and the SYNs that reached it. Per
 * listening port, not per process: the workers that share a listener, and a SO_REUSEPORT group's
 * sockets, are one listener to the clients. Per CPU: the SYNs (softirq) and the accepts (workers) of
 * a busy listener come on every CPU at once, and one shared entry would bounce between their caches;
 * user space adds the CPUs' counts and takes the latest of their times (tracer/enrich/app.py). */
struct listen_key {
	__u32 netns;
	__u16 port;
	__u16 pad;
};
struct listen_activity {
	__u64 last_call_ns;     /* the last accept()/accept4() on it, whatever it returned */
	__u64 calls;
	__u64 accepted;
	__u64 first_accept_ns;
	__u64 last_accept_ns;
	__u64 syns;             /* SYNs that reached it (retransmits too) */
	__u64 first_syn_ns;
	__u64 last_syn_ns;
	__u64 failed;           /* accept() failures but EAGAIN, EINTR and restarts */
	__u64 last_fail_ns;
	__u64 emfile;           /* of those: EMFILE (the process's fd limit) */
	__u64 enfile;           /* ENFILE (the host's, fs.file-max) */
	__u64 enomem;           /* ENOMEM or ENOBUFS */
	__u64 nofile;           /* RLIMIT_NOFILE of the process at its last EMFILE */
	__u64 open_fds;         /* fds it had open then (0: more than OPEN_FDS_WORDS * 64 fds to count) */
	__s32 last_err;         /* errno of the last failure */
	__u32 tgid;             /* the last caller */
	char comm[RSTTRACE_COMM_LEN];
};
#define LISTEN_ACTIVITY_SLOTS 4096
BPF_PERCPU_HASH(listen_activity, struct listen_key, struct listen_activity, LISTEN_ACTIVITY_SLOTS);

/* The entry of a listener in a netns the filters let through, made if new; NULL otherwise. */
static __always_inline struct listen_activity *activity_of(struct listen_key *key)
{
	if (!netns_wanted(key->netns))
		return 0;
	struct listen_activity *a = listen_activity.lookup(key);
	if (a)
		return a;
	struct listen_activity fresh = {};
	listen_activity.insert(key, &fresh);        /* fails only if another CPU made it, or the map is full */
	return listen_activity.lookup(key);
}

/* A SYN reached a traced listener (listen.bpf.c's SYN hooks, kprobe.bpf.c's tcp_conn_request). */
static __always_inline void app_note_syn(__u32 netns, __u16 port)
{
	struct listen_key key = {};
	key.netns = netns;
	key.port = port;
	struct listen_activity *a = activity_of(&key);
	if (!a)
		return;
	__u64 now = bpf_ktime_get_ns();
	a->syns += 1;
	if (!a->first_syn_ns)
		a->first_syn_ns = now;
	a->last_syn_ns = now;
}

static __always_inline int benign_errno(long err)
{
	/* Normal operation, not failures: an event loop's accept() with nothing queued, every
	 * nonblocking connect(), a signal, and the restarts the signal code rewrites. */
	return err == EAGAIN || err == EINPROGRESS || err == EINTR || (err >= ERESTARTSYS && err <= ERESTART_LAST);
}

/* A saved register of the exiting syscall (`regs`: the tracepoint's struct pt_regs). Inline asm for
 * the BTF tracepoint, because bcc rewrites a plain dereference into a probe read. */
#ifdef APP_HOOK_BTF
#define APP_HOOK_PROBE int tp_btf__sys_exit(struct bpf_raw_tracepoint_args *ctx)
#define REGS_LOAD(regs, off) ({ __u64 v_; \
	asm volatile("%0 = *(u64 *)(%1 + %2)" : "=r"(v_) : "r"(regs), "i"(off)); v_; })
#else
#define APP_HOOK_PROBE RAW_TRACEPOINT_PROBE(sys_exit)
#define REGS_LOAD(regs, off) ({ __u64 v_ = 0; \
	bpf_probe_read_kernel(&v_, sizeof(v_), (void *)(regs) + (off)); v_; })
#endif

/* Whether the filters let this task's failures be kept. */
static __always_inline int task_wanted(__u32 tgid)
{
#ifdef FILTER_PID
	if (tgid != FILTER_PID)
		return 0;
#endif
#ifdef FILTER_COMM
	struct comm_key comm = {};
	bpf_get_current_comm(comm.comm, sizeof(comm.comm));
	if (!comm_filter.lookup(&comm))
		return 0;
#endif
#ifdef FILTER_CGROUP
	int in_cgroup = 0;
#pragma unroll
	for (int i = 0; i < FILTER_CGROUP; i++)
		if (cgroup_filter.check_current_task(i) == 1)
			in_cgroup = 1;
	if (!in_cgroup)
		return 0;
#endif
#ifdef FILTER_NETNS
	void *task = (void *)bpf_get_current_task();
	void *nsproxy = 0, *net = 0;
	bpf_probe_read_kernel(&nsproxy, sizeof(nsproxy), task + OFF_TASK_NSPROXY);
	if (nsproxy)
		bpf_probe_read_kernel(&net, sizeof(net), nsproxy + OFF_NSPROXY_NET_NS);
	if (!netns_wanted(netns_of_net(net)))
		return 0;
#endif
	return 1;
}

/* The task's fd table (current->files->fdt), and how many slots it has; NULL if it has none. */
static __always_inline void *fdtable_of(void *task, __u32 *max_fds)
{
	void *files = 0, *fdt = 0;
	bpf_probe_read_kernel(&files, sizeof(files), task + OFF_TASK_FILES);
	if (!files)
		return 0;
	bpf_probe_read_kernel(&fdt, sizeof(fdt), files + OFF_FILES_FDT);
	if (fdt)
		bpf_probe_read_kernel(max_fds, sizeof(*max_fds), fdt + OFF_FDTABLE_MAX_FDS);
	return fdt;
}

/* The listening TCP socket behind file descriptor `fd` of the current task, or NULL:
 * fdt->fd[fd]->private_data is a struct socket whose ->file points back. */
static __always_inline void *listener_of_fd(__u64 fd)
{
	void **fds = 0, *file = 0, *sock = 0, *back = 0, *sk = 0;
	__u32 max_fds = 0;
	void *fdt = fdtable_of((void *)bpf_get_current_task(), &max_fds);
	if (!fdt || fd >= max_fds)
		return 0;
	bpf_probe_read_kernel(&fds, sizeof(fds), fdt + OFF_FDTABLE_FD);
	if (!fds)
		return 0;
	bpf_probe_read_kernel(&file, sizeof(file), (void *)(fds + fd));
	if (!file)
		return 0;
	bpf_probe_read_kernel(&sock, sizeof(sock), file + OFF_FILE_PRIVATE_DATA);
	if (!sock)
		return 0;
	bpf_probe_read_kernel(&back, sizeof(back), sock + OFF_SOCKET_FILE);
	if (back != file)
		return 0;               /* not a socket's file */
	bpf_probe_read_kernel(&sk, sizeof(sk), sock + OFF_SOCKET_SK);
	if (!sk)
		return 0;
	__u8 state = 0;
	__u16 protocol = 0;
	bpf_probe_read_kernel(&state, sizeof(state), sk + OFF_SOCK_STATE);
	bpf_probe_read_kernel(&protocol, sizeof(protocol), sk + OFF_SOCK_PROTOCOL);
	return state == TCP_LISTEN && protocol == IPPROTO_TCP ? sk : 0;
}

/* The key of the listener behind the syscall's 1st argument (a file descriptor), if it is a TCP
 * listener on a traced port: 1, else 0. */
static __always_inline int traced_listener(void *regs, struct listen_key *key)
{
	void *sk = listener_of_fd(REGS_LOAD(regs, OFF_PT_REGS_ARG1));
	if (!sk)
		return 0;
	bpf_probe_read_kernel(&key->port, sizeof(key->port), sk + OFF_SOCK_NUM);
	if (!port_wanted(key->port, 0))
		return 0;
	key->netns = netns_of_sock(sk);
	return 1;
}

/* How many fds `task` has open: the bits of its fd table's open_fds bitmap, counted where the table
 * has at most OPEN_FDS_WORDS * 64 slots (0 above: not counted). Only at an EMFILE, when user space
 * reading /proc later could find the process changed or gone. */
#define OPEN_FDS_WORDS 256
static __always_inline __u64 popcount64(__u64 x)
{
	x = x - ((x >> 1) & 0x5555555555555555ULL);
	x = (x & 0x3333333333333333ULL) + ((x >> 2) & 0x3333333333333333ULL);
	x = (x + (x >> 4)) & 0x0f0f0f0f0f0f0f0fULL;
	return (x * 0x0101010101010101ULL) >> 56;
}

static __always_inline __u64 open_fds_of(void *task)
{
	__u64 *bits = 0;
	__u32 max_fds = 0;
	void *fdt = fdtable_of(task, &max_fds);
	if (!fdt)
		return 0;
	bpf_probe_read_kernel(&bits, sizeof(bits), fdt + OFF_FDTABLE_OPEN_FDS);
	__u32 words = max_fds / 64;
	if (!bits || words > OPEN_FDS_WORDS)
		return 0;
	__u64 n = 0;
#pragma clang loop unroll(disable)
	for (__u32 i = 0; i < OPEN_FDS_WORDS; i++) {
		if (i >= words)
			break;
		__u64 word = 0;
		bpf_probe_read_kernel(&word, sizeof(word), bits + i);
		n += popcount64(word);
	}
	return n;
}

/* accept()/accept4() returned `ret` on the listener its 1st argument names. Counted whatever it
 * returned: an event loop's EAGAIN is a call too (the owner is accepting). */
static __always_inline void app_accept(void *regs, long ret, __u64 pid_tgid)
{
	struct listen_key key = {};
	if (!traced_listener(regs, &key))
		return;
	struct listen_activity *a = activity_of(&key);
	if (!a)
		return;
	__u64 now = bpf_ktime_get_ns();
	a->last_call_ns = now;
	a->calls += 1;
	if (a->tgid != pid_tgid >> 32) {
		a->tgid = pid_tgid >> 32;
		bpf_get_current_comm(a->comm, sizeof(a->comm));
	}
	if (ret >= 0) {
		a->accepted += 1;
		if (!a->first_accept_ns)
			a->first_accept_ns = now;
		a->last_accept_ns = now;
		return;
	}
	if (benign_errno(-ret))
		return;
	a->failed += 1;
	a->last_fail_ns = now;
	a->last_err = -ret;
	if (-ret == ENFILE)
		a->enfile += 1;
	else if (-ret == ENOMEM || -ret == ENOBUFS)
		a->enomem += 1;
	if (-ret == EMFILE) {
		a->emfile += 1;
		/* current->signal->rlim[RLIMIT_NOFILE].rlim_cur: the limit the process hit */
		void *task = (void *)bpf_get_current_task(), *signal = 0;
		bpf_probe_read_kernel(&signal, sizeof(signal), task + OFF_TASK_SIGNAL);
		if (signal)
			bpf_probe_read_kernel(&a->nofile, sizeof(a->nofile), signal + OFF_SIGNAL_RLIM + RLIMIT_NOFILE * 16);
		a->open_fds = open_fds_of(task);
	}
}

/* listen() succeeded: a new listener starts with no history (a server restarted on the same port
 * must not inherit its predecessor's accept() calls). */
static __always_inline void app_listen(void *regs)
{
	struct listen_key key = {};
	if (traced_listener(regs, &key))
		listen_activity.delete(&key);
}

#define APP_PLAIN 0
#define APP_ACCEPT 1             /* accept(), accept4(): counted whatever they return */
#define APP_LISTEN 2             /* listen(): a new listener's history starts */

/* A syscall of `call` (APP_SYS_* id, argument kind `arg`, APP_PLAIN/ACCEPT/LISTEN `what`) returned `ret`. */
static __always_inline int app_exit(void *regs, long ret, __u16 call, int arg, int what)
{
	if (ret >= 0 && what != APP_ACCEPT) {
		if (what == APP_LISTEN)
			app_listen(regs);
		return 0;               /* the common case: one compare */
	}
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tgid = pid_tgid >> 32;
	if (!task_wanted(tgid))
		return 0;
	if (what == APP_ACCEPT)
		app_accept(regs, ret, pid_tgid);
	if (ret >= 0 || benign_errno(-ret))
		return 0;
	struct app_failures *v = app_failures.lookup(&tgid);
	if (!v) {
		int zero = 0;
		struct app_failures *fresh = app_zero.lookup(&zero);
		if (!fresh)
			return 0;
		app_failures.update(&tgid, fresh);
		v = app_failures.lookup(&tgid);
		if (!v)
			return 0;
	}
	/* Not atomic (a fetching add needs a newer BPF instruction set than bcc asks for): two threads of
	 * one process failing at the same moment may share a slot, and one of the two is kept. */
	__u32 slot = v->next & (APP_SLOTS - 1);
	v->next += 1;
	struct app_failure *f = &v->f[slot];
	f->ns = 0;              /* a reader on another CPU skips it until it is whole */
	compiler_barrier();
	f->tid = (__u32)pid_tgid;
	f->call = call;
	f->err = -ret;
	f->fd = -1;
	f->flags = 0;
	f->path_len = 0;
	if (arg == APP_ARG_FD0) {
		f->fd = (__s32)REGS_LOAD(regs, OFF_PT_REGS_ARG1);
	} else if (arg == APP_ARG_PATH0 || arg == APP_ARG_PATH1) {
		/* The pointer the syscall was given, still in the saved registers; its string was just
		 * read by the kernel, so its page is there. */
		__u64 ptr = arg == APP_ARG_PATH0 ? REGS_LOAD(regs, OFF_PT_REGS_ARG1) : REGS_LOAD(regs, OFF_PT_REGS_ARG2);
		long n = bpf_probe_read_user_str(f->path, sizeof(f->path), (void *)ptr);
		if (n > 0) {
			f->path_len = n;
		} else {
			f->flags = APP_F_PATH_UNREAD;
			count(RSTTRACE_STAT_APP_PATHS_UNREAD);
		}
	}
	compiler_barrier();
	f->ns = bpf_ktime_get_ns();
	return 0;
}

/* emit() (maps.bpf.c): how many failures the RST's process had in the window before it — its task
 * in process context, else the process the kernel saw connect() the socket (owner_tgid). User space
 * reads them from the map for the events that have some. */
static __always_inline void app_errors_of(struct rsttrace_event *e)
{
	if (e->kind != RSTTRACE_RST_SENT && e->kind != RSTTRACE_RST_RECEIVED)
		return;
	__u32 tgid = e->flags & RSTTRACE_F_SOFTIRQ ? e->owner_tgid : e->tgid;
	if (!tgid)
		return;
	struct app_failures *v = app_failures.lookup(&tgid);
	if (!v)
		return;
	__u32 n = 0;
#pragma unroll
	for (int i = 0; i < APP_SLOTS; i++) {
		__u64 ns = v->f[i].ns;
		if (ns && ns <= e->ktime_ns && e->ktime_ns - ns <= APP_WINDOW_NS)
			n++;
	}
	e->app_errors = n;
}

/* Every syscall's exit (raw_syscalls:sys_exit: struct pt_regs *regs, long ret): the chosen ones go
 * to app_exit() with their id and argument kind as constants; any other returns after one load. */
#define APP_CASE(name, arg, what) \
	case NR_##name: return app_exit(regs, ret, APP_SYS_##name, arg, what);

APP_HOOK_PROBE
{
	void *regs = (void *)ctx->args[0];
	long ret = ctx->args[1];
	switch (REGS_LOAD(regs, OFF_PT_REGS_SYSCALL_NR)) {
#ifdef APP_SYS_open
	APP_CASE(open, APP_ARG_PATH0, APP_PLAIN)
#endif
#ifdef APP_SYS_openat
	APP_CASE(openat, APP_ARG_PATH1, APP_PLAIN)
#endif
#ifdef APP_SYS_openat2
	APP_CASE(openat2, APP_ARG_PATH1, APP_PLAIN)
#endif
#ifdef APP_SYS_creat
	APP_CASE(creat, APP_ARG_PATH0, APP_PLAIN)
#endif
#ifdef APP_SYS_mkdir
	APP_CASE(mkdir, APP_ARG_PATH0, APP_PLAIN)
#endif
#ifdef APP_SYS_mkdirat
	APP_CASE(mkdirat, APP_ARG_PATH1, APP_PLAIN)
#endif
#ifdef APP_SYS_rename
	APP_CASE(rename, APP_ARG_PATH0, APP_PLAIN)
#endif
#ifdef APP_SYS_renameat
	APP_CASE(renameat, APP_ARG_PATH1, APP_PLAIN)
#endif
#ifdef APP_SYS_renameat2
	APP_CASE(renameat2, APP_ARG_PATH1, APP_PLAIN)
#endif
#ifdef APP_SYS_unlink
	APP_CASE(unlink, APP_ARG_PATH0, APP_PLAIN)
#endif
#ifdef APP_SYS_unlinkat
	APP_CASE(unlinkat, APP_ARG_PATH1, APP_PLAIN)
#endif
#ifdef APP_SYS_write
	APP_CASE(write, APP_ARG_FD0, APP_PLAIN)
#endif
#ifdef APP_SYS_pwrite64
	APP_CASE(pwrite64, APP_ARG_FD0, APP_PLAIN)
#endif
#ifdef APP_SYS_writev
	APP_CASE(writev, APP_ARG_FD0, APP_PLAIN)
#endif
#ifdef APP_SYS_fsync
	APP_CASE(fsync, APP_ARG_FD0, APP_PLAIN)
#endif
#ifdef APP_SYS_connect
	APP_CASE(connect, APP_ARG_FD0, APP_PLAIN)
#endif
#ifdef APP_SYS_accept
	APP_CASE(accept, APP_ARG_FD0, APP_ACCEPT)
#endif
#ifdef APP_SYS_accept4
	APP_CASE(accept4, APP_ARG_FD0, APP_ACCEPT)
#endif
#ifdef APP_SYS_listen
	APP_CASE(listen, APP_ARG_FD0, APP_LISTEN)
#endif
#ifdef APP_SYS_socket
	APP_CASE(socket, APP_ARG_NONE, APP_PLAIN)
#endif
#ifdef APP_SYS_sendfile64
	APP_CASE(sendfile64, APP_ARG_FD0, APP_PLAIN)
#endif
#ifdef APP_SYS_splice
	APP_CASE(splice, APP_ARG_FD0, APP_PLAIN)
#endif
	default:
		return 0;
	}
}

#else
static __always_inline void app_note_syn(__u32 netns, __u16 port) {}
#endif /* APP_ERRORS */
