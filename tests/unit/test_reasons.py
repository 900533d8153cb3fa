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
    assert reasons.classify_fields("rst_sent", kernel_reason=kernel_reason, tcp_flags=flags, linger_zero=linger_zero,
                                   orphan=orphan) == expected


@pytest.mark.parametrize("kind,kernel_reason,verdict,queue_full,expected", [
    ("syn_dropped", None, "accept_queue_full", True, "accept_queue_full"),
    ("syn_dropped", None, "syn_queue_full", False, "syn_queue_full"),
    ("syn_dropped", None, "syn_backlog_reserve", False, "syn_backlog_reserve"),
    ("syn_cookie", None, "syn_cookie", False, "syn_cookie"),
    ("ack_dropped", "TCP_LISTEN_OVERFLOW", "none", True, "accept_queue_full"),
    # a SYN cookie's ACK freed by cookie_v4_check(): the accept queue, though an accept() may have
    # shortened it by the time it is read
    ("ack_dropped", "NO_SOCKET", "none", True, "accept_queue_full"),
    ("ack_dropped", "NO_SOCKET", "none", False, "accept_queue_full"),
    # tcp_abort_on_overflow=1: the RST's kernel reason says INVALID_SYN, the listener's queue says overflow
    ("rst_sent", "INVALID_SYN", "none", True, "accept_queue_full"),
    ("rst_sent", "INVALID_SYN", "none", False, "invalid_syn"),
])
def test_listen_queue_decisions_map_to_reasons(kind, kernel_reason, verdict, queue_full, expected):
    assert reasons.classify_fields(kind, kernel_reason=kernel_reason, verdict=verdict, queue_full=queue_full) == expected


def test_received_reset_is_peer_reset():
    assert reasons.classify_fields("rst_received") == "peer_reset"


def test_every_reason_of_the_618_tracepoint_is_mapped_or_deliberately_unknown():
    fmt = parse_format("tcp", "tcp_send_reset", (DATA / "tcp_send_reset-6.18.format").read_text())
    names = set(fmt.symbols("reason").values()) - {"MAX"}
    unmapped = {n for n in names if reasons.classify_fields("rst_sent", kernel_reason=n) == "unknown"}
    assert unmapped == {"NOT_SPECIFIED", "ERROR"}


def test_catalog_entries_are_complete():
    for name, r in reasons.CATALOG.items():
        assert r.name == name and name.islower()
        assert r.title and r.what and r.fix and r.events
        assert r.severity in ("info", "warning", "error")
        assert r.one_line()          # works without an event


# Kernel stacks as bpf_get_stack() reports them at the hook (innermost first), 6.1 and 6.18.
@pytest.mark.parametrize("callers,state,unread,linger_zero,orphan,flags,queue_full,has_socket,expected", [
    (["tcp_send_active_reset", "__tcp_close", "tcp_close", "inet_release"], "CLOSE", 4096, False, False, 0, False, True,
     "closed_with_unread_data"),
    (["tcp_send_active_reset", "tcp_close", "inet_release", "sock_close"], "CLOSE", 10, False, False, 0, False, True,
     "closed_with_unread_data"),     # __tcp_close inlined
    (["tcp_send_active_reset", "tcp_disconnect", "__tcp_close", "tcp_close"], "CLOSE", 0, True, False, 0, False, True,
     "linger_zero"),
    (["tcp_send_active_reset", "tcp_disconnect", "inet_child_forget", "inet_csk_listen_stop"], "CLOSE", 0, False, True, 0,
     False, True, "listener_closed"),
    (["tcp_send_active_reset", "tcp_disconnect", "__inet_stream_connect", "inet_stream_connect"], "CLOSE", 0, False, False,
     0, False, True, "aborted"),
    (["tcp_send_active_reset", "tcp_keepalive_timer", "call_timer_fn", "__run_timers"], "ESTABLISHED", 0, False, False, 0,
     False, True, "keepalive_timeout"),
    (["tcp_send_active_reset", "tcp_keepalive_timer", "call_timer_fn", "__run_timers"], "FIN_WAIT2", 0, False, True, 0,
     False, True, "fin_wait2_timeout"),
    (["tcp_send_active_reset", "tcp_out_of_resources", "tcp_write_timeout", "tcp_retransmit_timer"], "FIN_WAIT1", 0,
     False, True, 0, False, True, "out_of_memory"),
    (["tcp_v4_send_reset", "tcp_v4_rcv", "ip_protocol_deliver_rcu", "ip_local_deliver_finish"], None, None, False, False,
     0x02, False, False, "no_listener"),
    (["tcp_v6_send_reset", "tcp_v6_rcv", "ip6_protocol_deliver_rcu", "ip6_input_finish"], None, None, False, False,
     0x10, False, False, "no_socket"),
    (["tcp_v4_send_reset", "tcp_check_req", "tcp_v4_rcv", "ip_protocol_deliver_rcu"], "LISTEN", 0, False, False, 0x10,
     True, True, "accept_queue_full"),
    (["tcp_v4_send_reset", "tcp_v4_rcv", "ip_protocol_deliver_rcu", "ip_local_deliver_finish"], "TIME_WAIT", None, False,
     False, 0x10, False, True, "time_wait"),
    (["tcp_v4_send_reset", "tcp_v4_do_rcv", "tcp_v4_rcv", "ip_protocol_deliver_rcu"], "FIN_WAIT2", 0, False, True, 0x18,
     False, True, "data_after_close"),
    (["some_new_caller", "x"], "CLOSE", 0, False, False, 0, False, True, "unknown"),
])
def test_reason_inferred_from_callers_and_socket_state(callers, state, unread, linger_zero, orphan, flags, queue_full,
                                                       has_socket, expected):
    assert reasons.infer_rst_reason(callers, state=state, unread=unread, linger_zero=linger_zero, orphan=orphan,
                                    tcp_flags=flags, queue_full=queue_full, has_socket=has_socket) == expected


def test_each_summary_renders_as_its_str_format_template_would():
    from tracer.events.decode import Event
    ev = Event("rst_sent", 1, 1, "ipv6", "::1", 8080, "2001:db8::2", 51234, "ESTABLISHED", 1, None, False, 42,
               "we{ird} \"comm\"", 0, 0, 0, 0, 1234, False, 0, False, 0, [])
    ev.process = {"pid": 42, "comm": "we{ird} \"comm\""}
    for reason in reasons.CATALOG.values():
        if reason.summary:
            expected = reason.summary.format(ev=ev, who=reasons.who(ev), unread=1234)
            assert reason.one_line(ev) == expected, reason.name
