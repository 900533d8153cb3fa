"""The program cache's bytecode handling: map descriptors found and moved, nothing else touched."""
from __future__ import annotations

import pytest

from tracer.kernel import bpfsys, progcache


def ld_imm64(dst: int, src: int, imm: int) -> bytes:
    first = bytes([progcache.LD_IMM64, (src << 4) | dst, 0, 0]) + imm.to_bytes(4, "little", signed=True)
    return first + bytes(8)          # the second half: opcode 0, the upper 32 bits of the value


def insn(op: int, imm: int = 0) -> bytes:
    return bytes([op, 0, 0, 0]) + imm.to_bytes(4, "little", signed=True)


MOV_R0_0, EXIT = 0xB7, 0x95


def test_map_descriptors_are_found_and_moved_and_the_rest_is_kept():
    code = ld_imm64(1, progcache.PSEUDO_MAP_FD, 7) + insn(MOV_R0_0, 0x18) + ld_imm64(2, 0, 0x18) \
        + ld_imm64(1, progcache.PSEUDO_MAP_FD, 9) + insn(EXIT)
    assert progcache.map_fds_in(code) == {7, 9}
    moved = progcache.relocate(code, {7: 40, 9: 41})
    assert progcache.map_fds_in(moved) == {40, 41}
    assert len(moved) == len(code)
    # only the two immediates changed: a plain 64-bit constant 0x18 and an imm 0x18 are not maps
    changed = [i for i in range(len(code)) if code[i] != moved[i]]
    assert changed == [4, 44]


def test_a_reference_the_cache_cannot_move_refuses_the_entry():
    with pytest.raises(ValueError):
        progcache.map_fds_in(ld_imm64(1, 2, 5) + insn(EXIT))     # BPF_PSEUDO_MAP_VALUE


def test_bcc_names_say_where_each_program_attaches():
    assert progcache.attach_target("raw_tracepoint__kfree_skb") == (bpfsys.PROG_TYPE_RAW_TRACEPOINT, "kfree_skb")
    assert progcache.attach_target("tracepoint__tcp__tcp_send_reset") == (bpfsys.PROG_TYPE_TRACEPOINT,
                                                                         "tcp/tcp_send_reset")
    assert progcache.attach_target("tp_btf__inet_sock_set_state") == (bpfsys.PROG_TYPE_TRACING, "inet_sock_set_state")
    assert progcache.attach_target("kprobe__tcp_v4_send_reset") is None


def test_the_key_changes_with_anything_the_compile_depended_on(tmp_path):
    base = progcache.cache_path("int x;", ["-DA=1"], "0.26.0", str(tmp_path))
    assert base == progcache.cache_path("int x;", ["-DA=1"], "0.26.0", str(tmp_path))
    assert len({base, progcache.cache_path("int y;", ["-DA=1"], "0.26.0", str(tmp_path)),
                progcache.cache_path("int x;", ["-DA=2"], "0.26.0", str(tmp_path)),
                progcache.cache_path("int x;", ["-DA=1"], "0.29.1", str(tmp_path))}) == 4


def test_possible_cpus_is_at_least_the_online_ones():
    import os
    assert bpfsys.possible_cpus() >= len(os.sched_getaffinity(0))


def test_table_descriptions_become_ctypes_of_the_same_layout():
    import ctypes
    desc = ["listener_val", [["sk", "unsigned long long"], ["backlog", "int"], ["comm", "char", [16]],
                             ["", [None, [["a", "unsigned int"], ["b", "unsigned int"]], "union"]],
                             ["flag", "unsigned int", 3]], "struct"]
    t = progcache.ctype_of(desc)
    assert ctypes.sizeof(t) == 40           # 36, aligned to the u64
    v = t.from_buffer_copy(bytes(range(40)))
    assert v.backlog == int.from_bytes(bytes([8, 9, 10, 11]), "little") and v.comm[:2] == bytes([12, 13])
    assert v.a == v.b                               # the anonymous union's members, reachable by name
    packed = progcache.ctype_of(["p", [["x", "unsigned char"], ["y", "unsigned long long"]], "struct_packed"])
    assert ctypes.sizeof(packed) == 9
    with pytest.raises(ValueError):
        progcache.ctype_of("float128")


def test_only_the_newest_entries_are_kept(tmp_path):
    import os
    for i in range(progcache.MAX_ENTRIES + 3):
        f = tmp_path / f"programs-{i:04d}.json"
        f.write_text("{}")
        os.utime(f, (1000 + i, 1000 + i))
    (tmp_path / "boot-x.json").write_text("{}")
    progcache._prune(str(tmp_path))
    left = sorted(p.name for p in tmp_path.glob("programs-*.json"))
    assert left == [f"programs-{i:04d}.json" for i in range(3, progcache.MAX_ENTRIES + 3)]
    assert (tmp_path / "boot-x.json").exists()


def test_an_edited_header_changes_the_key(tmp_path):
    (tmp_path / "kernel-headers").mkdir()
    (tmp_path / "rsttrace.h").write_text("struct rsttrace_event { int a; };")
    (tmp_path / "kernel-headers" / "types.h").write_text("typedef int s32;")
    first = progcache.tree_digest(tmp_path)
    (tmp_path / "rsttrace.h").write_text("struct rsttrace_event { int a; int b; };")
    second = progcache.tree_digest(tmp_path)
    (tmp_path / "kernel-headers" / "types.h").write_text("typedef long s32;")
    assert len({first, second, progcache.tree_digest(tmp_path)}) == 3
    keys = {progcache.cache_path("src", [], "0.26.0", str(tmp_path), includes=d) for d in (first, second)}
    assert len(keys) == 2
