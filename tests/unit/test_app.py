"""The application's side (tracer/enrich/app.py): which failure explains an abort, the window, and
which of three causes explains a full accept queue — from values shaped like bpf/app.bpf.c's maps."""
from __future__ import annotations

from types import SimpleNamespace

from tracer.enrich import app
from tracer.kernel.hooks import APP_SYSCALL_IDS

S = 1_000_000_000
MS = 1_000_000


def failure(call: str, err: int, ns: int, path: bytes = b"", fd: int = -1, flags: int = 0, tid: int = 7):
    return SimpleNamespace(ns=ns, tid=tid, fd=fd, call=APP_SYSCALL_IDS[call], err=err,
                           path_len=len(path) + 1 if path else 0, flags=flags, path=path)


def failures(*entries):
    slots = list(entries) + [failure("open", 0, 0)] * (8 - len(entries))
    return SimpleNamespace(next=len(entries), f=slots)


def test_failures_in_the_window_oldest_first_with_path_or_fd():
    raw = failures(failure("openat", 13, 100 * S - 2 * MS, b"/var/cache/nginx/proxy_temp/1"),
                   failure("write", 28, 100 * S - 1 * MS, fd=9),
                   failure("open", 2, 100 * S - 6 * S, b"/too/old"),       # outside a 5 s window
                   failure("connect", 111, 100 * S + 1 * MS, fd=4))         # after the event
    got = app.failure_records(raw, 100 * S, 5 * S)
    assert [(f["syscall"], f["errno"], f["path"], f["fd"]) for f in got] == [
        ("openat", "EACCES", "/var/cache/nginx/proxy_temp/1", None), ("write", "ENOSPC", None, 9)]
    assert got[0]["before_ms"] == 2.0 and got[0]["error"] == "Permission denied" and got[0]["tid"] == 7


def test_an_unreadable_path_is_said_so():
    [f] = app.failure_records(failures(failure("unlink", 13, 10 * S, flags=app.PATH_UNREAD)), 10 * S, S)
    assert f["path"] is None and f["path_unreadable"] is True


def test_the_most_telling_failure_is_a_permission_or_resource_error_not_a_missing_file():
    raw = failures(failure("openat", 13, 1 * S, b"/tmp/t"), failure("openat", 2, 2 * S, b"/etc/localtime"))
    got = app.failure_records(raw, 3 * S, 5 * S)
    assert app.most_telling(got)["errno"] == "EACCES"
    # among equals, the latest
    raw = failures(failure("write", 28, 1 * S, fd=3), failure("write", 28, 2 * S, fd=5))
    assert app.most_telling(app.failure_records(raw, 3 * S, 5 * S))["fd"] == 5


def test_the_explanation_names_the_call_the_errno_and_the_user():
    f = {"syscall": "openat", "errno": "EACCES", "error": "Permission denied", "path": "/x/proxy_temp/1", "fd": None,
         "before_ms": 0.4}
    assert app.explain_failure("nginx (pid 9)", f, 0) == (
        'openat("/x/proxy_temp/1") failed with EACCES (Permission denied) in nginx (pid 9) 0.4 ms before — '
        'its user (uid 0, root) may not use that path')


def activity(**fields):
    base = dict(last_call_ns=0, calls=0, accepted=0, first_accept_ns=0, last_accept_ns=0, syns=0, first_syn_ns=0,
                last_syn_ns=0, failed=0, last_fail_ns=0, emfile=0, enfile=0, enomem=0, nofile=0, open_fds=0, last_err=0,
                tgid=0, comm=b"")
    base.update(fields)
    return SimpleNamespace(**base)


def block_and_cause(a, now_ns):
    idle_cpu = activity()
    errors = app.AppErrors(SimpleNamespace(listen_activity_of=lambda netns, port: [idle_cpu, a]
                                           if (netns, port) == (1, 80) else None), window_s=5)
    errors.started_ns = now_ns - 10 * S
    block = errors.accept_block(1, 80, now_ns, with_cause=True)
    return block, block["cause"], block["cause_text"]


def test_a_listener_never_accepted_on_is_not_accepting():
    _, cause, text = block_and_cause(activity(syns=40, first_syn_ns=1 * S, last_syn_ns=3 * S), 20 * S)
    assert cause == "not_accepting" and "no accept() call on it since rsttrace started 10.0 s ago" in text


def test_a_listener_whose_owner_stopped_calling_accept_is_not_accepting():
    a = activity(last_call_ns=15 * S, calls=5, accepted=5, first_accept_ns=11 * S, last_accept_ns=15 * S, tgid=42,
                 comm=b"srv")
    _, cause, text = block_and_cause(a, 19_200 * MS)
    assert cause == "not_accepting" and "srv (pid 42) last called accept() 4.2 s ago" in text


def test_accept_failing_with_emfile_names_the_limit():
    a = activity(last_call_ns=19 * S, calls=812, failed=812, emfile=812, last_fail_ns=19 * S, last_err=24, nofile=1024,
                 open_fds=1024, tgid=8584, comm=b"srv")
    block, cause, text = block_and_cause(a, 19_100 * MS)
    assert cause == "accept_failing" and block["errors"] == {"EMFILE": 812} and block["rlimit_nofile"] == 1024
    assert "accept() failed 812 times with EMFILE (RLIMIT_NOFILE 1024, 1024 fds open) in srv (pid 8584)" in text


def test_a_failure_followed_by_accepts_is_not_the_cause():
    a = activity(last_call_ns=19 * S, calls=50, accepted=40, first_accept_ns=10 * S, last_accept_ns=19 * S, failed=10,
                 enomem=7, last_fail_ns=12 * S, last_err=12, syns=360, first_syn_ns=10 * S, last_syn_ns=19 * S, tgid=5,
                 comm=b"srv")
    block, cause, text = block_and_cause(a, 19_100 * MS)
    assert cause == "accepting_slowly" and block["errors"] == {"ENOMEM": 7, "other": 3} and block["last_error"] == "ENOMEM"
    assert "srv (pid 5) accepts 4.33/s while SYNs arrive at 39.89/s" in text


def test_the_cpus_entries_make_one():
    a = app.merge_cpus([
        activity(calls=3, accepted=3, first_accept_ns=5, last_accept_ns=9, last_call_ns=9, tgid=1, comm=b"w1",
                 syns=4, first_syn_ns=2, last_syn_ns=8),
        activity(calls=2, accepted=1, first_accept_ns=4, last_accept_ns=6, last_call_ns=12, tgid=2, comm=b"w2",
                 failed=1, last_fail_ns=12, last_err=24, emfile=1, nofile=64, open_fds=64),
        activity()])
    assert (a.calls, a.accepted, a.syns, a.failed, a.emfile) == (5, 4, 4, 1, 1)
    assert (a.first_accept_ns, a.last_accept_ns, a.first_syn_ns, a.last_syn_ns, a.last_call_ns) == (4, 9, 2, 8, 12)
    assert (a.tgid, a.comm, a.last_err, a.nofile, a.open_fds) == (2, b"w2", 24, 64, 64)


def test_rates_need_two_events():
    assert app._rate(1, 5, 5) is None
    assert app._rate(11, 0, 2 * S) == 5.0


# -- through the event path: the per-shape cache leaves app_errors events to the normal path ------------

def test_an_rst_with_app_errors_takes_the_normal_path_and_every_sink_shows_them(tmp_path):
    import json
    from test_fastpath import FakeProgram, REASONS, T0, chunks, raw
    from tracer.enrich.attribution import Attributor
    from tracer.events.decode import Decoder
    from tracer.kernel import layout
    from tracer.pipeline import Pipeline
    from tracer.session import Options
    from tracer.sinks import ecs
    from tracer.sinks.jsonl import JsonSink
    from tracer.sinks.output import LineOutput
    from tracer.sinks.plain import format_event

    full = layout.F_HAVE_SOCKET | layout.F_FULLSOCK | layout.F_UNREAD
    events = []
    for i in range(6):      # the same shape six times: the cache takes the 2nd on, unless app_errors
        events.append(raw(1, i=i, kernel_reason=11, state=7, lport=8080, rport=40000 + i, flags=full,
                          unread_bytes=500, skaddr=0xffff0000 + i, sock_ino=9000 + i, callers=[1, 2],
                          app_errors=1 if i >= 3 else 0))
    [chunk] = chunks(events)
    kept = failures(failure("openat", 13, T0 + 3 * 37_000_001 - 400_000, b"/var/cache/nginx/proxy_temp/7"))

    class Program(FakeProgram):
        def app_failures(self, tgid):
            return kept

    out = LineOutput(str(tmp_path / "out.jsonl"))
    p = Pipeline(Options(ports=[8080], fast_path=True), [JsonSink(out)], Decoder(REASONS, mono_to_wall=0),
                 Attributor(context_known=True), ksym=Program().ksym, app=app.AppErrors(Program(), window_s=5))
    p.read(chunk)
    p.flush()
    out.close()
    recs = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(recs) == 6 and p.fast.fast == 2 and p.fast.slow == 4
    assert all("app_errors" not in r for r in recs[:3])
    for r in recs[3:]:
        [f] = r["app_errors"]
        assert (f["syscall"], f["errno"], f["path"]) == ("openat", "EACCES", "/var/cache/nginx/proxy_temp/7")
        assert r["explanation"].startswith('openat("/var/cache/nginx/proxy_temp/7") failed with EACCES')
    # the first of them is 0.4 ms after the failure; the later ones further, all in the window
    assert recs[3]["app_errors"][0]["before_ms"] == 0.4
    assert ecs.event_document(recs[3], {})["rsttrace"]["app_errors"] == recs[3]["app_errors"]
    assert "failed with EACCES" in format_event(recs[3])
