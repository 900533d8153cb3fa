"""The event record is defined once, in bpf/rsttrace.h; the Python decoder is built from it.
Check the two agree byte for byte, with the system C compiler as the referee."""
from __future__ import annotations

import ctypes
import subprocess

from tracer.kernel import layout
from tracer.paths import EVENT_HEADER


def c_layout(struct: str, fields: list[str], tmp_path) -> dict[str, tuple[int, int]]:
    src = tmp_path / "layout.c"
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/types.h>", f'#include "{EVENT_HEADER}"',
             "int main(void) {", f'  printf("sizeof %zu\\n", sizeof(struct {struct}));']
    for f in fields:
        lines.append(f'  printf("{f} %zu %zu\\n", offsetof(struct {struct}, {f}), sizeof(((struct {struct} *)0)->{f}));')
    lines += ["  return 0;", "}"]
    src.write_text("\n".join(lines))
    exe = tmp_path / "layout"
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    result = {}
    for line in out.splitlines():
        name, *nums = line.split()
        result[name] = tuple(int(n) for n in nums)
    return result


def check(struct: str, cls, tmp_path):
    names = [f for f, _ in cls._fields_]
    c = c_layout(struct, names, tmp_path)
    assert c["sizeof"] == (ctypes.sizeof(cls),)
    for name in names:
        field = getattr(cls, name)
        assert c[name] == (field.offset, field.size), name


def test_event_record_matches_the_c_header(tmp_path):
    check("rsttrace_event", layout.RawEvent, tmp_path)


def test_count_key_matches_the_c_header(tmp_path):
    check("rsttrace_count_key", layout.CountKey, tmp_path)


def test_story_and_its_key_match_the_c_header(tmp_path):
    check("rsttrace_story", layout.RawStory, tmp_path)
    check("rsttrace_story_key", layout.RawStoryKey, tmp_path)


def test_constants_come_from_the_header():
    assert layout.KIND_NAMES == {1: "rst_sent", 2: "rst_received", 3: "syn_dropped", 4: "ack_dropped", 5: "syn_cookie",
                                 6: "connection"}
    assert layout.F_SOFTIRQ == 1 and layout.NO_REASON == 0xFFFFFFFF
    assert layout.VERDICT_NAMES[1] == "accept_queue_full" and layout.VERDICT_NAMES[4] == "syn_cookie"
