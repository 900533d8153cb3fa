"""Pod names of Kubernetes containers, read as a node lays them out: /proc/<pid>/cgroup paths as the
kubelet's systemd and cgroupfs drivers name them, and the OCI bundles containerd and CRI-O write
(tracer/enrich/pods.py); and the cgroup paths of host processes as rsttrace reads them from a
container with its own cgroup namespace (tracer/enrich/cgroups.py)."""
from __future__ import annotations

import json
import os
import secrets
import uuid
from pathlib import Path

import jsonschema
import pytest

from test_records import sample_event
from tracer.enrich.cgroups import Cgroups, below, cgroup2_mount_and_root, host_path, namespace_root
from tracer.enrich.pods import CONTAINERD_BUNDLES, CRIO_CONTAINERS, MAX_CONFIG_BYTES, Pods
from tracer.sinks import records
from tracer.sinks.ecs import event_document, host_fields
from tracer.sinks.otlp import event_attributes

REPO = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((REPO / "schema" / "rsttrace-v1.schema.json").read_text())
ECS_SCHEMA = json.loads((REPO / "schema" / "rsttrace-ecs-v1.schema.json").read_text())


def oci_spec(annotations: dict) -> dict:
    """An OCI runtime spec as the runtimes write it: the annotations among everything else."""
    return {"ociVersion": "1.2.0", "process": {"user": {"uid": 0, "gid": 0}, "args": ["nginx", "-g", "daemon off;"],
                                               "cwd": "/"},
            "root": {"path": "rootfs"}, "hostname": "web", "mounts": [{"destination": "/proc", "type": "proc"}],
            "annotations": annotations, "linux": {"cgroupsPath": "kubepods-burstable-pod.slice:cri-containerd:x"}}


class Node:
    """A fake node root: the runtimes' state below it, /proc/<pid>/cgroup of its processes."""

    def __init__(self, root: Path):
        self.root = root
        self.proc = root / "proc"
        self.next_pid = 100

    def containerd(self, cid: str, namespace: str, pod: str, uid: str, container: str | None) -> None:
        annotations = {"io.kubernetes.cri.container-type": "container" if container else "sandbox",
                       "io.kubernetes.cri.sandbox-id": secrets.token_hex(32),
                       "io.kubernetes.cri.sandbox-namespace": namespace, "io.kubernetes.cri.sandbox-name": pod,
                       "io.kubernetes.cri.sandbox-uid": uid}
        if container:
            annotations.update({"io.kubernetes.cri.container-name": container,
                                "io.kubernetes.cri.image-name": "docker.io/library/nginx:1.27"})
        bundle = self.root / CONTAINERD_BUNDLES / cid
        bundle.mkdir(parents=True)
        (bundle / "rootfs").mkdir()
        (bundle / "config.json").write_text(json.dumps(oci_spec(annotations)))

    def crio(self, cid: str, namespace: str, pod: str, uid: str, container: str, where: str) -> None:
        labels = {"io.kubernetes.pod.namespace": namespace, "io.kubernetes.pod.name": pod,
                  "io.kubernetes.pod.uid": uid, "io.kubernetes.container.name": container}
        annotations = {**labels, "io.container.manager": "cri-o", "io.kubernetes.cri-o.ContainerType": "container",
                       "io.kubernetes.cri-o.Labels": json.dumps(labels), "io.kubernetes.cri-o.ContainerID": cid}
        userdata = self.root / where / cid / "userdata"
        userdata.mkdir(parents=True)
        (userdata / "config.json").write_text(json.dumps(oci_spec(annotations)))

    def process(self, v2_path: str) -> int:
        pid = self.next_pid
        self.next_pid += 1
        (self.proc / str(pid)).mkdir(parents=True)
        (self.proc / str(pid) / "cgroup").write_text(f"0::{v2_path}\n")
        return pid


@pytest.fixture
def node(tmp_path):
    return Node(tmp_path)


def cgroups_on(node: Node, **kw) -> Cgroups:
    return Cgroups(proc=str(node.proc), pods=Pods(root=str(node.root), **kw))


def test_containerd_pod_with_the_systemd_driver_names_namespace_pod_and_container(node):
    uid, cid = str(uuid.uuid4()), secrets.token_hex(32)
    node.containerd(cid, "shop", "web-7d9f8b6c5-x2kqp", uid, "nginx")
    pid = node.process(f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid.replace('-', '_')}.slice"
                       f"/cri-containerd-{cid}.scope")
    _, container = cgroups_on(node).of(pid)
    assert container == {"id": cid, "runtime": "containerd", "pod_uid": uid,
                         "pod": {"namespace": "shop", "name": "web-7d9f8b6c5-x2kqp", "container": "nginx"}}


def test_crio_pod_is_found_in_the_run_and_in_the_data_directory(node):
    cgroups = cgroups_on(node)
    for where in CRIO_CONTAINERS:
        uid, cid = str(uuid.uuid4()), secrets.token_hex(32)
        node.crio(cid, "payments", "api-0", uid, "api", where)
        pid = node.process(f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid.replace('-', '_')}"
                           f".slice/crio-{cid}.scope")
        _, container = cgroups.of(pid)
        assert container["runtime"] == "cri-o"
        assert container["pod"] == {"namespace": "payments", "name": "api-0", "container": "api"}


def test_cgroupfs_driver_names_no_runtime_and_either_runtimes_state_answers(node):
    cgroups = cgroups_on(node)
    uid1, cid1, uid2, cid2 = str(uuid.uuid4()), secrets.token_hex(32), str(uuid.uuid4()), secrets.token_hex(32)
    node.containerd(cid1, "shop", "cart-5", uid1, "cart")
    node.crio(cid2, "shop", "db-0", uid2, "postgres", CRIO_CONTAINERS[0])
    _, first = cgroups.of(node.process(f"/kubepods/burstable/pod{uid1}/{cid1}"))
    _, second = cgroups.of(node.process(f"/kubepods/pod{uid2}/{cid2}"))
    assert (first["runtime"], first["pod"]["name"], first["pod"]["container"]) == (None, "cart-5", "cart")
    assert (second["runtime"], second["pod"]["name"], second["pod"]["container"]) == (None, "db-0", "postgres")


def test_the_pods_sandbox_has_the_pods_names_and_no_container_name(node):
    uid, cid = str(uuid.uuid4()), secrets.token_hex(32)
    node.containerd(cid, "shop", "web-1", uid, None)
    pid = node.process(f"/kubepods.slice/kubepods-pod{uid.replace('-', '_')}.slice/cri-containerd-{cid}.scope")
    _, container = cgroups_on(node).of(pid)
    assert container["pod"] == {"namespace": "shop", "name": "web-1", "container": None}


def test_containers_outside_kubernetes_are_not_looked_up(node):
    pods = Pods(root=str(node.root))
    cgroups = Cgroups(proc=str(node.proc), pods=pods)
    cid = secrets.token_hex(32)
    _, docker = cgroups.of(node.process(f"/system.slice/docker-{cid}.scope"))
    _, host = cgroups.of(node.process("/user.slice/user-1000.slice/session-3.scope"))
    assert docker == {"id": cid, "runtime": "docker", "pod_uid": None} and host is None
    assert pods.reads == 0


def test_a_container_is_read_once_and_a_miss_again_only_after_retry_s(node):
    uid, cid, gone = str(uuid.uuid4()), secrets.token_hex(32), secrets.token_hex(32)
    node.containerd(cid, "shop", "web-1", uid, "nginx")
    pods = Pods(root=str(node.root), retry_s=3600)
    container = {"id": cid, "runtime": "containerd", "pod_uid": uid}
    assert pods.of(container)["name"] == "web-1" and pods.reads == 1
    # The bundle is removed when the container stops: its late events keep the names.
    os.remove(node.root / CONTAINERD_BUNDLES / cid / "config.json")
    assert pods.of(container)["name"] == "web-1" and pods.reads == 1
    missing = {"id": gone, "runtime": None, "pod_uid": uid}
    assert pods.of(missing) is None and pods.reads == 4        # containerd's bundle, CRI-O's two places
    assert pods.of(missing) is None and pods.reads == 4        # not asked again before retry_s
    eager = Pods(root=str(node.root), retry_s=0)
    assert eager.of(missing) is None and eager.of(missing) is None and eager.reads == 6


def test_the_cache_is_bounded(node):
    uid = str(uuid.uuid4())
    ids = [secrets.token_hex(32) for _ in range(3)]
    for i, cid in enumerate(ids):
        node.containerd(cid, "shop", f"web-{i}", uid, "nginx")
    pods = Pods(root=str(node.root), max_entries=2)
    for cid in ids + ids[-1:]:
        pods.of({"id": cid, "runtime": "containerd", "pod_uid": uid})
    assert pods.reads == 3
    assert pods.of({"id": ids[0], "runtime": "containerd", "pod_uid": uid})["name"] == "web-0" and pods.reads == 4


@pytest.mark.parametrize("content", [
    b"{not json",
    json.dumps({"ociVersion": "1.2.0"}).encode(),                                     # no annotations
    json.dumps(oci_spec({"io.kubernetes.cri.container-name": "nginx"})).encode(),     # no pod names
    json.dumps(oci_spec({"io.kubernetes.cri.sandbox-namespace": 7, "io.kubernetes.cri.sandbox-name": ["x"]})).encode(),
    json.dumps([1, 2]).encode(),
    b" " * (MAX_CONFIG_BYTES + 1),
])
def test_a_bundle_that_names_no_pod_gives_none_and_never_raises(node, content):
    cid, uid = secrets.token_hex(32), str(uuid.uuid4())
    bundle = node.root / CONTAINERD_BUNDLES / cid
    bundle.mkdir(parents=True)
    (bundle / "config.json").write_bytes(content)
    assert Pods(root=str(node.root)).of({"id": cid, "runtime": "containerd", "pod_uid": uid}) is None


def test_an_unreadable_bundle_gives_none(node):
    cid, uid = secrets.token_hex(32), str(uuid.uuid4())
    (node.root / CONTAINERD_BUNDLES / cid / "config.json").mkdir(parents=True)      # EISDIR
    assert Pods(root=str(node.root)).of({"id": cid, "runtime": "containerd", "pod_uid": uid}) is None


# --- cgroup paths read from a container's own cgroup namespace ---------------------------------------

# /proc/self/mountinfo inside a container with its own cgroup namespace: the runtime's cgroup2 mount
# (root: the container's own cgroup), hidden by a bind mount of the host's hierarchy at the same
# point (the DaemonSet's hostPath), whose root reads as the way up to the host's root.
POD_MOUNTINFO = """\
1021 1015 0:27 / /sys/fs/cgroup ro,nosuid,nodev,noexec,relatime - cgroup2 cgroup rw,nsdelegate
1040 1015 0:27 /../../.. /sys/fs/cgroup ro,relatime master:9 - cgroup2 cgroup2 rw,nsdelegate
1041 1015 0:5 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
"""
HOST_MOUNTINFO = """\
31 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
"""
HYBRID_MOUNTINFO = """\
30 23 0:25 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:8 - tmpfs tmpfs ro,mode=755
41 30 0:38 / /sys/fs/cgroup/unified rw,relatime shared:11 - cgroup2 cgroup2 rw
42 30 0:39 / /sys/fs/cgroup/memory rw,relatime shared:12 - cgroup cgroup rw,memory
"""


@pytest.mark.parametrize("text, found", [
    (POD_MOUNTINFO, ("/sys/fs/cgroup", "/../../..")),
    (HOST_MOUNTINFO, ("/sys/fs/cgroup", "/")),
    (HYBRID_MOUNTINFO, ("/sys/fs/cgroup/unified", "/")),
    ("", None),
])
def test_the_visible_cgroup2_mount_and_the_cgroup_it_shows(tmp_path, text, found):
    path = tmp_path / "mountinfo"
    path.write_text(text)
    assert cgroup2_mount_and_root(str(path)) == found


@pytest.mark.parametrize("path, ns_root, host", [
    ("/kubepods.slice/x.scope", "/", "/kubepods.slice/x.scope"),                      # on the host
    ("/", "/", "/"),
    # rsttrace's pod at /kubepods.slice/p.slice/agent.scope: a neighbour, the host's root, itself
    ("/../../q.slice/x.scope", "/kubepods.slice/p.slice/agent.scope", "/kubepods.slice/q.slice/x.scope"),
    ("/../../..", "/kubepods.slice/p.slice/agent.scope", "/"),
    ("/", "/kubepods.slice/p.slice/agent.scope", "/kubepods.slice/p.slice/agent.scope"),
    # where the namespace's place is unknown: what leaves it cannot be placed
    ("/../../q.slice/x.scope", None, None),
    ("/x.scope", None, "/x.scope"),
])
def test_a_path_read_in_a_cgroup_namespace_is_placed_as_the_host_names_it(path, ns_root, host):
    assert host_path(path, ns_root) == host


@pytest.mark.parametrize("path, top, inside", [
    ("/kubepods.slice/x.scope", "/", "/kubepods.slice/x.scope"),
    ("/kubepods.slice/x.scope", "/kubepods.slice", "/x.scope"),
    ("/kubepods.slice", "/kubepods.slice", "/"),
    ("/kubepods.slicex/x.scope", "/kubepods.slice", None),
    ("/", "/kubepods.slice", None),
])
def test_a_cgroup_is_found_below_the_cgroup_a_mount_shows(path, top, inside):
    assert below(path, top) == inside


def test_in_the_hosts_own_cgroup_namespace_paths_are_left_as_read():
    assert namespace_root() in ("/", None)        # None: this host's pid 1 cannot be asked
    assert host_path("/system.slice/x.scope", namespace_root()) == "/system.slice/x.scope"


def test_a_host_process_seen_from_a_cgroup_namespace_keeps_its_path_when_not_mounted(node):
    cgroups = cgroups_on(node)
    cgroups.ns_root, cgroups.mount_shows = None, "/"
    uid, cid = str(uuid.uuid4()), secrets.token_hex(32)
    node.containerd(cid, "shop", "web-1", uid, "nginx")
    path = f"/../../kubepods.slice/kubepods-pod{uid.replace('-', '_')}.slice/cri-containerd-{cid}.scope"
    cgroup, container = cgroups.of(node.process(path))
    assert cgroup == {"id": None, "path": path}
    assert container["id"] == cid and container["pod"]["name"] == "web-1"


# --- the pod in every output -------------------------------------------------------------------------

def pod_event():
    ev = sample_event()
    uid, cid = str(uuid.uuid4()), "cd" * 32
    ev.process = {"pid": 42, "comm": "nginx", "uid": 33, "source": "task",
                  "cgroup": {"id": 9137, "path": f"/kubepods.slice/kubepods-pod{uid.replace('-', '_')}.slice"
                                                 f"/cri-containerd-{cid}.scope"},
                  "container": {"id": cid, "runtime": "containerd", "pod_uid": uid,
                                "pod": {"namespace": "shop", "name": "web-1", "container": "nginx"}}}
    return ev, uid, cid


def test_the_pod_validates_in_json_and_ecs_and_maps_to_their_fields():
    ev, uid, cid = pod_event()
    rec = records.event_record(ev)
    jsonschema.validate(rec, SCHEMA)
    doc = event_document(rec, host_fields())
    jsonschema.validate(doc, ECS_SCHEMA)
    assert doc["container"] == {"id": cid, "runtime": "containerd", "name": "nginx"}
    assert doc["orchestrator"] == {"type": "kubernetes", "namespace": "shop", "resource": {"type": "pod", "name": "web-1"}}
    attrs = event_attributes(rec, frozenset())
    assert (attrs["k8s.namespace.name"], attrs["k8s.pod.name"], attrs["k8s.container.name"], attrs["k8s.pod.uid"]) == \
        ("shop", "web-1", "nginx", uid)


def test_a_sandbox_and_a_pod_not_found_leave_the_names_they_lack_out():
    ev, uid, cid = pod_event()
    ev.process["container"]["pod"] = {"namespace": "shop", "name": "web-1", "container": None}
    rec = records.event_record(ev)
    jsonschema.validate(rec, SCHEMA)
    doc = event_document(rec, host_fields())
    assert "name" not in doc["container"] and doc["orchestrator"]["resource"]["name"] == "web-1"
    assert "k8s.container.name" not in event_attributes(rec, frozenset())
    ev.process["container"]["pod"] = None
    rec = records.event_record(ev)
    jsonschema.validate(rec, SCHEMA)
    doc = event_document(rec, host_fields())
    jsonschema.validate(doc, ECS_SCHEMA)
    assert "orchestrator" not in doc and "k8s.pod.name" not in event_attributes(rec, frozenset())
    ev.process["container"]["pod"] = {"namespace": "shop", "name": ""}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(records.event_record(ev), SCHEMA)
