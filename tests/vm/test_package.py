"""The Debian package on a machine that never saw the repository: scripts/package builds
rsttrace_VERSION_all.deb; debootstrap makes a fresh Debian 12 root; `apt-get install ./rsttrace_*.deb`
in it (chroot on this host) pulls every Depends from Debian's mirror; then Debian 12's 6.1 kernel
boots that root (virtme-ng, as in tests/vm/test_debian61.py) and scripts/vm/package-check runs the
installed rsttrace there: doctor, explain, the completion, and two real RSTs traced on loopback.

Nothing is cached between runs: each run builds, bootstraps and installs afresh, as a CI machine
would. Needs deb.debian.org (as scripts/setup does). The root lives in WORK and is removed at the
end, after checking that nothing is still mounted inside it.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from conftest import REPO

WORK = Path("/var/tmp/rsttrace-package-test")
MIRROR = os.environ.get("RSTTRACE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
DEB = f"rsttrace_{VERSION}_all.deb"


def mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mounts") as f:
        points = [line.split()[1].replace("\\040", " ") for line in f]
    return sorted((p for p in points if p == str(path) or p.startswith(f"{path}/")), key=len, reverse=True)


def unmount_all(path: Path) -> None:
    for point in mounts_under(path):
        subprocess.run(["umount", "-l", point], check=False)


def remove_root(path: Path) -> None:
    unmount_all(path)
    # rm -rf across a mount would delete what is mounted there: never go on with one left.
    assert not mounts_under(path), f"still mounted under {path}: {mounts_under(path)}"
    shutil.rmtree(path, ignore_errors=False)


@pytest.fixture(scope="module")
def work(root):
    if WORK.exists():
        remove_root(WORK)
    WORK.mkdir(parents=True)
    yield WORK
    remove_root(WORK)


@pytest.fixture(scope="module")
def built(work):
    """The .deb as scripts/package makes it, and what lintian said about it."""
    out = work / "dist"
    p = subprocess.run([str(REPO / "scripts" / "package"), str(out)], capture_output=True, text=True, timeout=900)
    print(p.stderr[-4000:])
    assert p.returncode == 0, p.stderr[-4000:]
    deb = out / DEB
    assert deb.is_file()
    tree = work / "extracted"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True, timeout=60)
    fields = {}
    for name in ("Package", "Version", "Architecture", "Depends", "Recommends", "Suggests"):
        fields[name] = subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True,
                                      check=True).stdout.strip()
    return {"deb": deb, "tree": tree, "fields": fields, "lintian": p.stderr}


@pytest.fixture(scope="module")
def installed(built, work):
    """A fresh Debian 12 root with the package installed from the .deb alone."""
    rootfs = work / "root"
    p = subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), MIRROR],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    shutil.copy(built["deb"], rootfs / "tmp" / DEB)
    policy = rootfs / "usr" / "sbin" / "policy-rc.d"      # no service starts in a chroot
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    # debootstrap made /dev's nodes; only /proc is mounted, and always unmounted.
    subprocess.run(["mount", "-t", "proc", "proc", str(rootfs / "proc")], check=True)
    try:
        p = subprocess.run(["chroot", str(rootfs), "/bin/sh", "-c",
                            f"cd /tmp && apt-get update -qq && apt-get install -y ./{DEB}"],
                           capture_output=True, text=True, timeout=900,
                           env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive",
                                "LC_ALL": "C.UTF-8"})
        status = subprocess.run(["chroot", str(rootfs), "dpkg-query", "-W", "-f=${Status} ${Version}", "rsttrace"],
                                capture_output=True, text=True, timeout=60)
        headers = subprocess.run(["chroot", str(rootfs), "dpkg-query", "-W", "-f=${Package}\n", "linux-headers-*"],
                                 capture_output=True, text=True, timeout=60)
        # Then systemd, as a booted Debian has it, for the unit's verification (not for the VM: vng boots its own init).
        systemd = subprocess.run(["chroot", str(rootfs), "apt-get", "install", "-y", "--no-install-recommends", "systemd"],
                                 capture_output=True, text=True, timeout=600,
                                 env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive"})
    finally:
        subprocess.run(["umount", str(rootfs / "proc")], check=False)
    assert not mounts_under(rootfs)
    policy.unlink()
    (rootfs / "tmp" / DEB).unlink()
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert systemd.returncode == 0, systemd.stdout[-3000:] + systemd.stderr[-3000:]
    return {"root": rootfs, "apt": p.stdout, "status": status.stdout, "headers": headers.stdout.split()}


@pytest.fixture(scope="module")
def report(installed):
    """scripts/vm/package-check's findings, from the installed root booted on Debian 12's 6.1 kernel."""
    subprocess.run([str(REPO / "scripts" / "vm" / "setup")], check=True, timeout=900)
    kernels = sorted(Path("/boot").glob("vmlinuz-6.1.*-amd64"))
    assert kernels, "no /boot/vmlinuz-6.1.*-amd64: scripts/vm/setup installs it"
    rootfs = installed["root"]
    shutil.copy(REPO / "scripts" / "vm" / "package-check", rootfs / "root" / "package-check")
    result = rootfs / "root" / "package-report.json"
    # --rw: the guest writes its report into the root it boots, a throwaway copy of nobody's system.
    p = subprocess.run(["vng", "-r", str(kernels[-1]), "--root", str(rootfs), "--rw", "--disable-kvm",
                        "--memory", "3G", "--cpus", "2", "--exec", "python3 /root/package-check /root/package-report.json"],
                       capture_output=True, text=True, timeout=1500,
                       env={**os.environ, "PATH": f"/opt/vng/bin:{os.environ['PATH']}"})
    print(p.stdout[-4000:])
    assert result.exists(), "the VM produced no report: " + p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(result.read_text())


# -- the package as built ---------------------------------------------------------------------------

def test_package_is_named_and_versioned_from_pyproject(built):
    f = built["fields"]
    assert built["deb"].name == f"rsttrace_{VERSION}_all.deb"
    assert (f["Package"], f["Version"], f["Architecture"]) == ("rsttrace", VERSION, "all")


def test_depends_are_debians_own_packages_and_no_kernel_headers(built):
    depends = [d.strip() for d in built["fields"]["Depends"].split(",")]
    for want in ("python3-bpfcc", "python3-click (>= 8.0)", "python3-rich (>= 12)",
                 "python3-prometheus-client (>= 0.16)", "iproute2", "procps"):
        assert want in depends, depends
    # orjson is not in Debian 12 (the standard json is used); bcc compiles against bpf/kernel-headers.
    assert not [d for d in depends if "orjson" in d or "linux-headers" in d], depends
    assert [r.strip() for r in built["fields"]["Recommends"].split(",")] == ["nftables", "conntrack"]


def test_lintian_finds_no_error(built):
    tags = [line for line in built["lintian"].splitlines() if line[:3] in ("E: ", "W: ", "I: ")]
    print("\n".join(tags))
    assert not [t for t in tags if t.startswith("E: ")], tags


def test_package_ships_bpf_schema_unit_logrotate_man_and_completion(built):
    tree = built["tree"]
    site = tree / "usr" / "lib" / "python3" / "dist-packages" / "tracer"
    assert (site / "bpf" / "rsttrace.h").is_file() and (site / "bpf" / "kernel-headers" / "include").is_dir()
    assert (site / "schema" / "rsttrace-v1.schema.json").is_file()
    assert not list(tree.rglob("__pycache__"))
    unit = (tree / "lib" / "systemd" / "system" / "rsttrace.service").read_text()
    [exec_start] = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    assert exec_start.startswith("ExecStart=/usr/bin/rsttrace ")
    assert (tree / "etc" / "logrotate.d" / "rsttrace").read_text() == (REPO / "contrib" / "rsttrace.logrotate").read_text()
    assert (tree / "usr" / "share" / "bash-completion" / "completions" / "rsttrace").is_file()
    for page in ("rsttrace", "rsttrace-doctor", "rsttrace-explain"):
        path = tree / "usr" / "share" / "man" / "man8" / f"{page}.8.gz"
        p = subprocess.run(["man", "--warnings", "-l", str(path)], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "MANWIDTH": "100", "LC_ALL": "C.UTF-8"})
        assert p.returncode == 0 and p.stderr == "", (page, p.stderr)
        assert "OPTIONS" in p.stdout
    explain = gzip.decompress((tree / "usr/share/man/man8/rsttrace-explain.8.gz").read_bytes()).decode()
    assert ".SH REASONS" in explain and "no_socket" in explain


# -- installed on a fresh Debian 12 ---------------------------------------------------------------

def test_installs_with_apt_from_the_deb_alone(installed):
    assert installed["status"] == f"install ok installed {VERSION}"
    assert installed["headers"] == []
    assert (installed["root"] / "usr" / "bin" / "rsttrace").is_file()


def test_systemd_unit_of_the_installed_package_verifies(installed):
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze missing: scripts/setup installs systemd"
    p = subprocess.run([analyze, "verify", f"--root={installed['root']}", "rsttrace.service"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stderr == "", p.stderr


# -- the installed rsttrace, booted on 6.1 ----------------------------------------------------------

def test_booted_root_runs_version_help_and_explain(report):
    assert report["version"]["stdout"].strip() == f"rsttrace, version {VERSION}"
    assert report["help"]["rc"] == 0 and "doctor" in report["help"]["stdout"]
    explain = report["explain"]
    assert explain["rc"] == 0 and explain["stdout"].startswith("no_socket — "), explain


def test_booted_root_finds_the_packaged_bpf_and_no_kernel_headers(report):
    site = "/usr/lib/python3/dist-packages/tracer"
    assert report["bpf_dir"]["stdout"].split() == [f"{site}/bpf", f"{site}/schema"]
    assert report["kernel_headers"]["stdout"].strip() == ""


def test_booted_root_doctor_can_trace(report):
    doctor = report["doctor"]
    assert doctor["rc"] == 0, doctor["stderr"]
    doc = json.loads(doctor["stdout"])
    assert doc["can_trace"] is True
    assert doc["coverage"]["hooks"]["rst_sent"]["hook"].startswith(("fentry:", "kprobe:"))


def test_booted_root_bash_completion_completes_subcommands(report):
    assert report["completion"]["stdout"].split() == ["explain"], report["completion"]


def test_booted_root_traces_a_refused_connect_and_a_linger_zero_close(report):
    trace = report["trace"]
    assert trace["attached"] and trace["rc"] == 0, trace
    scenarios = trace["scenarios"]
    assert scenarios["closed_port"]["error"] == "ECONNREFUSED" and scenarios["linger_zero"]["error"] == "ECONNRESET"
    sent = [r for r in trace["records"] if r.get("type") == "event" and r["event"] == "rst_sent"]
    # Every RST the kernel counted, and nothing else, each with its reason.
    assert len(sent) == trace["out_rsts"] == 2, (trace["out_rsts"], sent)
    by_reason = {r["reason"]: r for r in sent}
    assert set(by_reason) == {"no_listener", "linger_zero"}
    assert by_reason["no_listener"]["remote"]["port"] == scenarios["closed_port"]["client_port"]
    assert by_reason["linger_zero"]["local"]["port"] == 8100
    assert by_reason["linger_zero"]["remote"]["port"] == scenarios["linger_zero"]["client_port"]
    assert trace["records"][0]["type"] == "coverage" and trace["records"][0]["kernel"].startswith("6.1.")
