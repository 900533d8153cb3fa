"""The reason catalog: one place that names every reason, maps kernel names to it, and explains it.

Every output (plain lines, JSON `explanation`, the terminal UI, `rsttrace explain`) reads this
catalog. Reason names are rsttrace's stable vocabulary; the kernel's own names (sk_rst_reason,
skb_drop_reason, SNMP counters) are kept beside them so users can grep both.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from ..events.decode import Event

TCPHDR_SYN, TCPHDR_ACK = 0x02, 0x10


@dataclass(frozen=True, kw_only=True)
class Reason:
    name: str
    events: tuple[str, ...]             # event kinds that carry it
    title: str                          # a few words
    what: str                           # what the kernel did
    causes: str                         # typical causes
    fix: str                            # what to check and change
    kernel_names: tuple[str, ...] = ()  # kernel reason names that map here
    counters: tuple[str, ...] = ()      # SNMP / netstat counters the same path bumps
    severity: str = "warning"           # info / warning / error (colour in the UI)
    summary: str = ""                   # one-line str.format template over ev, who and unread
    checks: tuple[str, ...] = ()        # how to see it for yourself: commands, settings, logs

    def one_line(self, ev: Event | None = None) -> str:
        if ev is None or not self.summary:
            return f"{self.title}: {self.fix}"
        try:
            return self.summary.format(ev=ev, who=who(ev), unread=ev.unread_bytes or 0)
        except (AttributeError, KeyError, IndexError, TypeError):
            return f"{self.title}: {self.fix}"


def who(ev: Event) -> str:
    p = ev.process
    if p and p.get("pid"):
        return f"{p.get('comm') or '?'} (pid {p['pid']})"
    return "an unresolved process"  # softirq event whose socket has no (remaining) owner


CATALOG: dict[str, Reason] = {}


def _add(reason: Reason) -> None:
    CATALOG[reason.name] = reason


_add(Reason(
    name="no_listener", events=("rst_sent",), title="connection refused: nothing listens on that port",
    what="A SYN arrived for a port with no listening socket; the kernel answered with RST (the client sees ECONNREFUSED).",
    causes="The server is down, restarting, listening on another address/port or in another network namespace; a "
    "health check hitting the wrong port; a firewall/NAT sending traffic to the wrong place.",
    fix="Check that the service runs and listens where clients connect (`ss -ltnp`), including the netns/container.",
    kernel_names=("NO_SOCKET",), counters=("TcpOutRsts",), severity="warning",
    summary="nothing listens on {ev.local}: SYN from {ev.remote} refused with RST "
    "— check the service is up and listening there (ss -ltnp)"))
_add(Reason(
    name="no_socket", events=("rst_sent", "rst_received"), title="segment for a connection this host does not know",
    what="A non-SYN segment arrived for a connection this host no longer has: it answered with RST (rst_sent; "
    "where a listener holds the port, the kernel's reason is TCP_FLAGS), or the segment was itself an RST, which "
    "the kernel drops without a word (rst_received).",
    causes="The two ends disagree about the connection: one end restarted or rebooted, conntrack or NAT state "
    "expired (a packet marked INVALID skips DNAT and reaches the host's own stack), a load balancer failed over "
    "to a backend that never had the connection, or the peer kept using a connection after a long idle time.",
    fix="Compare idle timeouts of clients, proxies, NAT and conntrack (nf_conntrack_tcp_timeout_established); "
    "look for restarts of either end and load-balancer failovers at that moment.",
    kernel_names=("NO_SOCKET",), counters=("TcpOutRsts",), severity="warning",
    summary="{ev.local} has no connection from {ev.remote}: the segment was "
    "answered with RST — the local side forgot it (restart, timeout) while the peer kept using it"))
_add(Reason(
    name="closed_with_unread_data", events=("rst_sent",), title="closed with unread data",
    what="The application closed a socket while received data was still unread; TCP then must abort with RST "
    "instead of FIN (RFC 2525), and the peer gets ECONNRESET / \"Connection reset by peer\" or a broken pipe.",
    causes="The application gave up mid-exchange: a proxy aborting its upstream (nginx cannot buffer a large response "
    "to its proxy temp dir: permission denied, full disk, proxy_max_temp_file_size) or a client that went "
    "away; a server closing without reading the whole request (body too large, early error response).",
    fix="Read the closing application's error log at that moment; for a proxy check proxy temp dir permissions, "
    "proxy buffers and client_max_body_size; make servers drain requests before closing.",
    kernel_names=("TCP_ABORT_ON_CLOSE",), counters=("TCPAbortOnClose", "TcpOutRsts"), severity="error",
    summary="{who} closed {ev.local} ↔ {ev.remote} with {unread} unread bytes, "
    "so the kernel reset it — the application gave up mid-exchange (a proxy aborting its upstream: read its error "
    "log, temp dir permissions, buffer and body-size limits)"))
_add(Reason(
    name="linger_zero", events=("rst_sent",), title="closed with SO_LINGER {on, 0}",
    what="The application set SO_LINGER with a zero timeout and closed: an abortive close, the kernel sends RST "
    "at once and skips TIME_WAIT.",
    causes="Deliberate (load generators, some connection pools and proxies avoid TIME_WAIT this way) or a library "
    "default; the peer sees ECONNRESET.",
    fix="If the resets hurt, remove SO_LINGER {1,0} from the closing application (or its library/config).",
    kernel_names=("TCP_STATE",), counters=("TCPAbortOnData", "TcpOutRsts"), severity="warning",
    summary="{who} closed {ev.local} ↔ {ev.remote} with SO_LINGER {{1,0}}: "
    "an abortive close by design — remove zero linger if the peer must not see a reset"))
_add(Reason(
    name="aborted", events=("rst_sent",), title="connection aborted by the local side",
    what="The socket was torn down by the local side outside close(): connect(AF_UNSPEC)/disconnect, SOCK_DESTROY "
    "(`ss -K`), or a repair/BPF abort; the kernel sends RST.",
    causes="An administrator or tool killing sockets (ss -K, conntrack tools), an application calling disconnect.",
    fix="Look for `ss -K`, SOCK_DESTROY users or disconnect calls at that moment.",
    kernel_names=("TCP_STATE",), counters=("TcpOutRsts",), severity="warning",
    summary="{who} aborted {ev.local} ↔ {ev.remote} (disconnect or ss -K)"))
_add(Reason(
    name="listener_closed", events=("rst_sent",), title="listener closed with connections still queued",
    what="The listening socket was closed (server stop, restart, crash) while completed connections waited in its "
    "accept queue; the kernel reset each of them (inet_csk_listen_stop).",
    causes="A server restart or crash under load; a process that listens but never accepts; a hot reload that closes "
    "the old listener before handing over its queue.",
    fix="Drain before stopping (stop accepting new connections, then accept what is queued), use SO_REUSEPORT "
    "or socket hand-over for reloads; look for crashes of the listening process at that moment.",
    kernel_names=("TCP_STATE",), counters=("TcpOutRsts",), severity="error",
    summary="the listener on {ev.local} closed while {ev.remote}'s connection waited in its accept queue (never "
    "accept()ed): the kernel reset it — drain the queue before stopping or restarting the server"))
_add(Reason(
    name="data_after_close", events=("rst_sent",), title="data arrived after the application closed",
    what="Data arrived on a connection the application had already closed (or shut down for reading); the kernel "
    "cannot deliver it and resets the connection.",
    causes="The peer keeps sending after the local side closed: HTTP keep-alive races (server closes an idle "
    "connection while the client sends the next request), protocols without a graceful shutdown.",
    fix="Align keep-alive timeouts (server longer than client/proxy), make the peer stop sending before close.",
    kernel_names=("TCP_ABORT_ON_DATA",), counters=("TCPAbortOnData", "TcpOutRsts"), severity="warning",
    summary="data from {ev.remote} reached {ev.local} after it was closed "
    "— keep-alive race or a peer that keeps sending; align idle timeouts"))
_add(Reason(
    name="out_of_memory", events=("rst_sent",), title="aborted: too many orphans or TCP memory pressure",
    what="The kernel aborted a closed (orphaned) connection because of tcp_max_orphans or TCP memory limits.",
    causes="Very many connections closing at once with unsent data; tcp_mem too small for the load.",
    fix="Check `TCPAbortOnMemory`, net.ipv4.tcp_max_orphans and net.ipv4.tcp_mem; reduce lingering orphans.",
    kernel_names=("TCP_ABORT_ON_MEMORY",), counters=("TCPAbortOnMemory", "TcpOutRsts"), severity="error"))
_add(Reason(
    name="keepalive_timeout", events=("rst_sent",), title="keepalive timeout",
    what="TCP keepalive probes went unanswered (or the user timeout expired); the kernel gave up and reset.",
    causes="The peer vanished (host down, network path lost, NAT/firewall state expired).",
    fix="Check the path to the peer and middlebox idle timeouts; tune tcp_keepalive_* / TCP_USER_TIMEOUT.",
    kernel_names=("TCP_KEEPALIVE_TIMEOUT",), counters=("TCPAbortOnTimeout", "TcpOutRsts"), severity="warning"))
_add(Reason(
    name="fin_wait2_timeout", events=("rst_sent",), title="FIN_WAIT2 / linger2 timeout",
    what="The application closed, the peer never sent its FIN, and the FIN_WAIT2 timeout (tcp_fin_timeout, "
    "TCP_LINGER2) expired or was negative: the kernel reset the connection.",
    causes="A peer that never closes its side (half-open clients, stuck proxies).",
    fix="Check the peer's close logic; tcp_fin_timeout / TCP_LINGER2 settings.",
    kernel_names=("TCP_ABORT_ON_LINGER",), counters=("TCPAbortOnLinger", "TcpOutRsts"), severity="warning"))
_add(Reason(
    name="disconnect_with_data", events=("rst_sent",), title="disconnect with unsent data",
    what="The socket was disconnected in CLOSING/LAST_ACK with data still unsent; the kernel reset it.",
    causes="Applications aborting connections during shutdown.", fix="Look at the closing application's shutdown path.",
    kernel_names=("TCP_DISCONNECT_WITH_DATA",), counters=("TcpOutRsts",), severity="warning"))
_add(Reason(
    name="time_wait", events=("rst_sent",), title="segment for a TIME_WAIT connection",
    what="A segment arrived for a connection in TIME_WAIT that it could not accept; the kernel answered with RST.",
    causes="Fast port reuse by clients, tcp_tw_reuse, NAT mapping many clients to one address.",
    fix="Check client port reuse and NAT; TIME_WAIT assassination is usually harmless.",
    kernel_names=("TCP_TIMEWAIT_SOCKET",), counters=("TcpOutRsts",), severity="info"))
_add(Reason(
    name="invalid_syn", events=("rst_sent",), title="invalid SYN / ACK to a listener",
    what="A listener received an ACK or SYN it could not match to a pending connection and answered RST "
    "(with tcp_abort_on_overflow=1 this is also what an accept-queue overflow looks like).",
    causes="Expired SYN cookies, a client ACKing a handshake the server forgot, accept-queue overflow with "
    "tcp_abort_on_overflow=1.",
    fix="Check ListenOverflows and tcp_abort_on_overflow; compare with SYN cookie counters.",
    kernel_names=("INVALID_SYN",), counters=("TcpOutRsts",), severity="warning"))
_add(Reason(
    name="invalid_segment", events=("rst_sent",), title="invalid segment",
    what="The kernel rejected a segment (bad ACK number, PAWS, old ACK, unexpected flags) and answered with RST.",
    causes="Middleboxes rewriting sequence numbers, asymmetric routing, very old duplicates, buggy stacks.",
    fix="Capture the flow (tcpdump) and compare sequence numbers on both sides.",
    kernel_names=("TCP_INVALID_ACK_SEQUENCE", "TCP_RFC7323_PAWS", "TCP_TOO_OLD_ACK", "TCP_ACK_UNSENT_DATA", "TCP_FLAGS",
     "TCP_OLD_ACK"), counters=("TcpOutRsts",), severity="warning"))
_add(Reason(
    name="mptcp", events=("rst_sent",), title="MPTCP subflow reset",
    what="An MPTCP subflow was reset with an MPTCP reason code.", causes="MPTCP path management decisions.",
    fix="See the MPTCP reason in kernel_reason.",
    kernel_names=("MPTCP_RST_EUNSPEC", "MPTCP_RST_EMPTCP", "MPTCP_RST_ERESOURCE", "MPTCP_RST_EPROHIBIT", "MPTCP_RST_EWQ2BIG",
     "MPTCP_RST_EBADPERF", "MPTCP_RST_EMIDDLEBOX"), counters=("TcpOutRsts",), severity="info"))
_add(Reason(
    name="peer_reset", events=("rst_received",), title="reset by peer",
    what="This socket received an RST: the application's next call fails with ECONNRESET (\"Connection reset by "
    "peer\") or EPIPE.",
    causes="The peer aborted: it closed with unread data, used SO_LINGER {1,0}, crashed, or had no socket (restart, "
    "wrong port); a middlebox injected the reset.",
    fix="Trace the peer too (rsttrace on that host shows its rst_sent with the reason); for loopback peers the "
    "matching rst_sent is in this same stream. An RST whose TTL differs from the peer's packets is reported as "
    "suspected_injected instead.",
    kernel_names=(), counters=("TcpEstabResets",), severity="warning",
    summary="{who}'s connection {ev.local} ↔ {ev.remote} was reset by the peer "
    "(in state {ev.state}) — look at the peer's rst_sent for the reason"))
_add(Reason(
    name="suspected_injected", events=("rst_received",), title="reset forged on the path",
    what="This socket accepted an RST whose IP TTL (hop limit) differs from the peer's own packets': it was sent "
    "from somewhere else on the path than the peer, in the peer's name. The application sees ECONNRESET "
    "(\"Connection reset by peer\"), but the peer's TCP stack sent nothing.",
    causes="A middlebox resetting the flow: a firewall's REJECT with tcp-reset in its forward path, an IPS or DPI "
    "box, a load balancer or proxy idle timeout, a censor. A route change between the handshake and the RST "
    "changes the TTL too (rare).",
    fix="Do not debug the peer first: find the box on the path (traceroute to the peer, the TTL difference is its "
    "distance), read its rules, timeouts and logs; run rsttrace on the peer — it shows no rst_sent for this.",
    kernel_names=(), counters=("TcpEstabResets",), severity="error",
    summary="{ev.local} ↔ {ev.remote} was reset in the peer's name by something on the path, not by the "
    "peer's stack (TTL evidence) — look at firewalls, load balancers and IPS between the two"))
_add(Reason(
    name="firewall_reject", events=("rst_sent",), title="RST sent by a firewall REJECT rule",
    what="A netfilter rule (iptables -j REJECT --reject-with tcp-reset, nftables `reject with tcp reset`) answered "
    "the segment with an RST in the local side's name. TCP never saw the segment: TcpOutRsts does not count it, "
    "and the client sees \"Connection refused\" (or \"reset by peer\" mid-connection) from a service that may be up.",
    causes="A firewall rule blocking the port or the client: a host firewall, a container network policy, "
    "kube-proxy or a security tool's rules; a rule meant for other traffic matching too much.",
    fix="Find the rule (`nft -a list ruleset`, `iptables-nft -S`, `ip6tables-nft -S` in the netns named) and "
    "change or remove it, or allow the client before it.",
    kernel_names=(), counters=(), severity="error"))
_add(Reason(
    name="firewall_reject_icmp", events=("rst_sent",), title="segment refused by a firewall REJECT rule with ICMP",
    what="A netfilter REJECT rule answered a TCP segment with an ICMP destination unreachable (port unreachable "
    "is iptables' REJECT default; host/admin prohibited are common too). No RST anywhere: the client sees "
    "\"Connection refused\" or \"No route to host\".",
    causes="A firewall rule blocking the port; kube-proxy's REJECT for a Service with no endpoints; a policy "
    "that prohibits the client.",
    fix="Find the rule (`nft -a list ruleset`, `iptables-nft -S` in the netns named) and change it; for "
    "Kubernetes check that the Service has ready endpoints (kubectl get endpointslices).",
    kernel_names=(), counters=("IcmpOutDestUnreachs",), severity="error"))
_add(Reason(
    name="accept_queue_full", events=("syn_dropped", "ack_dropped", "rst_sent"), title="accept queue full",
    what="The listener's accept queue was full (length > limit), so the kernel dropped the SYN or the handshake's "
    "final ACK (or reset it with tcp_abort_on_overflow=1). Clients retransmit, time out or get reset.",
    causes="The application accepts too slowly (too few workers, blocked event loop) or listens with a small backlog; "
    "the limit is min(listen() backlog, net.core.somaxconn).",
    fix="Raise the listen() backlog and net.core.somaxconn together, accept faster, add workers.",
    kernel_names=(), counters=("ListenOverflows", "ListenDrops"), severity="error"))
_add(Reason(
    name="syn_queue_full", events=("syn_dropped",), title="SYN queue full",
    what="The listener's SYN queue (half-open connections) was full and SYN cookies were off, so the SYN was dropped.",
    causes="A SYN flood or a burst of clients beyond tcp_max_syn_backlog; lost final ACKs.",
    fix="Enable net.ipv4.tcp_syncookies, raise tcp_max_syn_backlog and the listen backlog.",
    kernel_names=(), counters=("TCPReqQFullDrop", "ListenDrops"), severity="error"))
_add(Reason(
    name="syn_backlog_reserve", events=("syn_dropped",), title="SYN dropped: tcp_max_syn_backlog's reserve",
    what="SYN cookies are off and the listener's SYN queue is in the last quarter of net.ipv4.tcp_max_syn_backlog, "
    "which the kernel keeps for peers it has talked to before: a SYN from any other peer is dropped (counted in "
    "ListenDrops only, not TCPReqQFullDrop).",
    causes="A SYN flood or a connection burst with net.ipv4.tcp_syncookies=0 and a small tcp_max_syn_backlog.",
    fix="Enable net.ipv4.tcp_syncookies (1), raise net.ipv4.tcp_max_syn_backlog and the listen() backlog.",
    kernel_names=(), counters=("ListenDrops",), severity="error"))
_add(Reason(
    name="listen_drop_other", events=("ack_dropped",), title="connection not created by the listener",
    what="The handshake's final ACK reached the listener with room in its accept queue, but the kernel could not "
    "create the connection's socket and dropped the ACK (counted in ListenDrops, not ListenOverflows).",
    causes="Kernel memory short (the child socket's allocation failed), no route back to the client, or a security "
    "module or MPTCP refusing the connection.",
    fix="Check dmesg for allocation failures, the route to the client (ip route get ADDR), and `nstat -az "
    "TcpExtListenDrops TcpExtListenOverflows` (ListenDrops above ListenOverflows).",
    kernel_names=(), counters=("ListenDrops",), severity="error",
    summary="final ACK from {ev.remote} to {ev.local} dropped: the listener had room but the kernel could not create the "
    "connection (memory, route) — the client believes it is connected"))
_add(Reason(
    name="syn_cookie", events=("syn_cookie",), title="SYN cookie sent",
    what="The SYN queue was full, so the kernel answered with a SYN cookie instead of keeping state.",
    causes="A SYN flood or a connection burst larger than the SYN queue.",
    fix="Raise the listen backlog / tcp_max_syn_backlog if the burst is legitimate.",
    kernel_names=(), counters=("SyncookiesSent",), severity="warning"))
# How a connection's story ended (`connection` records, enrich/stories.py): the consequence of the
# drops and resets above, as the application at the other end met it.
_add(Reason(
    name="never_established", events=("connection",), title="connection never established",
    what="The client's connect() failed: its SYNs were dropped (or unanswered) until it timed out (ETIMEDOUT), was "
    "refused (ECONNREFUSED), or the application gave up and closed the socket (its own timeout: no errno).",
    causes="A full accept or SYN queue at the server (see the SYN drops the record names), a listener that does not "
    "accept, a SYN flood, or a path that loses SYNs.",
    fix="Fix what dropped the SYNs (the record's events say where and why); clients retry a dropped SYN after 1 s, "
    "then 2, 4 ...: a timeout shorter than that never sees the retry.",
    counters=("TcpExtTCPSynRetrans",), severity="error"))
_add(Reason(
    name="established", events=("connection",), title="connection established late",
    what="The connection was established in the end, after dropped SYNs or final ACKs: each drop cost the client a "
    "retransmission timeout (1 s, then 2, 4 ...).",
    causes="A listener whose queues fill in bursts (accepts too slowly, too small a backlog).",
    fix="Raise the listen() backlog (and somaxconn), accept faster; the record's delay is what the drops added.",
    counters=("TcpExtTCPSynRetrans",), severity="warning"))
_add(Reason(
    name="client_only", events=("connection",), title="established on the client only",
    what="The client's connect() succeeded, but its final ACK was dropped at the server's full accept queue: the "
    "server never had the connection. The client's first request waits, is retransmitted, and meets the full queue again.",
    causes="An accept queue full when the handshake completed (tcp_abort_on_overflow=0, the Linux default).",
    fix="Raise the listen() backlog and somaxconn, accept faster; clients see hangs or timeouts on their first request.",
    counters=("TcpExtListenOverflows",), severity="error"))
_add(Reason(
    name="reset", events=("connection",), title="connection reset",
    what="The client reached ESTABLISHED, then was reset: its application sees ECONNRESET (\"Connection reset by "
    "peer\") on its next read or write.",
    causes="With tcp_abort_on_overflow=1, the server answers a final ACK that meets a full accept queue with RST; or "
    "the server aborted the connection.",
    fix="See the rst_sent the record names; for accept-queue resets raise the backlog and accept faster.",
    counters=("TcpEstabResets",), severity="error"))
_add(Reason(
    name="open", events=("connection",), title="connection story without an end",
    what="No end was seen: rsttrace stopped, or nothing happened to the connection for a long while (a client on "
    "another host that gave up after its SYNs were dropped leaves nothing to see here).",
    causes="A remote client that gave up, or one still retrying when rsttrace stopped.",
    fix="Trace the client's host too, or look at the drops the record names.", severity="info"))
_add(Reason(
    name="unknown", events=("rst_sent", "rst_received", "syn_dropped", "ack_dropped"), title="reason not known",
    what="The kernel did not say why and rsttrace could not tell from what it sees; the raw evidence is in the record.",
    causes="—", fix="Look at kernel_reason and evidence in the JSON record.", kernel_names=("NOT_SPECIFIED", "ERROR"), counters=(), severity="info"))



def _checks(name: str, *checks: str) -> None:
    CATALOG[name] = replace(CATALOG[name], checks=checks)


# How to confirm each diagnosis by hand (`rsttrace explain`, the screen's final advice). PORT, PID and
# NETNS stand for the values in the event.
_checks("no_listener",
        "ss -ltnp 'sport = :PORT' — in the netns the clients reach (ip netns exec NETNS ss -ltnp, or "
        "nsenter -t PID -n ss -ltnp for a container)",
        "nstat -az TcpOutRsts — moves with every RST the host sends")
_checks("closed_with_unread_data",
        "the closing process's error log at that second; nginx: grep -E 'Permission denied|proxy_temp|"
        "upstream prematurely' /var/log/nginx/error.log",
        "proxy temp dir owned by the worker user? ls -ld /var/cache/nginx/proxy_temp; ps -o user= -C nginx",
        "nginx: proxy_buffers, proxy_buffer_size, proxy_max_temp_file_size, client_max_body_size",
        "nstat -az TcpExtTCPAbortOnClose — the kernel counts these aborts")
_checks("linger_zero",
        "strace -f -e trace=setsockopt -p PID 2>&1 | grep SO_LINGER — who sets {1, 0}",
        "nstat -az TcpExtTCPAbortOnData (the kernel counts a zero-linger close here)")
_checks("data_after_close",
        "idle/keep-alive timeouts on both sides: the server's must be longer than every client's and proxy's "
        "(nginx keepalive_timeout vs upstream keepalive_timeout, HTTP client pool idle time)",
        "nstat -az TcpExtTCPAbortOnData")
_checks("out_of_memory",
        "cat /proc/net/sockstat — orphan and mem against the limits below",
        "sysctl net.ipv4.tcp_max_orphans net.ipv4.tcp_mem",
        "nstat -az TcpExtTCPAbortOnMemory")
_checks("keepalive_timeout",
        "sysctl net.ipv4.tcp_keepalive_time net.ipv4.tcp_keepalive_intvl net.ipv4.tcp_keepalive_probes",
        "ss -tno 'dport = :PORT' — timer:(keepalive,...) shows the probes in flight",
        "NAT/firewall/load-balancer idle timeouts on the path; nstat -az TcpExtTCPAbortOnTimeout")
_checks("fin_wait2_timeout",
        "sysctl net.ipv4.tcp_fin_timeout; ss -tno state fin-wait-2",
        "nstat -az TcpExtTCPAbortOnLinger")
_checks("listener_closed",
        "ss -ltn 'sport = :PORT' before stopping the server: Recv-Q > 0 means connections wait in the accept "
        "queue and will be reset when the listener closes",
        "the service manager's log at that second (journalctl -u SERVICE): a restart, reload or crash")
_checks("firewall_reject",
        "nft -a list ruleset — in the netns named (ip netns exec NETNS ..., or nsenter -t PID -n ...): the "
        "rule's handle is what `nft delete rule FAMILY TABLE CHAIN handle N` takes",
        "iptables-nft -S; ip6tables-nft -S — the same rules as iptables shows them (-v -L for their counters)",
        "nstat -az TcpOutRsts — does not move for these RSTs")
_checks("firewall_reject_icmp",
        "nft -a list ruleset; iptables-nft -S — in the netns named",
        "nstat -az IcmpOutDestUnreachs",
        "Kubernetes: kubectl get endpointslices -A — a Service without ready endpoints is REJECTed by kube-proxy")
_checks("suspected_injected",
        "tcpdump -nn -v 'tcp[tcpflags] & tcp-rst != 0' on both ends: the peer shows no RST leaving, this host "
        "one arriving; compare the TTLs with the peer's other packets",
        "traceroute -T -p PORT PEER — the boxes in between; the TTL difference is roughly the distance to the sender",
        "run rsttrace on the peer: it reports no rst_sent for the connection")
_checks("no_socket",
        "conntrack -L -p tcp --orig-port-dst PORT (and conntrack -S: `invalid`) on the NAT/router",
        "sysctl net.netfilter.nf_conntrack_tcp_timeout_established net.netfilter.nf_conntrack_tcp_loose",
        "uptime / journalctl for a restart of either end at that moment; the load balancer's failover log")
_checks("peer_reset",
        "run rsttrace on the peer: its rst_sent carries the reason",
        "nstat -az TcpEstabResets")
_checks("accept_queue_full",
        "ss -ltn 'sport = :PORT' — for a listener Recv-Q is the accept queue now and Send-Q its limit; the "
        "limit is min(listen() backlog, net.core.somaxconn) and the queue overflows when Recv-Q > Send-Q",
        "sysctl net.core.somaxconn (per netns) and the backlog the server passes to listen() (nginx listen "
        "... backlog=N, Java ServerSocket/Tomcat acceptCount, gunicorn --backlog, Go: somaxconn)",
        "sysctl net.ipv4.tcp_abort_on_overflow — 0 (default): the SYN or final ACK is dropped and clients "
        "retransmit or time out; 1: clients get an RST",
        "nstat -az TcpExtListenOverflows TcpExtListenDrops")
_checks("syn_queue_full",
        "sysctl net.ipv4.tcp_max_syn_backlog net.ipv4.tcp_syncookies",
        "ss -ltn 'sport = :PORT'; ss -tn state syn-recv 'sport = :PORT' | wc -l — half-open connections",
        "nstat -az TcpExtTCPReqQFullDrop TcpExtListenDrops")
_checks("syn_backlog_reserve",
        "sysctl net.ipv4.tcp_syncookies net.ipv4.tcp_max_syn_backlog",
        "ss -tn state syn-recv 'sport = :PORT' | wc -l — half-open connections against 3/4 of tcp_max_syn_backlog",
        "nstat -az TcpExtListenDrops TcpExtTCPReqQFullDrop — ListenDrops moves, TCPReqQFullDrop does not")
_checks("listen_drop_other",
        "nstat -az TcpExtListenDrops TcpExtListenOverflows — ListenDrops above ListenOverflows",
        "dmesg for page allocation failures; ip route get CLIENT_ADDR from inside the netns")
_checks("syn_cookie",
        "nstat -az TcpExtSyncookiesSent TcpExtSyncookiesRecv TcpExtSyncookiesFailed",
        "sysctl net.ipv4.tcp_max_syn_backlog; the listen() backlog also caps the SYN queue")

REASON_NAMES = tuple(CATALOG)


def classify(ev: Event) -> str:
    """rsttrace reason for an event, from what the kernel said and what the socket showed."""
    queue_full = bool(ev.queues and ev.queues["accept_qlen"] > ev.queues["accept_qmax"])
    return classify_fields(ev.kind, kernel_reason=ev.kernel_reason, tcp_flags=ev.tcp_flags,
                           linger_zero=ev.linger and ev.linger_jiffies == 0, verdict=ev.verdict,
                           queue_full=queue_full, orphan=ev.orphan, callers=ev.caller_names, state=ev.state,
                           unread=ev.unread_bytes, has_socket=bool(ev.skaddr), hook=ev.hook)


VERDICT_REASONS = {"accept_queue_full": "accept_queue_full", "syn_queue_full": "syn_queue_full",
                   "syn_backlog_reserve": "syn_backlog_reserve", "syn_cookie": "syn_cookie",
                   "listen_drop_other": "listen_drop_other"}


def classify_fields(kind: str, *, kernel_reason: str | None = None, tcp_flags: int = 0, linger_zero: bool = False,
                    verdict: str = "none", queue_full: bool = False, orphan: bool = False,
                    callers: list[str] | None = None, state: str | None = None, unread: int | None = None,
                    has_socket: bool = True, hook: str | None = None) -> str:
    """The same decision from the few fields the kernel's exact-count keys keep."""
    if kind == "rst_received":
        if verdict == "rst_not_from_peer":       # its TTL is not the peer's (bpf/origin.bpf.c)
            return "suspected_injected"
        return "no_socket" if kernel_reason == "NO_SOCKET" else "peer_reset"
    if kind == "connection":         # a connection's story: its outcome (enum rsttrace_outcome)
        return verdict
    if kind in ("syn_dropped", "syn_cookie"):
        return VERDICT_REASONS.get(verdict, "unknown")
    if kind == "ack_dropped":
        # The verdict the kernel counted (ListenOverflows, or ListenDrops alone), else the drop reason:
        # TCP_LISTEN_OVERFLOW, or NO_SOCKET for a SYN cookie's ACK that cookie_v4/v6_check() could not
        # make a child for — the accept queue, unless memory ran out (such an event is inferred).
        if verdict != "none":
            return VERDICT_REASONS.get(verdict, "unknown")
        return "accept_queue_full" if kernel_reason in ("TCP_LISTEN_OVERFLOW", "NO_SOCKET") else "unknown"
    if kind != "rst_sent":
        return "unknown"
    if hook == "net_dev_queue":      # an RST TCP did not make, leaving a device: netfilter's REJECT
        return "firewall_reject"
    if hook == "icmp_send":          # an ICMP unreachable for a TCP segment: TCP answers with RST, never so
        return "firewall_reject_icmp"
    if kernel_reason == "TCP_FLAGS" and state == "LISTEN" and not tcp_flags & TCPHDR_SYN:
        # A listener got a segment of a connection it does not have (tcp_rcv_state_process(): an ACK in
        # LISTEN): the port still listens, the connection is forgotten.
        return "no_socket"
    if kernel_reason is None:
        return infer_rst_reason(callers or [], state=state, unread=unread, linger_zero=linger_zero, orphan=orphan,
                                tcp_flags=tcp_flags, queue_full=queue_full, has_socket=has_socket)
    if kernel_reason == "INVALID_SYN" and queue_full:
        # tcp_abort_on_overflow=1: the listener resets the 3rd ACK it cannot queue; the kernel's own
        # reason (INVALID_SYN) says nothing of the overflow, the listener's queue does.
        return "accept_queue_full"
    if kernel_reason == "NO_SOCKET":
        syn_only = tcp_flags & TCPHDR_SYN and not tcp_flags & TCPHDR_ACK
        return "no_listener" if syn_only else "no_socket"
    if kernel_reason == "TCP_STATE":
        # tcp_close() → tcp_disconnect() for SO_LINGER {1,0}; a child never accept()ed has no struct
        # socket: inet_csk_listen_stop() disconnects those when their listener closes.
        if linger_zero:
            return "linger_zero"
        return "listener_closed" if orphan else "aborted"
    for reason in CATALOG.values():
        if kernel_reason in reason.kernel_names and "rst_sent" in reason.events:
            return reason.name
    return "unknown"


def infer_rst_reason(callers: list[str], *, state: str | None, unread: int | None, linger_zero: bool, orphan: bool,
                     tcp_flags: int, queue_full: bool, has_socket: bool) -> str:
    """The reason of an RST on a kernel that does not give one (< 6.10), from what the kernel knew at
    the hook: which function sends it and who called it (innermost frames), the socket's state,
    unread bytes and SO_LINGER. The branches follow the callers of tcp_send_active_reset() and
    tcp_v4/v6_send_reset() in Linux 4.x-6.9; where two causes share a path, the answer is the one
    the evidence supports, else `unknown`."""
    names = set(callers)
    sender = callers[0] if callers else ""
    if sender.startswith(("tcp_v4_send_reset", "tcp_v6_send_reset")):
        if not has_socket:
            syn_only = tcp_flags & TCPHDR_SYN and not tcp_flags & TCPHDR_ACK
            return "no_listener" if syn_only else "no_socket"
        if state == "TIME_WAIT":
            return "time_wait"
        if state in ("LISTEN", "NEW_SYN_RECV"):
            if queue_full:
                return "accept_queue_full"
            if state == "LISTEN" and tcp_flags & TCPHDR_ACK and not tcp_flags & TCPHDR_SYN:
                return "no_socket"              # an ACK no pending connection matches: TCP_FLAGS since 6.10
            return "invalid_syn"
        if state in ("FIN_WAIT1", "FIN_WAIT2", "CLOSING", "LAST_ACK"):
            return "data_after_close"          # tcp_rcv_state_process(): data after shutdown (TCPAbortOnData)
        return "invalid_segment"
    if sender.startswith("tcp_send_active_reset"):
        if names & {"inet_csk_listen_stop", "inet_child_forget"} or ("tcp_disconnect" in names and orphan and not linger_zero):
            return "listener_closed"
        if "tcp_disconnect" in names:
            return "linger_zero" if linger_zero else "aborted"
        if names & {"__tcp_close", "tcp_close"}:
            if unread:
                return "closed_with_unread_data"
            if state == "FIN_WAIT2":
                return "fin_wait2_timeout"       # linger2 < 0 (TCPAbortOnLinger)
            return "out_of_memory"               # tcp_check_oom(): too many orphans (TCPAbortOnMemory)
        if "tcp_keepalive_timer" in names:
            return "fin_wait2_timeout" if state == "FIN_WAIT2" else "keepalive_timeout"
        if names & {"tcp_out_of_resources", "tcp_write_timeout"}:
            return "out_of_memory"
        if names & {"tcp_abort", "tcp_diag_destroy", "sock_diag_destroy"}:
            return "aborted"
    return "unknown"


def explain(ev: Event) -> str:
    if ev.queues and ev.reason in ("accept_queue_full", "syn_queue_full", "syn_backlog_reserve", "syn_cookie"):
        return explain_queue(ev)
    return CATALOG.get(ev.reason, CATALOG["unknown"]).one_line(ev)


def explain_queue(ev: Event) -> str:
    """Name the limit that binds: the listen() backlog, somaxconn, or the SYN-queue rules."""
    q = ev.queues
    sc = q["sysctls"]
    owner = who(ev) if ev.process else "the listener"
    what = {"syn_dropped": "SYN dropped", "ack_dropped": "final ACK dropped", "rst_sent": "final ACK answered with RST",
            "syn_cookie": "SYN answered with a cookie"}.get(ev.kind, ev.kind)
    if ev.kind == "ack_dropped" and ev.kernel_reason == "NO_SOCKET":
        what = "final ACK of a SYN cookie dropped"
    asked = f"listen({q['backlog']})" if q["backlog"] is not None else "listen(?)"
    if ev.reason == "accept_queue_full":
        if q["binding_limit"] == "somaxconn":
            limit = (f"net.core.somaxconn {sc['somaxconn']} caps {asked}: raise somaxconn (in that netns) and "
                     f"the backlog together, and accept faster")
        else:
            limit = (f"the limit is min({asked}, somaxconn {sc['somaxconn']}) = {q['accept_qmax']} — the application "
                     f"passes a small backlog; raise it and accept faster (more workers)")
        tail = ""
        if ev.kind == "ack_dropped" and not sc["tcp_abort_on_overflow"]:
            tail = "; the client believes it is connected and will retransmit"
        seen = f"{q['accept_qlen']}/{q['accept_qmax']}"
        if q["accept_qlen"] <= q["accept_qmax"]:
            seen += " when read, after an accept()"     # the cookie path's queues are read a moment later
        # Why it is full, from the owner's accept() calls (enrich/app.py), before what limits it.
        cause = ev.extra.get("accept_cause")
        why = f": {cause}; " if cause else "; "
        return f"{what} on {ev.local} from {ev.remote}: accept queue of {owner} full ({seen}){why}{limit}{tail}"
    if ev.reason == "syn_cookie":
        return (f"{what} on {ev.local} from {ev.remote}: SYN queue full ({q['syn_qlen']}/{q['syn_qmax']}) — a SYN "
                f"flood or a burst above the backlog {q['accept_qmax']}; raise the listen() backlog if legitimate")
    if ev.verdict == "syn_backlog_reserve":
        return (f"{what} on {ev.local} from {ev.remote}: syncookies off and the SYN queue ({q['syn_qlen']}) is in "
                f"the last quarter of tcp_max_syn_backlog {sc['tcp_max_syn_backlog']}, kept for known peers — "
                f"enable net.ipv4.tcp_syncookies or raise tcp_max_syn_backlog")
    return (f"{what} on {ev.local} from {ev.remote}: SYN queue full ({q['syn_qlen']}/{q['syn_qmax']}) and "
            f"tcp_syncookies={sc['tcp_syncookies']} — enable net.ipv4.tcp_syncookies, raise the listen() backlog "
            f"(now {q['accept_qmax']}) and tcp_max_syn_backlog")


def lookup(name: str) -> Reason | None:
    return CATALOG.get(name)
