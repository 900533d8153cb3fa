"""Attribution parsing: container ids from cgroup paths, /proc/PID/cgroup, which listener takes a
connection, --netns values, and the filters that use them."""
from __future__ import annotations

import os

import pytest

from tracer.enrich.attribution import match_listeners, resolve_netns
from tracer.enrich.listeners import host_netns_path
from tracer.enrich.cgroups import Cgroups, container_of, container_of_paths, parse_proc_cgroup, path_matches

ID = "3f2a" + "0123456789abcdef" * 3 + "0123456789ab"    # 64 hex
POD = "8c1b5f8e-4d3c-4b7a-9e2f-0a1b2c3d4e5f"


@pytest.mark.parametrize("path, runtime, pod", [
    (f"/system.slice/docker-{ID}.scope", "docker", None),                              # systemd driver
    (f"/docker/{ID}", "docker", None),                                                 # cgroupfs driver
    (f"/system.slice/containerd.service/kubepods-burstable-pod{POD.replace('-', '_')}.slice:cri-containerd:{ID}",
     None, None),   # not a path rsttrace knows: no guess
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD.replace('-', '_')}.slice/"
     f"cri-containerd-{ID}.scope", "containerd", POD),
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{POD.replace('-', '_')}.slice/"
     f"crio-{ID}.scope", "cri-o", POD),
    (f"/kubepods/burstable/pod{POD}/{ID}", None, POD),                                # cgroupfs driver
    (f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope", "podman", None),
    (f"/machine.slice/libpod-{ID}.scope/container", "podman", None),                   # below the scope
    (f"/libpod_parent/libpod-{ID}", "podman", None),
])
def test_container_id_and_runtime_from_cgroup_path(path, runtime, pod):
    found = container_of(path)
    if path.endswith(f":{ID}"):
        assert found is None
        return
    assert found == {"id": ID, "runtime": runtime, "pod_uid": pod}


@pytest.mark.parametrize("path", [
    "/", "/user.slice/user-0.slice/session-3.scope", "/system.slice/docker.service",
    f"/machine.slice/libpod-conmon-{ID}.scope",         # podman's monitor, not the container
    f"/system.slice/crio-conmon-{ID}.scope",
    f"/{ID}",                                           # a bare id with no runtime around it
    "/process_api/5395ab7465a0d2b9853d6575e8bab325",    # 32 hex: some other agent's cgroup
])
def test_no_container_where_the_path_names_none(path):
    assert container_of(path) is None


def test_hybrid_host_v1_lines_name_the_container_when_v2_does_not():
    text = f"12:memory:/docker/{ID}\n1:name=systemd:/docker/{ID}\n0::/\n"
    v2, paths = parse_proc_cgroup(text)
    assert v2 == "/"
    assert container_of_paths(v2, paths)["id"] == ID


def test_cgroup_v1_only_host_has_no_v2_path():
    v2, paths = parse_proc_cgroup("4:memory:/a\n1:name=systemd:/b\n")
    assert v2 is None and paths == ["/a", "/b"]


def test_cgroups_reads_a_live_process_and_remembers_it_after_exit(tmp_path):
    proc = tmp_path / "proc"
    (proc / "42").mkdir(parents=True)
    (proc / "42" / "cgroup").write_text(f"0::/system.slice/docker-{ID}.scope\n")
    cg = Cgroups(proc=str(proc))
    cg.mount = None                              # no cgroup2 mount to stat: the id stays unknown
    cgroup, container = cg.of(42)
    assert cgroup == {"id": None, "path": f"/system.slice/docker-{ID}.scope"} and container["id"] == ID
    (proc / "42" / "cgroup").unlink()            # the process exits
    assert cg.of(42) == (cgroup, container) and cg.reads == 1
    assert cg.of(43) == (None, None)


def test_cgroup_id_is_the_inode_of_this_process_cgroup_directory():
    cg = Cgroups()
    cgroup, _ = cg.of(os.getpid())
    assert cgroup is not None and cg.mount
    assert cgroup["id"] == os.stat(cg.mount + (cgroup["path"] if cgroup["path"] != "/" else "")).st_ino


@pytest.mark.parametrize("path, prefix, ok", [
    ("/system.slice/docker-x.scope", "/system.slice", True),
    ("/system.slice/docker-x.scope", "/system.slice/", True),
    ("/system.slice/docker-x.scope", "/system.slice/docker-x.scope", True),
    ("/system.slicex/a", "/system.slice", False),           # whole components only
    ("/system.slice/docker-x.scope", "/system.slice/docker", False),
    ("/anything", "/", True),
    (None, "/", False),                                       # unknown cgroup never matches
])
def test_cgroup_prefix_matches_whole_components(path, prefix, ok):
    assert path_matches(path, prefix) is ok


@pytest.mark.parametrize("rows, addr, want", [
    ([("127.0.0.1", 8080, 1), ("0.0.0.0", 8081, 2)], "127.0.0.1", [1]),
    ([("0.0.0.0", 8080, 3)], "10.1.2.3", [3]),                         # wildcard
    ([("::", 8080, 4)], "127.0.0.1", [4]),                             # dual-stack wildcard
    ([("::ffff:127.0.0.1", 8080, 5)], "127.0.0.1", [5]),               # IPv4-mapped
    ([("::1", 8080, 6), ("127.0.0.2", 8080, 7)], "127.0.0.1", []),     # bound elsewhere
    ([("::1", 8080, 8)], "::1", [8]),
])
def test_listener_that_takes_a_connection_to_addr_port(rows, addr, want):
    assert match_listeners(rows, addr, 8080) == want


def test_netns_values(tmp_path):
    assert resolve_netns("4026531840") == 4026531840
    assert resolve_netns("host") == os.stat(host_netns_path()).st_ino
    assert resolve_netns(f"/proc/{os.getpid()}/ns/net") == os.stat("/proc/self/ns/net").st_ino
    for bad in ("0", "no-such-netns-here", str(tmp_path / "missing")):
        with pytest.raises(ValueError, match="no network namespace"):
            resolve_netns(bad)


def test_owner_index_rebuilds_keep_to_their_cpu_budget():
    """On a host with many sockets a /proc fd scan is expensive: it is refused, not queued, while
    the last one's cost says the budget (10% of a core) is spent."""
    import time as _time
    from tracer.enrich.attribution import SocketOwners
    owners = SocketOwners()
    owners.refresh_for([(1, _time.monotonic_ns())])          # an unknown socket: one real rebuild
    assert owners.rebuilds == 1
    owners._last_cost_ns = 500_000_000                        # as if that scan had taken 0.5 s
    owners.refresh_for([(2, _time.monotonic_ns())])
    assert (owners.rebuilds, owners.skipped) == (1, 1)        # next one only 5 s after the last
    owners._last_cost_ns = 0
    owners.refresh_for([(3, _time.monotonic_ns())])
    assert owners.rebuilds == 2
