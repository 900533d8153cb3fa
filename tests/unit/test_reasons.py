"""Kernel reason names → rsttrace's stable reasons, and the catalog every output reads."""
from __future__ import annotations

import pytest

from tracer.enrich import reasons
from tracer.kernel.tracefs import parse_format
from tests_paths import DATA

SYN, ACK, RST = 0x02, 0x10, 0x04


@pytest.mark.parametrize("kernel_reason,flags,linger_zero,expected", [
    ("NO_SOCKET", SYN, False, "no_listener"),
    ("NO_SOCKET", ACK, False, "no_socket"),
    ("NO_SOCKET", SYN | ACK, False, "no_socket"),
    ("TCP_ABORT_ON_CLOSE", 0, False, "closed_with_unread_data"),
    ("TCP_ABORT_ON_CLOSE", 0, True, "closed_with_unread_data"),   # unread data wins over linger (tcp_close order)
    ("TCP_STATE", 0, True, "linger_zero"),
    ("TCP_STATE", 0, False, "aborted"),
    ("TCP_STATE", 0, "orphan", "listener_closed"),
    ("TCP_ABORT_ON_DATA", 0, False, "data_after_close"),
    ("TCP_ABORT_ON_MEMORY", 0, False, "out_of_memory"),
    ("TCP_KEEPALIVE_TIMEOUT", 0, False, "keepalive_timeout"),
    ("TCP_ABORT_ON_LINGER", 0, False, "fin_wait2_timeout"),
    ("TCP_DISCONNECT_WITH_DATA", 0, False, "disconnect_with_data"),
    ("TCP_TIMEWAIT_SOCKET", 0, False, "time_wait"),
    ("INVALID_SYN", 0, False, "invalid_syn"),
    ("TCP_RFC7323_PAWS", 0, False, "invalid_segment"),
    ("MPTCP_RST_EMPTCP", 0, False, "mptcp"),
    ("NOT_SPECIFIED", 0, False, "unknown"),
    ("SOMETHING_NEW_IN_7_0", 0, False, "unknown"),
    (None, 0, False, "unknown"),
])
def test_kernel_reason_maps_to_stable_reason(kernel_reason, flags, linger_zero, expected):
    orphan = linger_zero == "orphan"
    linger_zero = linger_zero is True
    assert reasons.classify_fields("rst_sent", kernel_reason, flags, linger_zero, orphan=orphan) == expected


@pytest.mark.parametrize("kind,kernel_reason,verdict,queue_full,expected", [
    ("syn_dropped", None, "accept_queue_full", True, "accept_queue_full"),
    ("syn_dropped", None, "syn_queue_full", False, "syn_queue_full"),
    ("syn_dropped", None, "syn_backlog_reserve", False, "syn_queue_full"),
    ("syn_cookie", None, "syn_cookie", False, "syn_cookie"),
    ("ack_dropped", "TCP_LISTEN_OVERFLOW", "none", True, "accept_queue_full"),
    # tcp_abort_on_overflow=1: the RST's kernel reason says INVALID_SYN, the listener's queue says overflow
    ("rst_sent", "INVALID_SYN", "none", True, "accept_queue_full"),
    ("rst_sent", "INVALID_SYN", "none", False, "invalid_syn"),
])
def test_listen_queue_decisions_map_to_reasons(kind, kernel_reason, verdict, queue_full, expected):
    assert reasons.classify_fields(kind, kernel_reason, 0, False, verdict, queue_full) == expected


def test_received_reset_is_peer_reset():
    assert reasons.classify_fields("rst_received", None, 0, False) == "peer_reset"


def test_every_reason_of_the_618_tracepoint_is_mapped_or_deliberately_unknown():
    fmt = parse_format("tcp", "tcp_send_reset", (DATA / "tcp_send_reset-6.18.format").read_text())
    names = set(fmt.symbols("reason").values()) - {"MAX"}
    unmapped = {n for n in names if reasons.classify_fields("rst_sent", n, 0, False) == "unknown"}
    assert unmapped == {"NOT_SPECIFIED", "ERROR"}


def test_catalog_entries_are_complete():
    for name, r in reasons.CATALOG.items():
        assert r.name == name and name.islower()
        assert r.title and r.what and r.fix and r.events
        assert r.severity in ("info", "warning", "error")
        assert r.one_line()          # works without an event
