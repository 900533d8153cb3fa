"""Every kernel struct field rsttrace's BPF programs read, resolved from BTF into OFF_* macros."""
from __future__ import annotations

from .btf import KernelBTF

# (macro, struct, member path) — every kernel field the programs read.
OFFSETS = (
    ("OFF_SOCK_NET", "sock", "__sk_common.skc_net"),
    ("OFF_SOCK_STATE", "sock", "__sk_common.skc_state"),
    ("OFF_SOCK_FLAGS", "sock", "__sk_common.skc_flags"),
    ("OFF_SOCK_SOCKET", "sock", "sk_socket"),
    ("OFF_SOCK_LINGERTIME", "sock", "sk_lingertime"),
    ("OFF_NET_NS_INUM", "net", "ns.inum"),
    ("OFF_SKB_DEV", "sk_buff", "dev"),
    ("OFF_SKB_HEAD", "sk_buff", "head"),
    ("OFF_SKB_TRANSPORT_HEADER", "sk_buff", "transport_header"),
    ("OFF_NETDEV_NET", "net_device", "nd_net"),
    ("OFF_SOCKET_ALLOC_INODE", "socket_alloc", "vfs_inode"),
    ("OFF_INODE_INO", "inode", "i_ino"),
    ("OFF_TCP_RCV_NXT", "tcp_sock", "rcv_nxt"),
    ("OFF_TCP_COPIED_SEQ", "tcp_sock", "copied_seq"),
)


def resolve_offsets(btf: KernelBTF) -> dict[str, int]:
    macros = {}
    for macro, struct, path in OFFSETS:
        macros[macro] = btf.member(struct, path).offset
    macros["SOCK_LINGER_BIT"] = btf.enum("sock_flags")["SOCK_LINGER"]
    return macros
