"""The decoder reads every field of the record where the C header puts it (a ctypes record built
with distinct values, packed as the ring reader hands it over, decoded back)."""
from __future__ import annotations

import socket

from tracer.kernel import layout
from tracer.events.decode import RING_RECORD, Decoder
from tracer.kernel.ringbuf import record_stride


def ring_chunk(*raws: layout.RawEvent, discard: int | None = None) -> bytes:
    out = b""
    for i, raw in enumerate(raws):
        length = layout.EVENT_SIZE | ((1 << 30) if i == discard else 0)
        body = bytes(raw)
        out += length.to_bytes(4, "little") + b"\0" * 4 + body + b"\0" * (RING_RECORD.size - 8 - len(body))
    return out


def sample_raw() -> layout.RawEvent:
    r = layout.RawEvent()
    r.ktime_ns, r.skaddr, r.sock_cookie, r.sock_ino, r.linger_jiffies = 11, 12, 13, 14, 0
    r.callers[:] = [0xffffffff81000001, 0xffffffff81000002, 0, 0]
    r.kind, r.kernel_reason, r.tgid, r.uid, r.netns, r.state = 1, 9, 4242, 33, 4026531840, 7
    r.unread_bytes = 4096
    r.accept_qlen, r.accept_qmax, r.syn_qlen, r.somaxconn, r.max_syn_backlog = 6, 5, 3, 4096, 128
    r.listen_backlog, r.owner_tgid = 5, 77
    r.family, r.lport, r.rport = socket.AF_INET6, 8080, 51234
    r.flags = (layout.F_SOFTIRQ | layout.F_HAVE_SOCKET | layout.F_FULLSOCK | layout.F_QUEUES
               | layout.F_UNREAD | layout.F_INFERRED)
    r.tcp_flags, r.syncookies, r.abort_on_overflow, r.verdict, r.hook = 0x12, 1, 0, 1, 2
    r.laddr[:] = list(socket.inet_pton(socket.AF_INET6, "2001:db8::1"))
    r.raddr[:] = list(socket.inet_pton(socket.AF_INET6, "::ffff:10.0.0.2"))
    r.comm, r.owner_comm = b"nginx", b"master"
    return r


def test_every_field_lands_where_the_header_puts_it():
    [ev] = Decoder({"rst_sent": {9: "TCP_ABORT_ON_CLOSE"}}).decode_batch(ring_chunk(sample_raw()))
    assert (ev.kind, ev.ktime_ns, ev.skaddr, ev.sock_cookie, ev.sock_ino) == ("rst_sent", 11, 12, 13, 14)
    assert (ev.kernel_reason, ev.task_pid, ev.task_uid, ev.netns, ev.state) == (
        "TCP_ABORT_ON_CLOSE", 4242, 33, 4026531840, "CLOSE")
    assert (ev.family, ev.local_addr, ev.local_port, ev.remote_addr, ev.remote_port) == (
        "ipv6", "2001:db8::1", 8080, "::ffff:10.0.0.2", 51234)
    assert ev.local == "[2001:db8::1]:8080"
    assert (ev.softirq, ev.unread_bytes, ev.linger, ev.orphan, ev.inferred) == (True, 4096, False, False, True)
    assert ev.callers == [0xffffffff81000001, 0xffffffff81000002]
    assert (ev.task_comm, ev.owner_pid, ev.owner_comm) == ("nginx", 77, "master")
    assert (ev.tcp_flags, ev.tcp_flag_names, ev.verdict, ev.hook) == (0x12, ["SYN", "ACK"], "accept_queue_full",
                                                                       "tcp_v4_send_reset")
    assert ev.queues == {"accept_qlen": 6, "accept_qmax": 5, "syn_qlen": 3, "syn_qmax": 5, "backlog": 5,
                         "binding_limit": "listen_backlog",
                         "sysctls": {"somaxconn": 4096, "tcp_max_syn_backlog": 128, "tcp_syncookies": 1,
                                     "tcp_abort_on_overflow": 0}}
    assert ev.time_ns > 11          # wall clock = monotonic + offset


def test_discarded_records_are_skipped_and_the_stride_matches_the_ring():
    a, b = sample_raw(), sample_raw()
    b.tgid = 1
    assert RING_RECORD.size == record_stride(layout.EVENT_SIZE)
    events = Decoder({}).decode_batch(ring_chunk(a, b, a, discard=0))
    assert [ev.task_pid for ev in events] == [1, 4242]


def test_unknown_kernel_reason_values_keep_their_number():
    raw = sample_raw()
    raw.kernel_reason = 99
    [ev] = Decoder({"rst_sent": {}}).decode_batch(ring_chunk(raw))
    assert ev.kernel_reason == "REASON_99"
