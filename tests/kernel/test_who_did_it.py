"""Who did it, when the task on the CPU is not the answer: a server whose socket is already closed when
rsttrace looks, and a reset inside a container — a scenario run in a docker-style cgroup
(<cgroup2>/system.slice/docker-<64 hex>.scope, as dockerd with the systemd cgroup driver makes it) —
traced by real rsttrace processes with and without --container / --cgroup filters."""
from __future__ import annotations

import json
import random
import os
import secrets
import subprocess

import pytest

from conftest import SCENARIOS, STATE_HOOKS, events, failures_kept_by, state_hook_env, state_hook_type
from tracer.enrich.cgroups import cgroup2_mount

PORT = random.randrange(20000, 30000, 2)   # not a port other suites running beside this one use


def test_server_reset_by_its_client_is_named_after_it_closed_the_socket(netns, tracer):
    t = tracer("--json", "--port", str(PORT), "--netns", netns.name)
    facts = netns.scenario("client_abort", "127.0.0.1", PORT)
    records = t.stop()

    assert facts["server_error"] == "ECONNRESET"
    [sent] = events(records, event="rst_sent")
    assert sent["reason"] == "linger_zero" and sent["process"]["pid"] == facts["client_pid"]
    [received] = events(records, event="rst_received")
    assert received["local"] == {"addr": "127.0.0.1", "port": PORT}
    # Handled in softirq while the aborting client ran; the server closed its socket right after
    # (its fd is gone from /proc before rsttrace can look), but it still listens on that port.
    assert received["context"] == "softirq" and received["evidence"]["task_on_cpu"]["pid"] == facts["client_pid"]
    assert received["process"]["pid"] == facts["server_pid"]
    assert received["process"]["source"] in ("port_listener", "socket_owner")
    assert f"python3 (pid {facts['server_pid']})'s connection" in received["explanation"]


@pytest.mark.parametrize("state_hook", STATE_HOOKS)
def test_client_reset_by_its_server_is_named_after_it_closed_and_exited(netns, tracer, monkeypatch, state_hook):
    # "Connection reset by peer" on the client side: handled in softirq while the *server* closed, and
    # the client closes and exits at once, before any look at /proc can find its fd. The kernel hook
    # (inet_sock_set_state, as a BTF or a raw tracepoint) saw it connect().
    monkeypatch.setenv("SCENARIO_CLIENT_HOLD_S", "0")
    t = tracer("--json", "--port", str(PORT), "--netns", netns.name, env=state_hook_env(state_hook))
    assert state_hook_type(t.proc.pid) == STATE_HOOKS[state_hook]
    facts = netns.scenario("unread_close", "127.0.0.1", PORT)
    records = t.stop()

    assert facts["client_error"] == "ECONNRESET"
    [received] = events(records, event="rst_received")
    assert received["local"] == {"addr": "127.0.0.1", "port": facts["client_port"]}
    assert received["context"] == "softirq" and received["evidence"]["task_on_cpu"]["pid"] == facts["server_pid"]
    assert received["process"] == {**received["process"], "pid": facts["client_pid"], "comm": "python3",
                                   "source": "socket_owner"}
    assert f"python3 (pid {facts['client_pid']})'s connection" in received["explanation"]


@pytest.fixture
def docker_cgroup(root):
    mount = cgroup2_mount()
    assert mount and os.access(mount, os.W_OK), f"need a writable cgroup2 hierarchy (found {mount!r})"
    made = []
    parent = os.path.join(mount, "system.slice")
    if not os.path.isdir(parent):
        os.mkdir(parent)
        made.append(parent)
    cid = secrets.token_hex(32)
    path = os.path.join(parent, f"docker-{cid}.scope")
    os.mkdir(path)
    made.append(path)
    yield cid, path[len(mount):]
    with open(os.path.join(path, "cgroup.procs")) as f:        # anything left: back to the root
        for pid in f.read().split():
            with open(os.path.join(mount, "cgroup.procs"), "w") as root_procs:
                root_procs.write(pid)
    for d in reversed(made):
        os.rmdir(d)


def test_reset_inside_a_container_names_the_container_and_filters_by_it(netns, tracer, docker_cgroup):
    cid, cgroup_path = docker_cgroup
    ports = f"{PORT},{PORT + 1}"
    everything = tracer("--json", "--port", ports, "--netns", netns.name, "--app-errors")
    by_container = tracer("--json", "--port", ports, "--container", cid[:12])
    by_cgroup = tracer("--json", "--port", ports, "--cgroup", "/system.slice", "--app-errors")
    # The containerised scenario: the shell joins the cgroup, then becomes the scenario (server and
    # its forked client both run inside). Joined before `ip netns exec`, which remounts /sys.
    procs = f"{cgroup2_mount()}{cgroup_path}/cgroup.procs"
    out = subprocess.run(["sh", "-c", f'echo $$ > {procs} && exec ip netns exec {netns.name} '
                          f'/usr/bin/python3 {SCENARIOS} linger_zero 127.0.0.1 {PORT}'],
                         capture_output=True, text=True, check=True, timeout=30)
    inside = json.loads(out.stdout.strip().splitlines()[-1])
    outside = netns.scenario("unread_close", "127.0.0.1", PORT + 1)       # the host's own processes
    # --app-errors keeps failed syscalls in the kernel only for the processes in the --cgroup: both
    # scenarios' servers had some (Python's start-up looks for files that are not there)
    assert {inside["server_pid"], outside["server_pid"]} <= failures_kept_by(everything.proc.pid)
    kept = failures_kept_by(by_cgroup.proc.pid)
    assert inside["server_pid"] in kept and outside["server_pid"] not in kept
    records, container_records, cgroup_records = everything.stop(), by_container.stop(), by_cgroup.stop()

    [rst] = events(records, event="rst_sent", local__port=PORT)
    assert rst["reason"] == "linger_zero" and rst["process"]["pid"] == inside["server_pid"]
    assert rst["process"]["container"] == {"id": cid, "runtime": "docker", "pod_uid": None}
    assert rst["process"]["cgroup"]["path"] == cgroup_path
    assert rst["process"]["cgroup"]["id"] == os.stat(f"{cgroup2_mount()}{cgroup_path}").st_ino
    [host_rst] = events(records, event="rst_sent", local__port=PORT + 1)
    assert host_rst["process"]["pid"] == outside["server_pid"] and host_rst["process"]["container"] is None

    for filtered in (container_records, cgroup_records):
        ours = events(filtered, netns__inode=netns.inode)
        pids = {r["process"]["pid"] for r in ours}
        assert pids and pids <= {inside["server_pid"], inside["client_pid"]}, ours
        assert all(r["process"]["container"]["id"] == cid for r in ours)
        assert [r["reason"] for r in ours if r["event"] == "rst_sent"] == ["linger_zero"]
