"""A real run's ring, replayed: the chunks rsttrace read on 6.18 while loopback resets (closed ports,
close with unread data, SO_LINGER {1,0}, a client abort; IPv4 and IPv6) and an accept-queue burst
ran in a private netns (tests/data/ring-6.18.bin: each chunk as a 4-byte little-endian length and
its bytes). Through the pipeline with and without its per-shape cache, they make the same lines,
byte for byte: the fast path is checked against records the kernel wrote, not only against records
built as the BPF programs build them (test_fastpath.py)."""
from __future__ import annotations

import pytest

from replay import replay_json
from tests_paths import DATA
from tracer.events.decode import Decoder
from tracer.kernel.tracefs import parse_format
from tracer.pipeline import Pipeline
from tracer.session import Options

CAPTURE = DATA / "ring-6.18.bin"


def captured_chunks() -> list[bytes]:
    data = CAPTURE.read_bytes()
    chunks, at = [], 0
    while at < len(data):
        size = int.from_bytes(data[at:at + 4], "little")
        chunks.append(data[at + 4:at + 4 + size])
        at += 4 + size
    assert at == len(data)
    return chunks


def reason_names() -> dict[str, dict[int, str]]:
    """The kernel's enums as that kernel's tracepoint formats number them."""
    send = parse_format("tcp", "tcp_send_reset", (DATA / "tcp_send_reset-6.18.format").read_text())
    free = parse_format("skb", "kfree_skb", (DATA / "kfree_skb-6.18.format").read_text())
    return {"rst_sent": send.symbols("reason"), "ack_dropped": free.symbols("reason")}


def replay(tmp_path, fast: bool, chunks: list[bytes], **options) -> tuple[bytes, Pipeline]:
    return replay_json(tmp_path / f"{'fast' if fast else 'normal'}.jsonl", chunks,
                       Options(ports=[8100, 8101, 8102], fast_path=fast, **options), reason_names(),
                       lambda addr: f"fn_{addr:x}")


def test_the_capture_holds_what_the_run_made():
    decoder = Decoder(reason_names())
    events = [ev for chunk in captured_chunks() for ev in decoder.decode_batch(chunk)]
    kinds = {ev.kind for ev in events}
    assert {"rst_sent", "rst_received", "syn_dropped"} <= kinds, kinds
    assert {ev.family for ev in events} == {"ipv4", "ipv6"}


@pytest.mark.parametrize("options", [{}, {"reasons": {"no_listener", "closed_with_unread_data"}},
                                     {"count": 25}, {"max_rate": 10}])
def test_a_real_ring_makes_the_same_lines_with_and_without_the_fast_path(tmp_path, options):
    chunks = captured_chunks()
    normal, p_normal = replay(tmp_path, False, chunks, **options)
    fast, p_fast = replay(tmp_path, True, chunks, **options)
    assert normal.count(b"\n") >= (100 if not options else 5)
    assert fast == normal
    assert (p_fast.counts, p_fast.netns_counts, p_fast.emitted) == (p_normal.counts, p_normal.netns_counts,
                                                                    p_normal.emitted)
    if not options:
        assert p_fast.fast.fast > 0          # some records did take a template
