"""The ring buffer between the kernel and rsttrace: a stream of real resets through a 1 MiB ring
that wraps around several times arrives whole — read straight from the mapping (x86-64) and through
bcc's callback consumer (the reader used on machines without ordered loads)."""
from __future__ import annotations

import json
import os
import random
from collections import Counter

import pytest

from conftest import events

PORT = random.randrange(20000, 30000)
CONNECTS = 6000     # two events each (RST sent, RST received): ~2.6 MB through a 1 MiB ring

# One client refused CONNECTS times (connect to a closed port: RST sent with no socket, ECONNREFUSED),
# at ~10 000 events/s: well within what rsttrace writes, so that a record missing is a reading fault.
REFUSED_LOOP = """
import json, socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
ports = []
for i in range(n):
    if i % 100 == 0:
        time.sleep(0.02)
    s = socket.socket()
    try:
        s.connect(("127.0.0.1", port))
    except ConnectionRefusedError:
        ports.append(s.getsockname()[1])
    s.close()
print(json.dumps({"refused": len(ports), "ports": ports}))
"""


@pytest.mark.parametrize("reader", ["direct", "callback"])
def test_reset_stream_through_a_wrapping_1_mib_ring_arrives_whole(netns, tracer, reader):
    env = dict(os.environ)
    if reader == "callback":
        env["RSTTRACE_RING_READER"] = "callback"
    t = tracer("--json", "--port", str(PORT), "--netns", netns.name, "--ring-mb", "1", env=env)
    before = netns.counters()
    facts = json.loads(netns.run("/usr/bin/python3", "-c", REFUSED_LOOP, str(PORT), str(CONNECTS), timeout=120).stdout)
    after = netns.counters()
    records = t.stop()

    assert facts["refused"] == CONNECTS
    sent = events(records, event="rst_sent")
    received = events(records, event="rst_received")
    assert len(sent) == after["TcpOutRsts"] - before["TcpOutRsts"] == CONNECTS
    assert len(received) == CONNECTS
    assert [r for r in records if r["type"] == "lost"] == []
    summary = records[-1]
    assert summary["type"] == "summary" and summary["lost"] == 0 and summary["delivered"] == 2 * CONNECTS
    # Each connection once, as the client saw it: nothing read twice or skipped where the ring wrapped.
    assert Counter(r["remote"]["port"] for r in sent) == Counter(facts["ports"])
    assert Counter(r["local"]["port"] for r in received) == Counter(facts["ports"])
    assert all(r["reason"] == "no_listener" for r in sent) and all(r["reason"] == "peer_reset" for r in received)
