"""The older-kernel tier: boot Debian 12's stock 6.1 kernel (kprobes, fentry; tcp:tcp_send_reset
without reason) under qemu with this machine's filesystem, and run tests/vm/inside there against the
kprobe backend. One boot, many checks. scripts/vm/setup installs the kernel, qemu and virtme-ng."""
from __future__ import annotations

import os
import subprocess
import xml.etree.ElementTree as ET

from conftest import REPO


def test_kprobe_backend_in_the_debian_61_vm(root):
    subprocess.run([str(REPO / "scripts" / "vm" / "setup")], check=True, timeout=900)
    junit = REPO / ".vm-out" / "junit.xml"
    if junit.exists():
        junit.unlink()
    inner = ("RSTTRACE_IN_VM=1 .venv/bin/python -m pytest -p no:cacheprovider -q -s tests/vm/inside "
             "--junitxml=.vm-out/junit.xml")
    r = subprocess.run([str(REPO / "scripts" / "vm" / "run"), inner], cwd=REPO, capture_output=True, text=True,
                       timeout=1500, env={**os.environ, "VM_TIMEOUT": "1400"})
    print(r.stdout[-6000:])
    print(r.stderr[-3000:])
    assert junit.exists(), "the VM run produced no results"
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    assert int(suite.get("tests")) >= 40
    assert int(suite.get("failures")) == 0 and int(suite.get("errors")) == 0 and int(suite.get("skipped")) == 0
    assert r.returncode == 0
