"""Parsers of kernel text: tracepoint formats, SNMP counters, kallsyms, BTF member offsets."""
from __future__ import annotations

import pytest

from tracer.enrich import counters
from tracer.kernel.btf import BTFError, KernelBTF
from tracer.kernel.bootcache import BootCache
from tracer.kernel.kallsyms import KernelSymbols, function_ranges
from tracer.kernel.tracefs import parse_format
from tests_paths import DATA


def test_send_reset_format_fields_and_reason_names():
    fmt = parse_format("tcp", "tcp_send_reset", (DATA / "tcp_send_reset-6.18.format").read_text())
    assert {"skbaddr", "skaddr", "state", "reason", "saddr", "daddr"} <= set(fmt.fields)
    assert not any(f.startswith("common_") for f in fmt.fields)
    names = fmt.symbols("reason")
    assert names[1] == "NO_SOCKET" and names[11] == "TCP_ABORT_ON_CLOSE"
    # state's symbols are macro names, not numbers: nothing to learn there (and never the reason's list)
    assert fmt.symbols("state") == {}

def test_receive_reset_format_has_cookie():
    fmt = parse_format("tcp", "tcp_receive_reset", (DATA / "tcp_receive_reset-6.18.format").read_text())
    assert fmt.has("sock_cookie") and fmt.has("saddr_v6") and not fmt.has("reason")


def test_snmp_counters_parse():
    text = "Tcp: RtoAlgorithm OutRsts\nTcp: 1 42\nTcpExt: ListenOverflows ListenDrops\nTcpExt: 7 9\n"
    assert counters.parse(text) == {"TcpRtoAlgorithm": 1, "TcpOutRsts": 42, "TcpExtListenOverflows": 7,
                                    "TcpExtListenDrops": 9}
    assert counters.delta({"TcpOutRsts": 40}, {"TcpOutRsts": 42}, names=("TcpOutRsts",)) == {"TcpOutRsts": 2}


def test_kallsyms_range_ends_at_next_symbol(tmp_path):
    f = tmp_path / "kallsyms"
    f.write_text("ffffffff81000000 T _text\nffffffff81369570 t handle_softirqs\n"
                 "ffffffff81369570 t handle_softirqs_alias\nffffffff81369810 T other\n")
    assert function_ranges(("handle_softirqs", "__do_softirq"), str(f)) == {
        "handle_softirqs": (0xffffffff81369570, 0xffffffff81369810)}


def test_kallsyms_every_name_is_found_with_its_own_end(tmp_path):
    f = tmp_path / "kallsyms"
    f.write_text("ffffffff81000000 T _text\nffffffff82081000 T tcp_rcv_state_process\n"
                 "ffffffff82082000 T cookie_v4_check\nffffffff82083000 t next_one\n"
                 "ffffffff8219a930 T cookie_v6_check\nffffffff8219b000 T last\n")
    names = ("tcp_rcv_state_process", "cookie_v4_check", "cookie_v6_check", "absent")
    assert function_ranges(names, str(f), every=True) == {
        "tcp_rcv_state_process": (0xffffffff82081000, 0xffffffff82082000),
        "cookie_v4_check": (0xffffffff82082000, 0xffffffff82083000),
        "cookie_v6_check": (0xffffffff8219a930, 0xffffffff8219b000)}
    assert function_ranges(names, str(f)) == {"tcp_rcv_state_process": (0xffffffff82081000, 0xffffffff82082000)}


def test_kallsyms_hidden_addresses_mean_no_ranges(tmp_path):
    f = tmp_path / "kallsyms"
    f.write_text("0000000000000000 T _text\n0000000000000000 t handle_softirqs\n0000000000000000 T other\n")
    assert function_ranges(("handle_softirqs",), str(f)) == {}


def test_btf_offsets_walk_anonymous_members():
    # Values from the running kernel's BTF; the members sit inside anonymous unions/structs.
    with KernelBTF() as btf:
        assert btf.member("sock", "__sk_common.skc_net").size == 8
        assert btf.member("sk_buff", "head").size == 8
        assert btf.member("net", "ns.inum").size == 4
        assert btf.enum("sock_flags")["SOCK_DEAD"] == 0
        with pytest.raises(BTFError):
            btf.member("sock", "no_such_member")
        with pytest.raises(BTFError):
            btf.member("no_such_struct_rsttrace", "x")


def test_missing_btf_file_is_a_clear_error(tmp_path):
    with pytest.raises(BTFError, match="CONFIG_DEBUG_INFO_BTF"):
        KernelBTF(str(tmp_path / "vmlinux"))


def test_upstream_kernel_version_from_distribution_strings():
    from tracer.kernel.capabilities import kernel_upstream_version
    debian = ("Linux version 6.1.0-56-amd64 (debian-kernel@lists.debian.org) (gcc-12 ...) #1 SMP "
              "PREEMPT_DYNAMIC Debian 6.1.192-2 (2026-11-16)")
    assert kernel_upstream_version("6.1.0-56-amd64", debian) == (6, 1, 192)
    assert kernel_upstream_version("6.18.44-fc-v769", "Linux version 6.18.44-fc-v769 #1 SMP") == (6, 18, 44)
    assert kernel_upstream_version("5.15.0-91-generic", "Linux version 5.15.0-91-generic #101-Ubuntu SMP",
                                   "Ubuntu 5.15.0-91.101-generic 5.15.131") == (5, 15, 131)


KALLSYMS = "".join(f"{0xffffffff81000000 + 0x100 * i:016x} {'T' if i % 3 else 't'} fn{i}\n" for i in range(5000))


def test_kernel_symbols_find_the_function_an_address_falls_in(tmp_path):
    f = tmp_path / "kallsyms"
    f.write_text("0000000000000000 A fixed_percpu_data\n" + KALLSYMS +
                 "ffffffffc0201000 t ftrace_trampoline\t[__builtin__ftrace]\n")
    ks = KernelSymbols(str(f))
    ks.CHUNK = 4096                       # many chunks: lookups across chunk edges
    assert ks.name(0xffffffff81000000) == "fn0"
    assert ks.name(0xffffffff81000000 + 0x100 * 1234 + 0x42) == "fn1234"
    assert ks.name(0xffffffff81000000 + 0x100 * 4999 + 1) == "fn4999"
    assert ks.name(0xffffffffc0201010) == "ftrace_trampoline"
    assert ks.name(0xffffffff81000000 + 0x100 * 10) == "fn10"      # back to an early chunk


def test_kernel_symbols_read_only_as_far_as_asked(tmp_path):
    f = tmp_path / "kallsyms"
    f.write_text(KALLSYMS)
    ks = KernelSymbols(str(f))
    ks.CHUNK = 4096
    assert ks.name(0xffffffff81000000 + 0x100 * 100) == "fn100"
    assert len(ks._chunks) < 5                          # of ~40


def test_kernel_symbols_out_of_address_order_are_sorted(tmp_path):
    f = tmp_path / "kallsyms"
    lines = KALLSYMS.splitlines(keepends=True)
    f.write_text("".join(lines[2500:] + ["ffffffffa0000000 t mod_fn\t[mod]\n"] + lines[:2500]))
    ks = KernelSymbols(str(f))
    ks.CHUNK = 4096
    assert ks.name(0xffffffff81000000 + 0x100 * 7 + 5) == "fn7"
    assert ks.name(0xffffffffa0000008) == "mod_fn"
    assert ks.name(0xffffffff81000000 + 0x100 * 3000) == "fn3000"


def test_core_kernel_names_are_kept_for_the_next_run_of_this_boot(tmp_path):
    f = tmp_path / "kallsyms"
    f.write_text(KALLSYMS + "ffffffffc0201000 t ftrace_trampoline\t[__builtin__ftrace]\n")
    first = KernelSymbols(str(f), cache=BootCache(str(tmp_path / "cache")))
    assert first.name(0xffffffff81000000 + 0x100 * 42 + 3) == "fn42"
    assert first.name(0xffffffffc0201004) == "ftrace_trampoline"
    first.save()
    f.unlink()                                   # the next run finds it all in the cache ...
    again = KernelSymbols(str(f), cache=BootCache(str(tmp_path / "cache")))
    assert again.name(0xffffffff81000000 + 0x100 * 42 + 3) == "fn42"
    with pytest.raises(FileNotFoundError):       # ... except a module's symbol: modules move
        again.name(0xffffffffc0201004)
    assert oct((tmp_path / "cache").stat().st_mode & 0o777) == "0o700"


def test_boot_cache_sections_are_keyed_by_what_made_them(tmp_path):
    cache = BootCache(str(tmp_path))
    cache.put("btf", {"offsets": {"OFF_X": 8}}, key="fields-v1")
    cache.save()
    again = BootCache(str(tmp_path))
    assert again.get("btf", "fields-v1") == {"offsets": {"OFF_X": 8}}
    assert again.get("btf", "fields-v2") is None          # another rsttrace's field list: not used
    assert again.get("missing") is None
