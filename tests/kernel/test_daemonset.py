"""rsttrace as the DaemonSet runs it (contrib/kubernetes/rsttrace.yaml), against a pod laid out as a
node lays it out.

rsttrace runs with the manifest's capabilities and no others (the bounding set, as the runtime sets
it for a root container), under the manifest's seccomp profile (tests/kernel/oci_seccomp.py loads
it as runc does), in a cgroup namespace of its own with the host's cgroup hierarchy mounted (the
`cgroup` hostPath), from an empty /run/rsttrace (a boot's first start: it compiles), with its
runtime-state root at a containerd bundle written as containerd writes one. The pod's processes
run in a cgroup named as the kubelet's systemd driver names it, as another user than rsttrace's,
in a netns of their own. Then each capability is taken away in turn, and the feature
docs/service.md says needs it is seen to go."""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import REPO, SCENARIOS, Tracer, events
from netpaths import ClosedService
from tracer.enrich.cgroups import cgroup2_mount
from tracer.enrich.pods import CONTAINERD_BUNDLES

MANIFEST = REPO / "contrib" / "kubernetes" / "rsttrace.yaml"
PROFILE = REPO / "contrib" / "kubernetes" / "seccomp" / "rsttrace.json"
APPLY_PROFILE = Path(__file__).resolve().parent / "oci_seccomp.py"
PORT = 27431                   # not a port other suites running beside this one use
FIREWALL_PORT = 27433
METRICS_PORT = 27435
NOBODY = 65534


def manifest_capabilities() -> list[str]:
    docs = list(yaml.safe_load_all(MANIFEST.read_text()))
    [ds] = [d for d in docs if d["kind"] == "DaemonSet"]
    [container] = ds["spec"]["template"]["spec"]["containers"]
    caps = container["securityContext"]["capabilities"]
    assert caps["drop"] == ["ALL"]
    return [c.lower() for c in caps["add"]]


@pytest.fixture
def node(root, tmp_path):
    """A kubepods cgroup with a containerd container in it, its bundle, and a cgroup for rsttrace's pod."""
    mount = cgroup2_mount()
    assert mount and os.access(mount, os.W_OK), f"need a writable cgroup2 hierarchy (found {mount!r})"
    uid, cid = str(uuid.uuid4()), secrets.token_hex(32)
    top = f"/rsttrace-t-{secrets.token_hex(4)}"
    pod_cgroup = (f"{top}/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid.replace('-', '_')}"
                  f".slice/cri-containerd-{cid}.scope")
    agent_cgroup = f"{top}/agent"
    os.makedirs(mount + pod_cgroup)
    os.makedirs(mount + agent_cgroup)
    bundle = tmp_path / CONTAINERD_BUNDLES / cid
    bundle.mkdir(parents=True)
    (bundle / "config.json").write_text(json.dumps({
        "ociVersion": "1.2.0", "process": {"args": ["python3", "server.py"], "cwd": "/"}, "root": {"path": "rootfs"},
        "annotations": {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.container-name": "api",
                        "io.kubernetes.cri.sandbox-id": secrets.token_hex(32), "io.kubernetes.cri.sandbox-name": "api-0",
                        "io.kubernetes.cri.sandbox-namespace": "shop", "io.kubernetes.cri.sandbox-uid": uid}}))
    yield {"mount": mount, "uid": uid, "cid": cid, "pod_cgroup": pod_cgroup, "agent_cgroup": agent_cgroup,
           "runtime_root": str(tmp_path)}
    for path in sorted((d for d, _, _ in os.walk(mount + top)), key=len, reverse=True):
        with open(os.path.join(path, "cgroup.procs")) as f:          # anything left: back to the root
            for pid in f.read().split():
                with open(os.path.join(mount, "cgroup.procs"), "w") as root_procs:
                    root_procs.write(pid)
        os.rmdir(path)


def as_daemonset(node: dict, caps: list[str], seccomp: bool) -> list[str]:
    """The argv prefix that puts rsttrace where the DaemonSet puts it."""
    procs = f"{node['mount']}{node['agent_cgroup']}/cgroup.procs"
    setpriv = ["setpriv", "--inh-caps=-all", "--bounding-set=-all," + ",".join(f"+{c}" for c in caps), "--"]
    profile = [sys.executable, str(APPLY_PROFILE), str(PROFILE)] if seccomp else []
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            f'mount -t tmpfs -o mode=0700 tmpfs /run/rsttrace && echo $$ > {procs} && exec unshare --cgroup "$@"',
            "sh", *setpriv, *profile]


def start(node: dict, caps: list[str], *args: str, seccomp: bool = False, validator=None) -> Tracer:
    env = dict(os.environ, RSTTRACE_RUNTIME_ROOT=node["runtime_root"])
    return Tracer(["--json", *args], validator, env=env, argv_prefix=as_daemonset(node, caps, seccomp))


def reset_in_the_pod(node: dict, netns) -> dict:
    """A client that gives up on a server (client_abort): both in the pod's cgroup, as nobody."""
    procs = f"{node['mount']}{node['pod_cgroup']}/cgroup.procs"
    out = subprocess.run(["sh", "-c", f'echo $$ > {procs} && exec ip netns exec {netns.name} setpriv '
                          f'--reuid={NOBODY} --regid={NOBODY} --clear-groups /usr/bin/python3 {SCENARIOS} '
                          f'client_abort 127.0.0.1 {PORT}'], capture_output=True, text=True, check=True, timeout=30)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_as_a_daemonset_rsttrace_names_the_pod_and_every_process_with_only_the_manifests_privileges(
        node, netns, validator):
    t = start(node, manifest_capabilities(), "--port", f"{PORT},{FIREWALL_PORT}", "--origins",
              "--metrics", f"127.0.0.1:{METRICS_PORT}", seccomp=True, validator=validator)
    t.wait_attached(timeout=120)
    facts = reset_in_the_pod(node, netns)
    with ClosedService(backend="nft", answer="tcp-reset", connections=1, port=FIREWALL_PORT) as s:
        s.run()
        with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10) as answer:
            metrics = answer.read().decode()
        records = t.stop()          # before the netns goes: its ruleset is read when the event is
    assert 'rsttrace_events_total{event="rst_received"' in metrics
    assert t.returncode == 0, t.stderr_lines
    assert not [line for line in t.stderr_lines if "cache not used" in line or "Traceback" in line], t.stderr_lines

    cgroup = {"id": os.stat(node["mount"] + node["pod_cgroup"]).st_ino, "path": node["pod_cgroup"]}
    container = {"id": node["cid"], "runtime": "containerd", "pod_uid": node["uid"],
                 "pod": {"namespace": "shop", "name": "api-0", "container": "api"}}
    # The client's abort: process context, the task itself (it exits at once: its cgroup is not read).
    [sent] = events(records, event="rst_sent", local__port=facts["client_port"])
    assert sent["reason"] == "linger_zero" and sent["context"] == "process"
    assert (sent["process"]["pid"], sent["process"]["uid"]) == (facts["client_pid"], NOBODY)
    # The server learns of it in softirq (kallsyms: CAP_SYSLOG), after it closed: the listener of its
    # port, found by an inet_diag dump in its netns (setns: CAP_SYS_ADMIN; /proc/PID/ns/net:
    # CAP_SYS_PTRACE) and the fd links of a process of another user (CAP_DAC_READ_SEARCH).
    [received] = events(records, event="rst_received", local__port=PORT)
    assert received["context"] == "softirq" and received["netns"]["name"] == netns.name
    assert received["process"] == {"pid": facts["server_pid"], "comm": "python3", "uid": NOBODY,
                                   "source": "port_listener", "cgroup": cgroup, "container": container}
    # The REJECT of another netns, read by nft through nsenter (CAP_NET_ADMIN) under the profile.
    [reject] = events(records, event="rst_sent", reason="firewall_reject")
    assert [r["table"] for r in reject["firewall"]["rules"]] == ["rtp_fw"], reject["firewall"]


def lost_feature(name: str, node: dict, netns, caps: list[str]) -> None:
    """Run rsttrace without capability `name` and see what docs/service.md says goes with it."""
    if name in ("bpf", "perfmon"):      # CAP_SYS_ADMIN implies both: without the pair nothing loads
        t = start(node, [c for c in caps if c not in (name, "sys_admin")])
        t.proc.wait(timeout=120)
        t.stop()
        assert t.returncode == 4 and "refuses to load BPF" in t.stderr_lines[-1], t.stderr_lines
        return
    t = start(node, [c for c in caps if c != name], "--port", f"{PORT},{FIREWALL_PORT}", "--origins")
    t.wait_attached(timeout=120)
    if name == "net_admin":
        with ClosedService(backend="nft", answer="tcp-reset", connections=1, port=FIREWALL_PORT) as s:
            s.run()
            records = t.stop()
        [reject] = events(records, event="rst_sent", reason="firewall_reject")
        assert reject["firewall"]["rules"] == [] and reject["firewall"]["how"].startswith("nft failed"), reject
        return
    facts = reset_in_the_pod(node, netns)
    [received] = events(t.stop(), event="rst_received", local__port=PORT)
    if name == "syslog":
        assert received["context"] == "process" and received["process"]["pid"] == facts["server_pid"]
    else:                               # sys_admin, sys_ptrace, dac_read_search
        assert received["context"] == "softirq" and received["process"] is None


PROVEN = ("bpf", "perfmon", "sys_admin", "net_admin", "sys_ptrace", "dac_read_search", "syslog")


@pytest.mark.parametrize("name", PROVEN)
def test_each_capability_of_the_manifest_is_needed(node, netns, name):
    caps = manifest_capabilities()
    assert name in caps
    lost_feature(name, node, netns, caps)


def test_the_manifest_asks_for_no_capability_that_is_not_proven_needed():
    assert sorted(manifest_capabilities()) == sorted(PROVEN)
