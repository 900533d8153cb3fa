"""The compiled-program cache: a start after the first of a boot skips clang.

bcc compiles rsttrace's C at every start, most of a start-up's time. What it hands the kernel is plain bytecode in which each map is
referred to by its file descriptor (ld_imm64 with src_reg BPF_PSEUDO_MAP_FD). So after a compile, the
bytecode of every program and the definition of every map are kept in /run/rsttrace (tmpfs: gone at
reboot), under a key made of everything the compile depended on: the source and every file under
bpf/ it may #include, the flags (they carry the kernel's struct offsets and text addresses), bcc's
version and the kernel release. A later start with the same key creates the maps, puts their new
descriptors into the bytecode and loads and attaches the programs itself, through bpf(2) and
perf_event_open(2).

Only plans made of tracepoints and raw tracepoints are cached (kprobes and fentry stay with bcc);
anything unexpected in the bytecode, and any failure while loading from the cache, means compiling.
A boot's first start compiles in a child process that keeps its programs here and exits, then
loads them like any later start (loader.py): the compiler never stays in the tracer's memory.
`RSTTRACE_PROGRAM_CACHE=off` always compiles; `RSTTRACE_PROGRAM_CACHE=DIR` keeps the cache in DIR (tests).

What the cache holds is loaded into the kernel as root, so it is used only where nobody else could
have written it: the directory, every directory above it and the entry must be root's and not
writable by group or others, and none of them may be a symbolic link (checked on each component
as it is opened). A directory above it may be a root-owned sticky one such as /tmp, where others
cannot rename or remove root's entries. Anything else is said once on stderr, and the programs
are compiled.
"""
from __future__ import annotations

import base64
import ctypes
import hashlib
import json
import os
import platform
from dataclasses import dataclass

from . import bpfsys, rootfiles
from .bootcache import DIRECTORY

FORMAT = 1
ON_CPU_PREFIX = "oncpu__"
CACHE_ENV = "RSTTRACE_PROGRAM_CACHE"
PREFIXES = {"raw_tracepoint__": bpfsys.PROG_TYPE_RAW_TRACEPOINT, "tracepoint__": bpfsys.PROG_TYPE_TRACEPOINT,
            "tp_btf__": bpfsys.PROG_TYPE_TRACING,     # BTF tracepoints: the loader's own (loader.py)
            ON_CPU_PREFIX: bpfsys.PROG_TYPE_RAW_TRACEPOINT}   # run on demand, never attached (loader.py)
PERCPU_MAP_TYPES = {5, 6, 10}          # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH
LD_IMM64, PSEUDO_MAP_FD = 0x18, 1
# Entries kept (the newest used): a --pid filter is compiled in, so each pid traced makes one.
MAX_ENTRIES = 16


def enabled() -> bool:
    return os.environ.get(CACHE_ENV, "on") != "off"


def cache_directory() -> str:
    setting = os.environ.get(CACHE_ENV, "on")
    return setting if setting.startswith("/") else DIRECTORY


def read_entry(path: str) -> dict | None:
    """The cache entry at `path`, if it is there and only root could have written it."""
    return rootfiles.read_json(path)


def tree_digest(root) -> str:
    """Every file under `root` (bpf/: the #included rsttrace.h and the header tree the compile reads,
    beside the sources), names and contents: ~14 small files."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            h.update(os.path.relpath(path, root).encode() + b"\0")
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def cache_path(source: str, cflags: list[str], bcc_version: str | None, directory: str | None = None,
               includes: str = "") -> str:
    """The entry for this compile; `includes`: tree_digest() of what the source #includes."""
    directory = directory or cache_directory()
    h = hashlib.sha256()
    for part in (str(FORMAT), source, "\0".join(cflags), bcc_version or "", platform.release(), includes):
        h.update(part.encode())
        h.update(b"\1")
    return os.path.join(directory, f"programs-{h.hexdigest()[:24]}.json")


def attach_target(function: str) -> tuple[int, str] | None:
    """bcc's auto-attach names → (program type, what it attaches to): raw_tracepoint__kfree_skb →
    raw tracepoint kfree_skb; tracepoint__tcp__tcp_send_reset → tracepoint tcp/tcp_send_reset;
    tp_btf__inet_sock_set_state → BTF tracepoint inet_sock_set_state; oncpu__NAME → a raw tracepoint
    program attached nowhere (run on a CPU on demand)."""
    for prefix, prog_type in PREFIXES.items():
        if function.startswith(prefix):
            rest = function[len(prefix):]
            return prog_type, (rest.replace("__", "/", 1) if prog_type == bpfsys.PROG_TYPE_TRACEPOINT else rest)
    return None


def map_fds_in(insns: bytes) -> set[int]:
    """The map file descriptors the bytecode refers to, or raises ValueError on a reference the
    cache does not know how to move (a map value, BTF ids)."""
    fds = set()
    for off in range(0, len(insns) - 15, 8):
        if insns[off] == LD_IMM64:
            src = insns[off + 1] >> 4
            if src == PSEUDO_MAP_FD:
                fds.add(int.from_bytes(insns[off + 4:off + 8], "little", signed=True))
            elif src != 0:
                raise ValueError(f"ld_imm64 with src_reg {src}")
    return fds


def relocate(insns: bytes, new_fd: dict[int, int]) -> bytes:
    """The bytecode with each map descriptor replaced by the one created for that map now. The second
    half of an ld_imm64 is skipped: its opcode byte is 0, never taken for an instruction."""
    out = bytearray(insns)
    off = 0
    while off < len(out) - 15:
        if out[off] == LD_IMM64:
            if out[off + 1] >> 4 == PSEUDO_MAP_FD:
                old = int.from_bytes(out[off + 4:off + 8], "little", signed=True)
                out[off + 4:off + 8] = new_fd[old].to_bytes(4, "little", signed=True)
            off += 16
        else:
            off += 8
    return bytes(out)


def save(bpf, path: str, btf_types: dict[str, int] | None = None) -> bool:
    """Keep what bcc compiled and loaded (after a successful start). False where the plan is not
    cacheable; an unwritable directory is no error (the next start compiles again). `btf_types`:
    the BTF tracepoint programs' btf_trace_* ids (HookPlan.btf_types; stable until reboot, like the
    cache)."""
    from bcc import lib
    functions = {}
    used: set[int] = set()
    for name, fn in bpf.funcs.items():
        name = name.decode() if isinstance(name, bytes) else name
        target = attach_target(name)
        if target is None:
            return False
        try:
            insns = bpf.dump_func(name)
            used |= map_fds_in(insns)
        except Exception:       # ValueError from map_fds_in(), bcc's bare Exception
            return False
        functions[name] = base64.b64encode(insns).decode()
    lib.bpf_table_name.restype = ctypes.c_char_p
    lib.bpf_table_key_desc_id.restype = ctypes.c_char_p
    lib.bpf_table_leaf_desc_id.restype = ctypes.c_char_p
    maps = []
    for i in range(lib.bpf_num_tables(bpf.module)):
        maps.append({"name": lib.bpf_table_name(bpf.module, i).decode(), "fd": lib.bpf_table_fd_id(bpf.module, i),
                     "type": lib.bpf_table_type_id(bpf.module, i), "key_size": lib.bpf_table_key_size_id(bpf.module, i),
                     "value_size": lib.bpf_table_leaf_size_id(bpf.module, i),
                     "max_entries": lib.bpf_table_max_entries_id(bpf.module, i),
                     "flags": lib.bpf_table_flags_id(bpf.module, i),
                     "key_desc": (lib.bpf_table_key_desc_id(bpf.module, i) or b"").decode(),
                     "leaf_desc": (lib.bpf_table_leaf_desc_id(bpf.module, i) or b"").decode()})
    if not used <= {m["fd"] for m in maps}:
        return False
    entry = {"format": FORMAT, "license": lib.bpf_module_license(bpf.module).decode(),
             "kern_version": lib.bpf_module_kern_version(bpf.module), "maps": maps, "functions": functions,
             "btf_types": btf_types or {}}
    return write_entry(path, entry)


def write_entry(path: str, entry: dict) -> bool:
    """Keep `entry` at `path`, root's alone (what is in it is loaded into the kernel)."""
    return rootfiles.write_json(path, entry, after=_prune)


def _prune(dir_fd: int) -> None:
    entries = []
    for name in os.listdir(dir_fd):
        if name.startswith("programs-") and name.endswith(".json"):
            try:
                entries.append((os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mtime, name))
            except OSError:
                continue
    for _, name in sorted(entries, reverse=True)[MAX_ENTRIES:]:
        try:
            os.unlink(name, dir_fd=dir_fd)
        except OSError:
            pass


_SCALARS = {"_Bool": ctypes.c_bool, "char": ctypes.c_char, "signed char": ctypes.c_byte,
            "unsigned char": ctypes.c_ubyte, "short": ctypes.c_short, "unsigned short": ctypes.c_ushort,
            "int": ctypes.c_int, "unsigned int": ctypes.c_uint, "long": ctypes.c_long,
            "unsigned long": ctypes.c_ulong, "long long": ctypes.c_longlong,
            "unsigned long long": ctypes.c_ulonglong, "__int128": ctypes.c_int64 * 2,
            "unsigned __int128": ctypes.c_uint64 * 2}


def ctype_of(desc):
    """A ctypes type from bcc's description of a table's key or value (its JSON, as bcc's
    bpf_table_key_desc gives it): a scalar's name, or [name, [fields], "struct"|"struct_packed"|"union"]
    whose fields are [name, type], [name, type, [length]] or [name, type, bits]. Built here, so that a
    start from the cache never imports bcc."""
    if isinstance(desc, str):
        if desc not in _SCALARS:
            raise ValueError(f"unknown scalar {desc}")
        return _SCALARS[desc]
    name, members = desc[0], desc[1]
    kind = desc[2] if len(desc) > 2 else "struct"
    fields, anonymous = [], []
    for member in members:
        fname, ftype = member[0], member[1]
        if not fname:
            fname = f"__anon{len(anonymous)}"
            anonymous.append(fname)
        if len(member) == 2:
            fields.append((fname, ctype_of(ftype)))
        elif isinstance(member[2], list):
            fields.append((fname, ctype_of(ftype) * member[2][0]))
        elif isinstance(member[2], int):
            fields.append((fname, ctype_of(ftype), member[2]))
        elif member[2] in ("struct", "struct_packed", "union"):
            fields.append((fname, ctype_of(member)))
        else:
            raise ValueError(f"unknown member {member}")
    base = ctypes.Union if kind == "union" else ctypes.Structure
    attrs = {"_anonymous_": anonymous, "_fields_": fields}
    if kind == "struct_packed":
        attrs["_pack_"] = 1
    return type(str(name), (base,), attrs)


def _ctype(desc: str):
    return ctype_of(json.loads(desc))


class Map:
    """A map by file descriptor, with what rsttrace asks of bcc's tables: `m[key] = value`,
    `m[key]` (per-CPU maps: the list of the CPUs' values), `m.items()`, `m.map_fd`."""

    def __init__(self, fd: int, spec: dict):
        self.map_fd = fd
        self.Key, self.Leaf = _ctype(spec["key_desc"]), _ctype(spec["leaf_desc"])
        self.key_size, self.value_size = spec["key_size"], spec["value_size"]
        self.percpu = spec["type"] in PERCPU_MAP_TYPES
        self.cpus = bpfsys.possible_cpus() if self.percpu else 1
        self.stride = (self.value_size + 7) & ~7 if self.percpu else self.value_size

    def __setitem__(self, key, value) -> None:
        bpfsys.map_update(self.map_fd, bytes(key)[:self.key_size], bytes(value)[:self.value_size])

    def _value(self, raw: bytes):
        if not self.percpu:
            return self.Leaf.from_buffer_copy(raw[:self.value_size])
        values = [self.Leaf.from_buffer_copy(raw[i * self.stride:i * self.stride + self.value_size])
                  for i in range(self.cpus)]
        return [getattr(v, "value", v) for v in values]

    def __delitem__(self, key) -> None:
        if not bpfsys.map_delete(self.map_fd, bytes(key)[:self.key_size]):
            raise KeyError(key)

    def __getitem__(self, key):
        raw = bpfsys.map_lookup(self.map_fd, bytes(key)[:self.key_size], self.stride * self.cpus)
        if raw is None:
            raise KeyError(key)
        return self._value(raw)

    def items(self):
        out, key, seen = [], None, 0
        while seen < 10_000_000:
            key = bpfsys.map_next_key(self.map_fd, key, self.key_size)
            if key is None:
                break
            seen += 1
            raw = bpfsys.map_lookup(self.map_fd, key, self.stride * self.cpus)
            if raw is not None:
                out.append((self.Key.from_buffer_copy(key), self._value(raw)))
        return out


@dataclass
class Program:
    name: str
    fd: int
    target: str


class CachedPrograms:
    """The maps and programs of a cache entry, loaded and attached without bcc. Shaped like the part
    of bcc's BPF object the loader uses: `obj[map name]`, `.funcs` (name → .fd),
    `detach_raw_tracepoint(tp=...)` (raises where it is not attached), `cleanup()`."""

    def __init__(self, entry: dict, tracefs: str):
        self.maps: dict[str, Map] = {}
        self.funcs: dict[str, Program] = {}
        self.links: dict[str, int] = {}           # attach target → link or perf event fd
        self._map_fds: list[int] = []             # also those whose Map was not made yet
        try:
            new_fd = {}
            for spec in entry["maps"]:
                fd = bpfsys.map_create(spec["type"], spec["key_size"], spec["value_size"], spec["max_entries"],
                                       spec["flags"], spec["name"])
                self._map_fds.append(fd)
                new_fd[spec["fd"]] = fd
                self.maps[spec["name"]] = Map(fd, spec)
            license = entry["license"].encode()
            for name, code in entry["functions"].items():
                prog_type, target = attach_target(name)
                insns = relocate(base64.b64decode(code), new_fd)
                short = name.split("__", 1)[1] if "__" in name else name
                if prog_type == bpfsys.PROG_TYPE_TRACING:
                    fd = bpfsys.prog_load(prog_type, insns, license, entry["kern_version"], short,
                                          bpfsys.BPF_TRACE_RAW_TP, entry["btf_types"][name])
                else:
                    fd = bpfsys.prog_load(prog_type, insns, license, entry["kern_version"], short)
                self.funcs[name] = Program(name, fd, target)
            for prog in self.funcs.values():
                if prog.name.startswith(ON_CPU_PREFIX):
                    continue
                if prog.name.startswith("tp_btf__"):
                    self.links[prog.target] = bpfsys.raw_tracepoint_open(None, prog.fd)
                elif "/" in prog.target:
                    with open(os.path.join(tracefs, "events", prog.target, "id")) as f:
                        self.links[prog.target] = bpfsys.tracepoint_attach(int(f.read()), prog.fd)
                else:
                    self.links[prog.target] = bpfsys.raw_tracepoint_open(prog.target, prog.fd)
        except BaseException:
            self.cleanup()
            raise

    def __getitem__(self, name: str) -> Map:
        return self.maps[name]

    def detach_raw_tracepoint(self, tp: bytes) -> None:
        os.close(self.links.pop(tp.decode()))

    def detach(self) -> None:
        for fd in self.links.values():
            os.close(fd)
        self.links.clear()

    def cleanup(self) -> None:
        self.detach()
        for prog in self.funcs.values():
            os.close(prog.fd)
        self.funcs.clear()
        for fd in self._map_fds:
            os.close(fd)
        self._map_fds.clear()


def load(path: str, tracefs: str) -> CachedPrograms | None:
    """The programs of the cache entry at `path`, attached; None where there is none, it is refused
    (read_entry) or it fails."""
    entry = read_entry(path)
    if entry is None or entry.get("format") != FORMAT:
        return None
    try:
        return CachedPrograms(entry, tracefs)     # closes what it made if it fails
    except (OSError, ValueError, KeyError, TypeError):
        return None
