"""Which pod a Kubernetes container belongs to: its namespace, pod name and container name, read from
the container runtime's own state on the node.

The cgroup path names the container id and the pod's UID (cgroups.py), but no name, and the kubelet
keeps none on disk either (/var/lib/kubelet/pods/<uid>/ holds volumes, not metadata). The runtime
writes each container's OCI bundle before the container starts, and its config.json carries the
names as annotations:

    containerd  /run/containerd/io.containerd.runtime.v2.task/k8s.io/<id>/config.json
                io.kubernetes.cri.sandbox-namespace, io.kubernetes.cri.sandbox-name,
                io.kubernetes.cri.container-name
    CRI-O       /run/containers/storage/overlay-containers/<id>/userdata/config.json, and the same
                below /var/lib/containers/storage
                io.kubernetes.pod.namespace, io.kubernetes.pod.name, io.kubernetes.container.name

Sources: containerd's core/runtime/v2/bundle.go (a bundle is <state>/<namespace>/<id>, its spec in
config.json; the CRI plugin's namespace is k8s.io) and internal/cri/annotations/annotations.go
(DefaultCRIAnnotations); CRI-O's server/container_create.go (the spec saved in the container's run
and data directories), internal/factory/container/container.go (the kubelet's labels, from
kubernetes' pkg/kubelet/types/labels.go, copied into the annotations), and containers/storage's
store.go (<root>/<driver>-containers/<id>/userdata; CRI-O's default driver is overlay).

The pod's sandbox ("pause") container has the pod's names and no container name.
"""
from __future__ import annotations

import json
import os
import time
from collections import OrderedDict

CONTAINERD_BUNDLES = "run/containerd/io.containerd.runtime.v2.task/k8s.io"
CRIO_CONTAINERS = ("run/containers/storage/overlay-containers", "var/lib/containers/storage/overlay-containers")

# (namespace, pod name, container name) annotation keys, per runtime.
CONTAINERD_KEYS = ("io.kubernetes.cri.sandbox-namespace", "io.kubernetes.cri.sandbox-name",
                   "io.kubernetes.cri.container-name")
CRIO_KEYS = ("io.kubernetes.pod.namespace", "io.kubernetes.pod.name", "io.kubernetes.container.name")

MAX_CONFIG_BYTES = 4 << 20    # an OCI spec is tens of KB; anything bigger is not one


def bundle_configs(root: str, container_id: str, runtime: str | None) -> list[tuple[str, tuple[str, str, str]]]:
    """Where each runtime that may run this container keeps its config.json, with its annotation keys.
    A container of unknown runtime (kubepods' cgroupfs driver names only the id) may be either's."""
    out = []
    if runtime in ("containerd", None):
        out.append((os.path.join(root, CONTAINERD_BUNDLES, container_id, "config.json"), CONTAINERD_KEYS))
    if runtime in ("cri-o", None):
        out += [(os.path.join(root, d, container_id, "userdata", "config.json"), CRIO_KEYS) for d in CRIO_CONTAINERS]
    return out


def pod_of_annotations(annotations: dict, keys: tuple[str, str, str]) -> dict | None:
    """{"namespace", "name", "container"} from a bundle's annotations; None without the pod's names."""
    namespace, name, container = (annotations.get(k) for k in keys)
    if not isinstance(namespace, str) or not isinstance(name, str) or not namespace or not name:
        return None
    return {"namespace": namespace, "name": name, "container": container if isinstance(container, str) and container else None}


def read_pod(path: str, keys: tuple[str, str, str]) -> dict | None:
    """The pod named by the OCI spec at `path`; None where it is missing, unreadable or names none."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            return None
        spec = json.loads(data)
    except (OSError, ValueError):
        return None
    annotations = spec.get("annotations") if isinstance(spec, dict) else None
    return pod_of_annotations(annotations, keys) if isinstance(annotations, dict) else None


class Pods:
    """container id → pod, read once per container: a container's names never change, and its bundle
    is removed when it stops (its late events keep the names found while it ran). A miss (another
    runtime, state kept elsewhere) is asked again after `retry_s`, not at every event of a storm.

    `root`: where the node's / is (RSTTRACE_RUNTIME_ROOT, default /): the DaemonSet mounts the host's
    runtime state at the same paths (contrib/kubernetes/rsttrace.yaml)."""

    def __init__(self, root: str | None = None, retry_s: float = 10.0, max_entries: int = 4096):
        self.root = root if root is not None else os.environ.get("RSTTRACE_RUNTIME_ROOT", "/")
        self.retry_s = retry_s
        self.max_entries = max_entries
        self._known: OrderedDict[str, tuple[float, dict | None]] = OrderedDict()
        self.reads = 0

    def of(self, container: dict | None) -> dict | None:
        """The pod of a container as cgroups.container_of() names it; None outside Kubernetes (no pod
        UID in its cgroup path: no look-up) or where the runtime's state names none."""
        if not container or not container.get("pod_uid") or container.get("runtime") not in ("containerd", "cri-o", None):
            return None
        cid = container["id"]
        now = time.monotonic()
        hit = self._known.get(cid)
        if hit is not None and (hit[1] is not None or now - hit[0] < self.retry_s):
            self._known.move_to_end(cid)
            return hit[1]
        found = None
        for path, keys in bundle_configs(self.root, cid, container.get("runtime")):
            self.reads += 1
            found = read_pod(path, keys)
            if found:
                break
        self._known[cid] = (now, found)
        self._known.move_to_end(cid)
        while len(self._known) > self.max_entries:
            self._known.popitem(last=False)
        return found
