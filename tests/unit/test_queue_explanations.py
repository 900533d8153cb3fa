"""Listen-queue explanations name the limit that binds; inet_diag listener rows parse."""
from __future__ import annotations

import socket
import struct

from tracer.enrich import reasons
from tracer.enrich.listeners import INET_DIAG_SKMEMINFO, _parse_diag_msg
from tracer.events.decode import Event


def queue_event(kind="syn_dropped", verdict="accept_queue_full", qlen=6, qmax=5, backlog=5, somaxconn=4096,
                syn_qlen=0, syncookies=1, binding="listen_backlog") -> Event:
    ev = Event(kind=kind, ktime_ns=1, time_ns=1, family="ipv4", local_addr="127.0.0.1", local_port=8100,
               remote_addr="127.0.0.1", remote_port=50000, state="LISTEN", netns=1, kernel_reason=None,
               softirq=True, task_pid=0, task_comm="", task_uid=0, skaddr=1, sock_cookie=0, sock_ino=5,
               unread_bytes=0, linger=False, linger_jiffies=0, orphan=False, tcp_flags=2, callers=[],
               verdict=verdict, inferred=True,
               queues={"accept_qlen": qlen, "accept_qmax": qmax, "syn_qlen": syn_qlen, "syn_qmax": qmax,
                       "backlog": backlog, "binding_limit": binding,
                       "sysctls": {"somaxconn": somaxconn, "tcp_max_syn_backlog": 2048, "tcp_syncookies": syncookies,
                                   "tcp_abort_on_overflow": 0}})
    ev.reason = reasons.classify(ev)
    ev.process = {"pid": 42, "comm": "server", "uid": 0, "source": "listener_owner"}
    ev.explanation = reasons.explain(ev)
    return ev


def test_small_listen_backlog_is_named():
    ev = queue_event()
    assert ev.reason == "accept_queue_full"
    assert "accept queue of server (pid 42) full (6/5)" in ev.explanation
    assert "min(listen(5), somaxconn 4096) = 5" in ev.explanation


def test_somaxconn_capping_the_backlog_is_named():
    ev = queue_event(qlen=129, qmax=128, backlog=1024, somaxconn=128, binding="somaxconn")
    assert "net.core.somaxconn 128 caps listen(1024)" in ev.explanation


def test_syn_queue_full_without_cookies():
    ev = queue_event(verdict="syn_queue_full", qlen=0, syn_qlen=17, qmax=16, syncookies=0)
    assert ev.reason == "syn_queue_full" and "tcp_syncookies=0" in ev.explanation


def test_final_ack_drop_says_client_retransmits():
    ev = queue_event(kind="ack_dropped", verdict="none")
    ev.kernel_reason = "TCP_LISTEN_OVERFLOW"
    ev.reason = reasons.classify(ev)
    assert ev.reason == "accept_queue_full"
    assert "final ACK dropped" in reasons.explain(ev) and "retransmit" in reasons.explain(ev)


def test_cookie_ack_drop_says_it_was_a_cookie():
    ev = queue_event(kind="ack_dropped", verdict="none", qlen=2, qmax=1, backlog=1)
    ev.kernel_reason = "NO_SOCKET"
    ev.reason = reasons.classify(ev)
    assert ev.reason == "accept_queue_full"
    assert reasons.explain(ev).startswith("final ACK of a SYN cookie dropped on 127.0.0.1:8100")
    assert "full (2/1);" in reasons.explain(ev)
    ev.queues["accept_qlen"] = 1
    assert "full (1/1 when read, after an accept());" in reasons.explain(ev)


def test_inet_diag_listener_message_parses():
    sockid = struct.pack("!HH", 8100, 0) + socket.inet_aton("127.0.0.1") + b"\0" * 12 + b"\0" * 16 + b"\0" * 12
    msg = struct.pack("=BBBB", socket.AF_INET, 10, 0, 0) + sockid + struct.pack("=IIIII", 0, 6, 5, 0, 4242)
    meminfo = struct.pack("=9I", 0, 0, 0, 0, 0, 0, 0, 0, 77)
    msg += struct.pack("=HH", 4 + len(meminfo), INET_DIAG_SKMEMINFO) + meminfo
    lst = _parse_diag_msg(msg)
    assert (lst.addr, lst.port, lst.accept_qlen, lst.accept_qmax, lst.inode, lst.drops) == ("127.0.0.1", 8100, 6, 5, 4242, 77)
