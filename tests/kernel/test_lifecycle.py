"""Start, stop and fail like a serious tool: clean detach on SIGINT/SIGTERM, one-line errors with
distinct exit codes when rsttrace cannot trace, filters that really filter."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys

import pytest

from conftest import REPO, RSTTRACE, events, prog_ids_of

PORT = random.randrange(20000, 30000)   # not a port other suites running beside this one use


def bpf_prog_ids() -> set[int]:
    out = subprocess.run(["bpftool", "prog", "show", "--json"], capture_output=True, text=True, check=True)
    return {p["id"] for p in json.loads(out.stdout or "[]")}


def run_rsttrace(*args, prefix=(), timeout=60):
    return subprocess.run([*prefix, *RSTTRACE, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_detaches_every_program_and_prints_summary(netns, tracer, sig):
    t = tracer("--json", "--port", str(PORT))
    ours = prog_ids_of(t.proc.pid)
    assert len(ours) >= 2 and ours <= bpf_prog_ids(), "rsttrace attached no programs?"
    netns.scenario("closed_port", "127.0.0.1", PORT)
    records = t.stop(sig)
    assert t.returncode == 0
    assert not (bpf_prog_ids() & ours), "programs left in the kernel after exit"
    assert records[-1]["type"] == "summary" and records[-1]["exact_counts"]["rst_sent"]["no_listener"] == 1
    assert len(events(records, event="rst_sent", netns__inode=netns.inode)) == 1   # flushed before exit
    assert any(line.startswith("rsttrace: ") and "events in" in line for line in t.stderr_lines)


def test_not_root_is_a_one_line_error_with_exit_3(root):
    r = run_rsttrace("--port", str(PORT), prefix=["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"])
    assert r.returncode == 3
    assert r.stderr.strip().count("\n") == 0 and "root" in r.stderr


def test_bpf_refused_by_seccomp_is_a_one_line_error_with_exit_4(root):
    r = run_rsttrace("--port", str(PORT), prefix=[sys.executable, str(REPO / "tests" / "kernel" / "deny_bpf.py")])
    assert r.returncode == 4, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "refuses" in r.stderr and "EPERM" in r.stderr


def test_missing_btf_is_a_one_line_error_with_exit_5(root):
    # In a private mount namespace, hide the kernel's BTF behind an empty file.
    r = run_rsttrace("--port", str(PORT), prefix=[
        "unshare", "-m", "--propagation", "private", "sh", "-c",
        'mount --bind /dev/null /sys/kernel/btf/vmlinux && exec "$@"', "sh"])
    assert r.returncode == 5, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "BTF" in r.stderr


def test_unmounted_tracefs_is_mounted_by_rsttrace(root):
    r = run_rsttrace("--duration", "0.2", prefix=[
        "unshare", "-m", "--propagation", "private", "sh", "-c",
        'umount /sys/kernel/tracing 2>/dev/null; umount /sys/kernel/debug/tracing 2>/dev/null; '
        'test ! -d /sys/kernel/tracing/events && exec "$@"', "sh"])
    assert r.returncode == 0, r.stderr
    assert "attached in" in r.stderr


@pytest.mark.parametrize("args", [["--port", "70000"], ["--port", "0"], ["--port", "http"], ["-4", "-6"],
                                  ["--reason", "no_such_reason"], ["--count", "0"],
                                  ["--netns", "no-such-netns"], ["--netns", "0"], ["--container", "xyz"],
                                  ["--container", "a" * 65], ["--cgroup", "system.slice"], ["--comm", ""]])
def test_bad_arguments_are_one_line_errors_with_exit_2(args):
    r = run_rsttrace(*args)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("rsttrace: ")


def test_port_filter_in_the_kernel_drops_other_ports(netns, tracer):
    t = tracer("--json", "--port", str(PORT))
    netns.scenario("closed_port", "127.0.0.1", PORT + 1)
    netns.scenario("unread_close", "127.0.0.1", PORT + 2)
    netns.scenario("closed_port", "127.0.0.1", PORT)
    records = t.stop()
    ours = events(records, netns__inode=netns.inode)
    assert ours and all(PORT in (r["local"]["port"], r["remote"]["port"]) for r in ours)
    # Not even counted in the kernel: the filter runs before anything else.
    assert records[-1]["exact_counts"] == {"rst_sent": {"no_listener": 1}, "rst_received": {"peer_reset": 1}}


def test_family_filter_ipv6_only(netns, tracer):
    t = tracer("--json", "-6", "--port", str(PORT))
    netns.scenario("unread_close", "127.0.0.1", PORT)
    netns.scenario("unread_close", "::1", PORT)
    records = t.stop()
    ours = events(records, netns__inode=netns.inode)
    assert len(ours) == 2 and all(r["family"] == "ipv6" for r in ours)


def linger_zero_here(port: int) -> None:
    """An abortive close by *this* process, on loopback in the host netns."""
    import socket
    import struct
    srv = socket.create_server(("127.0.0.1", port))
    cli = socket.create_connection(("127.0.0.1", port), timeout=5)
    conn, _ = srv.accept()
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()
    cli.close()
    srv.close()


def test_pid_filter_keeps_only_that_process(netns, tracer):
    import os
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = tracer("--json", "--port", str(port), "--pid", str(os.getpid()))
    netns.scenario("linger_zero", "127.0.0.1", port)     # another process: filtered out in the kernel
    linger_zero_here(port)                              # this process: kept
    records = t.stop()
    assert events(records, netns__inode=netns.inode) == []
    sent = events(records, event="rst_sent")
    assert [r["reason"] for r in sent] == ["linger_zero"]
    assert sent[0]["process"]["pid"] == os.getpid()


def test_reason_filter_and_count_stop(netns, tracer):
    t = tracer("--json", "--port", str(PORT), "--reason", "linger_zero", "--count", "1")
    netns.scenario("unread_close", "127.0.0.1", PORT)
    netns.scenario("linger_zero", "127.0.0.1", PORT)
    t.proc.wait(timeout=30)          # --count 1: stops by itself
    records = t.stop()
    assert t.returncode == 0
    [only] = events(records)
    assert only["reason"] == "linger_zero"


def test_output_file_is_appended_whole_lines(netns, tracer, tmp_path, validator):
    out = tmp_path / "rst.jsonl"
    out.write_text('{"existing": "line"}\n')
    t = tracer("--json", "--port", str(PORT), "--output", str(out))
    netns.scenario("closed_port", "127.0.0.1", PORT)
    t.stop()
    lines = out.read_text().splitlines()
    assert lines[0] == '{"existing": "line"}'
    for line in lines[1:]:
        validator.validate(json.loads(line))
    assert any('"no_listener"' in line for line in lines)


def test_a_later_start_loads_the_programs_the_first_compiled(netns, tracer, tmp_path):
    """tracer/kernel/progcache.py: the first start compiles (in a child process) and keeps the bytecode;
    the next loads it without clang, reports the same, and leaves nothing in the kernel; a damaged entry
    is compiled anew."""
    env = dict(os.environ, RSTTRACE_PROGRAM_CACHE=str(tmp_path))
    runs = []
    for damage in (False, False, True, False):
        if damage:
            (entry,) = tmp_path.glob("programs-*.json")
            data = json.loads(entry.read_text())
            name = next(iter(data["functions"]))
            data["functions"][name] = "AAAA"          # three zero bytes: not even one instruction
            entry.write_text(json.dumps(data))
        t = tracer("--json", "--port", str(PORT), env=env)
        ours = prog_ids_of(t.proc.pid)
        # A first start compiles in a child process: the compiler is never mapped in the tracer.
        with open(f"/proc/{t.proc.pid}/maps") as f:
            compiler = sorted({line.split()[-1] for line in f if "libLLVM" in line or "libbcc" in line})
        assert compiler == [], compiler
        before = netns.counters()
        netns.scenario("closed_port", "127.0.0.1", PORT)
        netns.scenario("unread_close", "127.0.0.1", PORT + 1)     # filtered out in the kernel
        after = netns.counters()
        records = t.stop()
        assert t.returncode == 0 and not (bpf_prog_ids() & ours), t.stderr_lines
        attached = next(line for line in t.stderr_lines if "attached in" in line)
        runs.append(("cached" if "cached" in attached else "compiled", records[-1]["exact_counts"],
                     after["TcpOutRsts"] - before["TcpOutRsts"]))
    (entry,) = tmp_path.glob("programs-*.json")
    assert entry.stat().st_mode & 0o777 == 0o600
    assert [how for how, _, _ in runs] == ["compiled", "cached", "compiled", "cached"], runs
    for _, counts, kernel_rsts in runs:
        assert counts == {"rst_sent": {"no_listener": 1}, "rst_received": {"peer_reset": 1}}, runs
        assert kernel_rsts == 2        # the filtered port's RST happened, and was not counted
