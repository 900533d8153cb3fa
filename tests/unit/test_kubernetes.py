"""contrib/kubernetes without a cluster: the DaemonSet asks for exactly the capabilities and host paths
docs/service.md justifies, its seccomp profile is one the runtime can load and allows what rsttrace
needs, and the Containerfile installs what rsttrace imports and runs. (tests/kernel/test_daemonset.py
runs rsttrace with those privileges on the real kernel.)"""
from __future__ import annotations

import ast
import ctypes
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from tracer.enrich import firewall

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "contrib" / "kubernetes"
DOC = (REPO / "docs" / "service.md").read_text()


def section(title: str) -> str:
    start = DOC.index(f"## {title}\n")
    end = DOC.find("\n## ", start + 1)
    return DOC[start:end if end >= 0 else len(DOC)]


def table_first_column(text: str, header: str) -> list[str]:
    """The first column's `code` of each row of the table whose header row starts with `header`."""
    lines = text[text.index(f"| {header} |"):].splitlines()[2:]
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append(re.match(r"\| `([^`]+)`", line).group(1))
    return rows


@pytest.fixture(scope="module")
def pod():
    docs = list(yaml.safe_load_all((K8S / "rsttrace.yaml").read_text()))
    [ds] = [d for d in docs if d["kind"] == "DaemonSet"]
    [ns] = [d for d in docs if d["kind"] == "Namespace"]
    assert ds["metadata"]["namespace"] == ns["metadata"]["name"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    return ds["spec"]["template"]["spec"]


def test_the_capabilities_are_exactly_the_documented_ones_and_nothing_is_privileged(pod):
    [container] = pod["containers"]
    sc = container["securityContext"]
    documented = table_first_column(section("Kubernetes: a DaemonSet"), "capability")
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sorted(f"CAP_{c}" for c in sc["capabilities"]["add"]) == sorted(documented)
    assert sc["privileged"] is False and "allowPrivilegeEscalation" not in sc
    assert pod["hostPID"] is True and not pod.get("hostNetwork") and not pod.get("hostIPC")
    assert sc["readOnlyRootFilesystem"] is True


def test_every_host_path_is_documented_and_mounted_where_the_code_reads_it(pod):
    [container] = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    host_paths = {}
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "hostPath" in volume:
            # rsttrace reads the host's paths at the same place (RSTTRACE_RUNTIME_ROOT stays /)
            assert mount["mountPath"] == volume["hostPath"]["path"], mount
            host_paths[mount["mountPath"]] = mount
        else:
            assert "emptyDir" in volume, volume
    documented = table_first_column(section("Kubernetes: a DaemonSet"), "host access")
    assert sorted(documented) == sorted(["hostPID: true", *host_paths])
    assert len(volumes) == len(container["volumeMounts"])
    # Runtime state and netns names change while the pod runs: their mounts must follow the host's.
    for path in ("/run/netns", "/run/containerd/io.containerd.runtime.v2.task", "/run/containers/storage"):
        assert host_paths[path]["mountPropagation"] == "HostToContainer" and host_paths[path]["readOnly"]
    assert not host_paths["/run/rsttrace"].get("readOnly")


def test_the_runtime_state_mounted_is_where_pods_py_reads_it(pod):
    from tracer.enrich.pods import CONTAINERD_BUNDLES, CRIO_CONTAINERS
    mounted = [m["mountPath"] for m in pod["containers"][0]["volumeMounts"]]
    assert any(f"/{CONTAINERD_BUNDLES}".startswith(m + "/") for m in mounted)
    assert any(f"/{CRIO_CONTAINERS[0]}".startswith(m + "/") for m in mounted)
    assert "/run/containerd" not in mounted        # containerd's socket stays out of the pod


@pytest.fixture(scope="module")
def profile():
    return json.loads((K8S / "seccomp" / "rsttrace.json").read_text())


def test_the_pod_uses_the_shipped_seccomp_profile(pod, profile):
    sc = pod["containers"][0]["securityContext"]["seccompProfile"]
    assert sc == {"type": "Localhost", "localhostProfile": "rsttrace.json"}


def test_the_seccomp_profile_is_an_allow_list_that_libseccomp_knows(profile):
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO" and profile["defaultErrnoRet"] == 38    # ENOSYS
    assert "SCMP_ARCH_X86_64" in profile["architectures"]
    lib = ctypes.CDLL("libseccomp.so.2")
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    names = []
    for rule in profile["syscalls"]:
        assert rule["action"] == "SCMP_ACT_ALLOW" and not rule.get("args") and rule["comment"]
        assert rule["names"] == sorted(rule["names"])
        names += rule["names"]
    assert len(names) == len(set(names))
    unknown = [n for n in names if lib.seccomp_syscall_resolve_name(n.encode()) < 0]
    assert unknown == []
    # what rsttrace's features call (docs/service.md): BPF, tracepoints, entering netns, the listener poke
    assert {"bpf", "perf_event_open", "setns", "pidfd_open", "pidfd_getfd", "ioctl"} <= set(names)
    # and what no feature needs
    assert not {"ptrace", "init_module", "finit_module", "kexec_load", "reboot", "process_vm_writev"} & set(names)


def containerfile_packages() -> set[str]:
    text = (K8S / "Containerfile").read_text()
    install = re.search(r"apt-get install -y --no-install-recommends([^&]*)&&", text)
    return set(install.group(1).replace("\\", " ").split())


# Where rsttrace's imports and the tools it runs come from in Debian 12.
MODULE_PACKAGES = {"bcc": "python3-bpfcc", "click": "python3-click", "rich": "python3-rich",
                   "prometheus_client": "python3-prometheus-client"}
OPTIONAL_MODULES = {"orjson"}          # tracer/sinks/jsonenc.py: the standard library stands in
TOOL_PACKAGES = {"nsenter": "util-linux", "nft": "nftables", "conntrack": "conntrack",
                 "iptables-nft-save": "iptables", "ip6tables-nft-save": "iptables"}


def imported_modules() -> set[str]:
    found = set()
    for path in (REPO / "tracer").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"tracer"}


def tools_run() -> set[str]:
    source = Path(firewall.__file__).read_text()
    return (set(re.findall(r'_run\(\["([\w.-]+)"', source)) | set(re.findall(r'argv = \["([\w.-]+)"', source))
            | set(firewall.SAVE_TOOLS.values()))


def test_the_image_installs_what_rsttrace_imports_and_runs():
    packages = containerfile_packages()
    modules, tools = imported_modules(), tools_run()
    assert modules - OPTIONAL_MODULES <= set(MODULE_PACKAGES), "a new import: which Debian package has it?"
    assert {"nsenter", "nft", "conntrack"} <= tools and tools <= set(TOOL_PACKAGES), "a new tool: which package?"
    assert {MODULE_PACKAGES[m] for m in modules - OPTIONAL_MODULES} | {TOOL_PACKAGES[t] for t in tools} | {"python3"} \
        == packages


def test_the_image_is_debian_12_with_rsttrace_as_its_entrypoint():
    text = (K8S / "Containerfile").read_text()
    assert re.search(r"^FROM debian:bookworm-slim$", text, re.M)
    copied = re.findall(r"^COPY (\S+) /opt/rsttrace/\1$", text, re.M)
    assert sorted(copied) == ["bpf", "schema", "tracer"]
    assert 'ENTRYPOINT ["python3", "-m", "tracer"]' in text and "PYTHONPATH=/opt/rsttrace" in text


# What the Debian package depends on for a person or the host's services, not for rsttrace itself:
# the image leaves them out.
HOST_ONLY = {"iproute2": "the explanations' remedies (ss, ip netns) are run by a person on the host",
             "procps": "the systemd unit's ExecReload (kill) and logrotate's postrotate (pkill)"}


def test_the_image_has_the_debian_packages_dependencies():
    control = REPO / "debian" / "control"
    stanzas = control.read_text().split("\n\n")
    [binary] = [s for s in stanzas if re.search(r"^Package: rsttrace$", s, re.M)]
    depends = re.search(r"^Depends:(.*(?:\n .*)*)", binary, re.M).group(1)
    names = {re.split(r"[\s(]", d.strip())[0] for d in depends.replace("\n", " ").split(",")}
    names = {n for n in names if n and not n.startswith("$")}
    assert set(HOST_ONLY) <= names
    assert names - set(HOST_ONLY) <= containerfile_packages() | {"python3"}
