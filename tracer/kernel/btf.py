"""Struct member offsets and enum values from the running kernel's BTF.

rsttrace never compiles against kernel headers: every kernel struct field a BPF program reads is
at an offset looked up here, in /sys/kernel/btf/vmlinux, and handed to the C code as a macro.
The parsing is libbpf's (libbpf1 is a dependency of bcc), called through ctypes: it reads the
5 MB of vmlinux BTF in a few milliseconds, where a pure-Python parser takes most of a second.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass

VMLINUX_BTF = "/sys/kernel/btf/vmlinux"

# BTF kinds (include/uapi/linux/btf.h); stable ABI.
KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM = 1, 2, 3, 4, 5, 6
KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT = 8, 9, 10, 11
KIND_FUNC, KIND_VAR, KIND_DATASEC, KIND_TYPE_TAG, KIND_ENUM64 = 12, 14, 15, 18, 19
PERCPU_SECTION = ".data..percpu"
_MODIFIERS = {KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG}


class BTFError(RuntimeError):
    """The kernel's BTF is missing, unreadable, or lacks a type/member rsttrace needs."""


class _BtfType(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("info", ctypes.c_uint32), ("size_or_type", ctypes.c_uint32)]


class _BtfMember(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("type", ctypes.c_uint32), ("offset", ctypes.c_uint32)]


class _BtfVarSecinfo(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("offset", ctypes.c_uint32), ("size", ctypes.c_uint32)]


class _BtfEnum(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("val", ctypes.c_int32)]


class _BtfEnum64(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("val_lo32", ctypes.c_uint32), ("val_hi32", ctypes.c_uint32)]


def _load_libbpf() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as err:
        raise BTFError(f"libbpf not found ({err}); install libbpf1 (a dependency of python3-bpfcc)") from err
    lib.btf__parse.restype = ctypes.c_void_p
    lib.btf__parse.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
    lib.btf__free.argtypes = [ctypes.c_void_p]
    lib.btf__find_by_name_kind.restype = ctypes.c_int32
    lib.btf__find_by_name_kind.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32]
    lib.btf__type_by_id.restype = ctypes.POINTER(_BtfType)
    lib.btf__type_by_id.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.btf__type_cnt.restype = ctypes.c_uint32
    lib.btf__type_cnt.argtypes = [ctypes.c_void_p]
    lib.btf__name_by_offset.restype = ctypes.c_char_p
    lib.btf__name_by_offset.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    return lib


@dataclass(frozen=True)
class Member:
    offset: int        # bytes from the start of the outer struct
    size: int          # bytes (0 when unknown, e.g. bitfields)


class KernelBTF:
    """A handle on one BTF blob (by default the running kernel's)."""

    def __init__(self, path: str = VMLINUX_BTF):
        if not os.path.exists(path):
            raise BTFError(f"{path} is missing: this kernel was built without CONFIG_DEBUG_INFO_BTF")
        self._lib = _load_libbpf()
        ptr = self._lib.btf__parse(path.encode(), None)
        # libbpf 1.x returns NULL and sets errno on failure.
        if not ptr:
            raise BTFError(f"cannot parse {path}: {os.strerror(ctypes.get_errno())}")
        self._btf = ptr

    def close(self) -> None:
        if self._btf:
            self._lib.btf__free(self._btf)
            self._btf = None

    def __enter__(self) -> "KernelBTF":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- low level -------------------------------------------------------------------------
    def _type(self, type_id: int) -> _BtfType:
        t = self._lib.btf__type_by_id(self._btf, type_id)
        if not t:
            raise BTFError(f"BTF type id {type_id} not found")
        return t.contents

    def _name(self, off: int) -> str:
        return (self._lib.btf__name_by_offset(self._btf, off) or b"").decode()

    @staticmethod
    def _kind(t: _BtfType) -> int:
        return (t.info >> 24) & 0x1F

    @staticmethod
    def _vlen(t: _BtfType) -> int:
        return t.info & 0xFFFF

    def _find(self, name: str, kind: int) -> int:
        type_id = self._lib.btf__find_by_name_kind(self._btf, name.encode(), kind)
        if type_id <= 0:
            raise BTFError(f"kernel BTF has no {'struct' if kind == KIND_STRUCT else 'type'} {name!r}")
        return type_id

    def _strip(self, type_id: int) -> tuple[int, _BtfType]:
        t = self._type(type_id)
        while self._kind(t) in _MODIFIERS:
            type_id = t.size_or_type
            t = self._type(type_id)
        return type_id, t

    def _size_of(self, type_id: int) -> int:
        _, t = self._strip(type_id)
        kind = self._kind(t)
        if kind in (KIND_INT, KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_ENUM64):
            return t.size_or_type
        if kind == KIND_PTR:
            return 8
        return 0

    def _members(self, t: _BtfType):
        base = ctypes.addressof(t) + ctypes.sizeof(_BtfType)
        kflag = (t.info >> 31) & 1
        for i in range(self._vlen(t)):
            m = _BtfMember.from_address(base + i * ctypes.sizeof(_BtfMember))
            # With kflag set, the low 24 bits are the bit offset and the high 8 the bitfield size.
            bit_off = m.offset & 0xFFFFFF if kflag else m.offset
            bitfield = (m.offset >> 24) if kflag else 0
            yield self._name(m.name_off), m.type, bit_off, bitfield

    def _search(self, type_id: int, name: str, base_bits: int):
        """Depth-first through anonymous struct/union members: kernel structs hide many fields there."""
        _, t = self._strip(type_id)
        if self._kind(t) not in (KIND_STRUCT, KIND_UNION):
            return None
        for member_name, member_type, bit_off, bitfield in self._members(t):
            if member_name == name:
                return base_bits + bit_off, member_type, bitfield
            if not member_name:
                found = self._search(member_type, name, base_bits + bit_off)
                if found:
                    return found
        return None

    # -- public ----------------------------------------------------------------------------
    def member(self, struct: str, path: str) -> Member:
        """Offset of `path` (dotted, e.g. "__sk_common.skc_net") inside `struct struct`."""
        type_id = self._find(struct, KIND_STRUCT)
        bits = 0
        for part in path.split("."):
            found = self._search(type_id, part, bits)
            if not found:
                raise BTFError(f"struct {struct} has no member {path!r} on this kernel")
            bits, type_id, bitfield = found
            if bitfield:
                raise BTFError(f"{struct}.{path} is a bitfield; rsttrace reads whole members only")
        if bits % 8:
            raise BTFError(f"{struct}.{path} is not byte aligned")
        return Member(bits // 8, self._size_of(type_id))

    def enum(self, name: str) -> dict[str, int]:
        """Name → value of an enum (ENUM or ENUM64)."""
        type_id = self._lib.btf__find_by_name_kind(self._btf, name.encode(), KIND_ENUM)
        kind = KIND_ENUM
        if type_id <= 0:
            type_id = self._lib.btf__find_by_name_kind(self._btf, name.encode(), KIND_ENUM64)
            kind = KIND_ENUM64
        if type_id <= 0:
            raise BTFError(f"kernel BTF has no enum {name!r}")
        return self._enum_values(type_id, kind)

    def anonymous_enum(self, first: str) -> dict[str, int]:
        """Name → value of the unnamed enum whose first enumerator is `first` (the kernel's SNMP
        indexes, LINUX_MIB_* and TCP_MIB_*, are such enums)."""
        for type_id in range(1, self._lib.btf__type_cnt(self._btf)):
            t = self._type(type_id)
            if self._kind(t) != KIND_ENUM or t.name_off or not self._vlen(t):
                continue
            e = _BtfEnum.from_address(ctypes.addressof(t) + ctypes.sizeof(_BtfType))
            if self._name(e.name_off) == first:
                return self._enum_values(type_id, KIND_ENUM)
        raise BTFError(f"kernel BTF has no enum starting with {first}")

    def _enum_values(self, type_id: int, kind: int) -> dict[str, int]:
        t = self._type(type_id)
        base = ctypes.addressof(t) + ctypes.sizeof(_BtfType)
        values = {}
        for i in range(self._vlen(t)):
            if kind == KIND_ENUM:
                e = _BtfEnum.from_address(base + i * ctypes.sizeof(_BtfEnum))
                values[self._name(e.name_off)] = e.val
            else:
                e = _BtfEnum64.from_address(base + i * ctypes.sizeof(_BtfEnum64))
                values[self._name(e.name_off)] = (e.val_hi32 << 32) | e.val_lo32
        return values

    def find_function(self, name: str) -> int:
        """BTF id of a kernel function (what fentry/fexit attach to), 0 if absent."""
        return max(0, self._lib.btf__find_by_name_kind(self._btf, name.encode(), KIND_FUNC))

    def tracepoint_type(self, name: str) -> int:
        """BTF id of tracepoint `name`'s btf_trace_<name> typedef (what a tp_btf program is loaded
        for), 0 if absent."""
        return max(0, self._lib.btf__find_by_name_kind(self._btf, f"btf_trace_{name}".encode(), KIND_TYPEDEF))

    def percpu_offsets(self, names: tuple[str, ...]) -> dict[str, int]:
        """Where each of these per-CPU variables sits in the per-CPU section (its DATASEC offset): a
        CPU's copy is at that CPU's per-CPU base plus this. Only the names found."""
        section = self._lib.btf__find_by_name_kind(self._btf, PERCPU_SECTION.encode(), KIND_DATASEC)
        if section <= 0:
            return {}
        t = self._type(section)
        base = ctypes.addressof(t) + ctypes.sizeof(_BtfType)
        wanted, found = set(names), {}
        for i in range(self._vlen(t)):
            info = _BtfVarSecinfo.from_address(base + i * ctypes.sizeof(_BtfVarSecinfo))
            name = self._name(self._type(info.type).name_off)
            if name in wanted:
                found[name] = info.offset
        return found

    def has_struct(self, name: str) -> bool:
        return self._lib.btf__find_by_name_kind(self._btf, name.encode(), KIND_STRUCT) > 0
