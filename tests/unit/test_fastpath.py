"""The fast path writes exactly the lines the normal path writes: the same ring records through a
session with and without it, byte for byte, with every kind of record and the user-space filters
(the records are built like the BPF programs build them; the processes named are real)."""
from __future__ import annotations

import os
import socket

import pytest

from replay import replay_json
from tracer.events.decode import RING_RECORD
from tracer.kernel import layout
from tracer.session import Options

REASONS = {"rst_sent": {2: "NO_SOCKET", 7: "TCP_STATE", 11: "TCP_ABORT_ON_CLOSE"}}
NETNS = os.stat("/proc/self/ns/net").st_ino
ME = os.getpid()
T0 = 1_000_000_000_000            # monotonic ns of the first record


class FakeProgram:
    reason_names = REASONS

    def ksym(self, addr: int) -> str:
        return {1: "tcp_send_active_reset", 2: "__tcp_close", 3: "tcp_v4_send_reset", 4: "tcp_reset"}.get(
            addr & 0xf, f"fn_{addr:x}")


def raw(kind: int, *, i: int, v6: bool = False, **fields) -> layout.RawEvent:
    r = layout.RawEvent()
    r.ktime_ns = T0 + i * 37_000_001            # crosses whole seconds every ~27 records
    r.kind, r.netns, r.tgid, r.uid, r.comm = kind, NETNS, ME, 0, b"python3"
    r.family = socket.AF_INET6 if v6 else socket.AF_INET
    if v6:
        r.laddr[:] = list(socket.inet_pton(socket.AF_INET6, "2001:db8::1"))
        r.raddr[:] = list(socket.inet_pton(socket.AF_INET6, f"2001:db8::{i % 7 + 2:x}"))
    else:
        r.laddr[:4] = [127, 0, 0, 1]
        r.raddr[:4] = [127, 0, 0, 1 + i % 3]
    r.kernel_reason = layout.NO_REASON
    for name, value in fields.items():
        if name == "callers":
            r.callers[:len(value)] = value
        else:
            setattr(r, name, value)
    return r


def storm(n: int) -> list[layout.RawEvent]:
    """A mixed storm: the incidents' resets, in every shape the fast path takes and some it does not."""
    full = layout.F_HAVE_SOCKET | layout.F_FULLSOCK
    out = []
    for i in range(n):
        port = 40000 + i
        out += [
            # close with unread data, in the closing process (the nginx incident)
            raw(1, i=i, kernel_reason=11, state=7, lport=8080, rport=port, flags=full | layout.F_UNREAD,
                unread_bytes=100 + i, skaddr=0xffff0000 + i, sock_ino=9000 + i, callers=[1, 2]),
            # the same over IPv6
            raw(1, i=i, v6=True, kernel_reason=11, state=7, lport=8080, rport=port, flags=full | layout.F_UNREAD,
                unread_bytes=7, skaddr=0xffff1000 + i, sock_ino=0, callers=[1, 2]),
            # connect to a closed port: RST with no socket, in softirq
            raw(1, i=i, kernel_reason=2, lport=9, rport=port, tcp_flags=0x02, flags=layout.F_SOFTIRQ, callers=[3]),
            # the client's side of it, connect() seen by the kernel, a moment later: the RST this host
            # sent names it (enrich/stories.py), so the normal path writes it
            raw(2, i=i, state=2, lport=port, rport=9, flags=layout.F_SOFTIRQ | full, skaddr=0xffff2000 + i,
                ktime_ns=T0 + i * 37_000_001 + 25_000,
                sock_ino=7000 + i, sock_cookie=5000 + i, owner_tgid=ME, owner_comm=b"python3", callers=[4]),
            # a connection reset whose socket is only known by its fd (looked up per socket: slow path)
            raw(2, i=i, state=1, lport=8080, rport=port, flags=layout.F_SOFTIRQ | full, skaddr=0xffff3000 + i,
                sock_ino=123456789 + i, callers=[4]),
            # SO_LINGER {1, 0}, from a process whose name needs escaping in JSON and in %-formats
            raw(1, i=i, kernel_reason=7, state=7, lport=port, rport=8080, flags=full | layout.F_LINGER,
                linger_jiffies=0, comm='we"ird%s\\é'.encode()[:15], callers=[1]),
            # a minisocket (TIME_WAIT answering): no unread bytes to show
            raw(1, i=i, kernel_reason=2, state=6, lport=8080, rport=port, tcp_flags=0x10,
                flags=layout.F_SOFTIRQ | layout.F_HAVE_SOCKET, skaddr=0xffff4000 + i, callers=[3]),
            # a listener's queue event: never the fast path
            raw(3, i=i, state=10, lport=8080, rport=port,
                flags=layout.F_SOFTIRQ | full | layout.F_QUEUES | layout.F_INFERRED, accept_qlen=6, accept_qmax=5,
                somaxconn=4096, listen_backlog=5, owner_tgid=ME, owner_comm=b"python3", verdict=1),
        ]
    return out


def chunks(raws: list[layout.RawEvent], per_chunk: int = 50) -> list[bytes]:
    pad = b"\0" * (RING_RECORD.size - 8 - layout.EVENT_SIZE)
    recs = [layout.EVENT_SIZE.to_bytes(4, "little") + b"\0" * 4 + bytes(r) + pad for r in raws]
    return [b"".join(recs[i:i + per_chunk]) for i in range(0, len(recs), per_chunk)]


def run(tmp_path, name: str, fast: bool, options: Options, data: list[bytes]):
    options.fast_path = fast
    return replay_json(tmp_path / f"{name}-{'fast' if fast else 'slow'}.jsonl", data, options, REASONS,
                       FakeProgram().ksym)


@pytest.mark.parametrize("name,options,per_chunk", [
    ("all", dict(), 50),
    ("reason", dict(reasons={"no_listener", "closed_with_unread_data"}), 50),
    ("comm", dict(comms=["python3"]), 50),
    ("max_rate", dict(max_rate=40), 50),
    ("count", dict(count=33), 50),
    # chunk edges: a record a chunk alone, runs cut anywhere, a whole storm in one chunk
    ("all", dict(), 1),
    ("all", dict(), 7),
    ("all", dict(), 480),
    ("count", dict(count=33), 7),
    # without RST pairs (--no-stories) the fast path takes RSTs received as well
    ("no_pairs", dict(stories=False), 50),
])
def test_fast_path_writes_what_the_normal_path_writes(tmp_path, name, options, per_chunk):
    data = chunks(storm(60), per_chunk)
    slow, s_slow = run(tmp_path, name, False, Options(ports=[8080], **options), data)
    fast, s_fast = run(tmp_path, name, True, Options(ports=[8080], **options), data)
    assert fast == slow
    assert slow.count(b"\n") > 30
    assert (s_fast.counts, s_fast.netns_counts, s_fast.emitted) == (s_slow.counts, s_slow.netns_counts, s_slow.emitted)
    if s_slow.stories is not None:             # RST pairs counted alike (the summary's rst_pairs)
        assert (s_fast.stories.paired, s_fast.stories.unpaired) == (s_slow.stories.paired, s_slow.stories.unpaired)
    if name == "all":
        # the normal path for the two kinds it leaves alone (60 records each: listener events, resets
        # whose owner is looked up by fd), for the RSTs received that name the RST this host sent (the
        # refused connects whose addresses mirror the RST's: every third, 20) and for the first record
        # of each of the six shapes, however the chunks fall
        assert (s_fast.fast.slow, s_fast.fast.fast) == (2 * 60 + 20 + 6, 8 * 60 - 2 * 60 - 20 - 6)
        assert fast.count(b'"reset_by":{') == 20 and fast.count(b'"reset_by":null') == 100
    if name == "no_pairs":
        assert (s_fast.fast.slow, s_fast.fast.fast) == (2 * 60 + 6, 8 * 60 - 2 * 60 - 6)
        assert b'we\\"ird%s\\\\\xc3\xa9' in fast             # escaped as orjson escapes it
