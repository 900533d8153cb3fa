"""The program cache's bytecode handling: map descriptors found and moved, nothing else touched; and
its directory and entries used only where nobody but root could have written them."""
from __future__ import annotations

import os

import pytest

from tracer.kernel import bpfsys, progcache, rootfiles


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
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        progcache._prune(fd)
    finally:
        os.close(fd)
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


# -- who may have written the cache: only root -------------------------------------------------------
# tmp_path is root's and 0700 under /tmp (root's, sticky); the tests chown and chmod below it.
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="root-owned paths and chown need root")
NOBODY = 65534
ENTRY = {"format": progcache.FORMAT, "maps": [], "functions": {}}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache directory as rsttrace makes it (root's, 0700) with one entry; refusals said afresh."""
    monkeypatch.setattr(rootfiles, "_said", False)
    directory = tmp_path / "cache"
    path = str(directory / "programs-0123.json")
    assert progcache.write_entry(path, ENTRY)
    return directory, path


def said(capsys) -> list[str]:
    return capsys.readouterr().err.splitlines()


@needs_root
def test_a_cache_only_root_can_write_is_used(cache, capsys):
    directory, path = cache
    assert (directory.stat().st_mode & 0o777, os.stat(path).st_mode & 0o777) == (0o700, 0o600)
    assert progcache.read_entry(path) == ENTRY
    assert said(capsys) == []


@needs_root
def test_a_sticky_directory_above_it_such_as_tmp_is_accepted(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(rootfiles, "_said", False)
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared").chmod(0o1777)
    path = str(tmp_path / "shared" / "cache" / "programs-0123.json")
    assert progcache.write_entry(path, ENTRY)
    assert progcache.read_entry(path) == ENTRY
    assert said(capsys) == []


@needs_root
@pytest.mark.parametrize("what", ["directory", "entry"])
def test_a_cache_owned_by_another_user_is_refused_and_said_once(cache, capsys, what):
    directory, path = cache
    os.chown(directory if what == "directory" else path, NOBODY, NOBODY)
    assert progcache.read_entry(path) is None
    assert progcache.read_entry(path) is None
    named = str(directory) if what == "directory" else path
    assert said(capsys) == [f"rsttrace: cache not used: {named} belongs to uid {NOBODY}, not root"]


@needs_root
@pytest.mark.parametrize("mode, by", [(0o770, "group"), (0o707, "others"), (0o1777, "group and others")])
def test_a_cache_directory_group_or_others_can_write_is_refused(cache, capsys, mode, by):
    directory, path = cache
    directory.chmod(mode)        # sticky or not: the cache directory itself is root's alone
    assert progcache.read_entry(path) is None
    assert said(capsys) == [f"rsttrace: cache not used: {directory} is writable by {by}"]


@needs_root
def test_an_entry_others_can_write_is_refused(cache, capsys):
    directory, path = cache
    os.chmod(path, 0o606)
    assert progcache.read_entry(path) is None
    assert said(capsys) == [f"rsttrace: cache not used: {path} is writable by others"]


@needs_root
def test_a_writable_directory_above_the_cache_is_refused(cache, capsys):
    directory, path = cache
    directory.parent.chmod(0o777)            # anyone could rename the cache directory away and put theirs
    try:
        assert progcache.read_entry(path) is None
        assert not progcache.write_entry(str(directory / "programs-4567.json"), ENTRY)
    finally:
        directory.parent.chmod(0o700)
    assert not (directory / "programs-4567.json").exists()
    assert said(capsys) == [f"rsttrace: cache not used: {directory.parent} is writable by group and others"]


@needs_root
def test_a_parent_owned_by_another_user_is_refused(cache, capsys):
    directory, path = cache
    os.chown(directory.parent, NOBODY, NOBODY)
    assert progcache.read_entry(path) is None
    assert said(capsys) == [f"rsttrace: cache not used: {directory.parent} belongs to uid "
                            f"{NOBODY}, not root"]


@needs_root
def test_a_symlinked_cache_directory_is_refused(cache, tmp_path, capsys):
    directory, path = cache
    (tmp_path / "link").symlink_to(directory)
    assert progcache.read_entry(str(tmp_path / "link" / "programs-0123.json")) is None
    assert not progcache.write_entry(str(tmp_path / "link" / "programs-4567.json"), ENTRY)
    assert said(capsys) == [f"rsttrace: cache not used: {tmp_path / 'link'} is a symbolic link"]


@needs_root
def test_a_symlinked_directory_above_the_cache_is_refused(cache, tmp_path, capsys):
    directory, path = cache
    (tmp_path / "above").symlink_to(tmp_path)
    assert progcache.read_entry(str(tmp_path / "above" / "cache" / "programs-0123.json")) is None
    assert said(capsys) == [f"rsttrace: cache not used: {tmp_path / 'above'} is a symbolic link"]


@needs_root
def test_a_symlinked_entry_is_refused(cache, capsys):
    directory, path = cache
    os.rename(path, directory / "elsewhere.json")
    os.symlink(directory / "elsewhere.json", path)
    assert progcache.read_entry(path) is None
    assert said(capsys) == [f"rsttrace: cache not used: {path} is a symbolic link"]


@needs_root
def test_an_entry_that_is_not_a_regular_file_is_refused(cache, capsys):
    directory, path = cache
    os.unlink(path)
    os.mkfifo(path, 0o600)          # opened without blocking, then refused
    assert progcache.read_entry(path) is None
    assert said(capsys) == [f"rsttrace: cache not used: {path} is not a regular file"]


@needs_root
def test_the_override_directory_is_checked_alike(cache, monkeypatch, capsys):
    directory, path = cache
    monkeypatch.setenv(progcache.CACHE_ENV, str(directory))
    assert progcache.cache_directory() == str(directory)
    assert progcache.read_entry(path) == ENTRY
    assert progcache.read_entry(progcache.cache_path("int x;", [], None)) is None     # no such entry: nothing said
    assert said(capsys) == []
    directory.chmod(0o757)
    assert progcache.read_entry(path) is None
    assert said(capsys) == [f"rsttrace: cache not used: {directory} is writable by others"]


@needs_root
def test_a_missing_cache_is_no_refusal(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(rootfiles, "_said", False)
    monkeypatch.setenv(progcache.CACHE_ENV, str(tmp_path / "none"))
    assert progcache.read_entry(str(tmp_path / "none" / "programs-0123.json")) is None
    assert said(capsys) == []


@needs_root
def test_the_boot_cache_of_kernel_facts_is_refused_the_same_way(tmp_path, monkeypatch, capsys):
    # Its struct offsets are compiled into the programs: as much the kernel's business as the programs.
    from tracer.kernel.bootcache import BootCache
    monkeypatch.setattr(rootfiles, "_said", False)
    directory = tmp_path / "boot"
    first = BootCache(str(directory))
    first.put("offsets", {"sk_state": 18}, key="v1")
    first.save()
    assert BootCache(str(directory)).get("offsets", key="v1") == {"sk_state": 18}
    os.chmod(directory, 0o777)
    assert BootCache(str(directory)).get("offsets", key="v1") is None
    assert said(capsys) == [f"rsttrace: cache not used: {directory} is writable by group and others"]
