#!/bin/bash
# Captures dnat.json, dnat.txt, dnat-iptables-save.txt, dnat-ip6tables-save.txt and conntrack.txt
# (tests/unit/test_firewall.py parses them) from private netns, deleted on exit. Run as root, from
# this folder; captured on Debian 12: nftables 1.0.6, iptables-nft 1.8.9, conntrack-tools 1.4.7.
set -euo pipefail
cd "$(dirname "$0")"
ID=$$
NS=rtd-cap-$ID C=rtd-c-$ID R=rtd-r-$ID S=rtd-s-$ID
cleanup() { for n in $NS $C $R $S; do ip netns del "$n" 2>/dev/null || true; done; }
trap cleanup EXIT

# -- a ruleset with every kind of DNAT rule ------------------------------------------------------
ip netns add $NS
inside() { ip netns exec $NS "$@"; }
inside nft -f - <<'EOF'
table ip rtd_nat {
	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		ip daddr 10.203.1.1 tcp dport 8303 dnat to 10.203.2.2:8303
		ip daddr { 10.203.1.2, 10.203.1.3 } tcp dport { 80, 8000-8010 } counter dnat to 10.203.2.3
		tcp dport 9000 dnat to 10.203.2.4:9001
		ip daddr 10.203.1.0/24 tcp dport 9100 dnat to 10.203.2.5:9100-9110
		ip daddr 10.203.1.9 dnat to 10.203.2.9
		ip daddr != 10.203.1.10 tcp dport 9200 dnat to 10.203.2.10
		ip daddr 10.203.1.53 udp dport 53 dnat to 10.203.2.53
		tcp dport 22 redirect to :2222
	}
	chain output {
		type nat hook output priority -100; policy accept;
		ip daddr 10.203.1.1 tcp dport 8303 dnat to 10.203.2.2:8303
	}
}
table inet rtd_inat {
	chain pre {
		type nat hook prerouting priority dstnat; policy accept;
		ip daddr 10.204.1.1 tcp dport 443 dnat ip to 10.204.2.2:8443
		ip6 daddr fd00:204::1 tcp dport 443 dnat ip6 to [fd00:204::2]:8443
		tcp dport 8080 dnat ip6 to [fd00:204::3]
	}
}
table ip6 rtd_nat6 {
	chain pre {
		type nat hook prerouting priority dstnat; policy accept;
		ip6 daddr fd00:206::1 tcp dport 80 dnat to [fd00:206::2]:8080
	}
}
# kube-proxy's nftables mode: services in a verdict map, endpoints in chains without an address match
table ip rtd_kube {
	set nodeport-ips {
		type ipv4_addr
		elements = { 10.203.1.1 }
	}
	map service-ips {
		type ipv4_addr . inet_proto . inet_service : verdict
		elements = { 10.97.0.10 . tcp . 53 : goto service-X/kube-dns/tcp/dns-tcp,
			     10.97.0.10 . udp . 53 : goto service-dns-udp }
	}
	map service-nodeports {
		type inet_proto . inet_service : verdict
		elements = { tcp . 30080 : goto external-web }
	}
	chain nat-prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		jump services
	}
	chain services {
		ip daddr . meta l4proto . th dport vmap @service-ips
		ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports
	}
	chain service-X/kube-dns/tcp/dns-tcp {
		ip daddr 10.97.0.10 tcp dport 53 ip saddr != 10.244.0.0/16 jump mark-for-masquerade
		numgen random mod 2 vmap { 0 : goto endpoint-a, 1 : goto endpoint-b }
	}
	chain service-dns-udp {
		goto endpoint-u
	}
	chain endpoint-a {
		meta l4proto tcp dnat to 10.244.0.5:53
	}
	chain endpoint-b {
		meta l4proto tcp dnat to 10.244.0.6:53
	}
	chain endpoint-u {
		meta l4proto udp dnat to 10.244.0.5:53
	}
	chain external-web {
		goto endpoint-web
	}
	chain endpoint-web {
		meta l4proto tcp dnat to 10.244.0.7:8080
	}
	chain mark-for-masquerade {
		meta mark set meta mark | 0x4000
	}
}
EOF
ipt() { inside iptables-nft -t nat "$@"; }
ipt -A PREROUTING -p tcp -d 10.205.1.1 --dport 8305 -j DNAT --to-destination 10.205.2.2:8305
ipt -A PREROUTING -p tcp -d 10.205.1.2 -m multiport --dports 81,82 -j DNAT --to-destination 10.205.2.3
ipt -A PREROUTING -p tcp ! -d 10.205.1.4 --dport 8306 -j DNAT --to-destination 10.205.2.6
ipt -A PREROUTING -p tcp --dport 8400:8410 -j DNAT --to-destination 10.205.2.4:8400-8410
ipt -A PREROUTING -p tcp --dport 22 -j REDIRECT --to-ports 2222
ipt -A OUTPUT -p tcp -d 10.205.1.1 --dport 8305 -j DNAT --to-destination 10.205.2.2:8305
ipt -A POSTROUTING -j MASQUERADE
# kube-proxy's iptables mode: the service's address is matched by the jump into its chains
for c in KUBE-SERVICES KUBE-SVC-DNS KUBE-SEP-A KUBE-SEP-B KUBE-NODEPORTS KUBE-EXT-WEB KUBE-SEP-W KUBE-MARK-MASQ; do
	ipt -N $c
done
ipt -A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
ipt -A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment "kube-system/kube-dns:dns-tcp cluster IP" \
	-m tcp --dport 53 -j KUBE-SVC-DNS
ipt -A KUBE-SERVICES -m comment --comment "kubernetes service nodeports" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
ipt -A KUBE-SVC-DNS -m statistic --mode random --probability 0.5 -j KUBE-SEP-A
ipt -A KUBE-SVC-DNS -j KUBE-SEP-B
ipt -A KUBE-SEP-A -s 10.244.0.5/32 -j KUBE-MARK-MASQ
ipt -A KUBE-SEP-A -p tcp -m tcp -j DNAT --to-destination 10.244.0.5:53
ipt -A KUBE-SEP-B -p tcp -m tcp -j DNAT --to-destination 10.244.0.6:53
ipt -A KUBE-NODEPORTS -p tcp -m tcp --dport 30080 -j KUBE-EXT-WEB
ipt -A KUBE-EXT-WEB -j KUBE-SEP-W
ipt -A KUBE-SEP-W -p tcp -m tcp -j DNAT --to-destination 10.244.0.7:8080
ipt -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
# After the ip table, nft 1.0.6 cannot translate this xt DNAT: its text lacks the target.
inside ip6tables-nft -t nat -A PREROUTING -p tcp -d fd00:205::1 --dport 80 -j DNAT --to-destination '[fd00:205::2]:8080'

inside nft -j -a list ruleset > dnat.json
inside nft -a list ruleset > dnat.txt 2>/dev/null
inside iptables-nft-save -t nat | grep -v '^#' > dnat-iptables-save.txt
inside ip6tables-nft-save -t nat | grep -v '^#' > dnat-ip6tables-save.txt

# -- conntrack entries of a router that DNATs its own address to a server -----------------------
for n in $C $R $S; do ip netns add $n; ip -n $n link set lo up; done
ip link add cr0 netns $C type veth peer name rc0 netns $R
ip link add rs0 netns $R type veth peer name sr0 netns $S
ip -n $C addr add 10.203.1.2/24 dev cr0
ip -n $C -6 addr add fd00:203:1::2/64 dev cr0 nodad
ip -n $R addr add 10.203.1.1/24 dev rc0
ip -n $R -6 addr add fd00:203:1::1/64 dev rc0 nodad
ip -n $R addr add 10.203.2.1/24 dev rs0
ip -n $R -6 addr add fd00:203:2::1/64 dev rs0 nodad
ip -n $S addr add 10.203.2.2/24 dev sr0
ip -n $S -6 addr add fd00:203:2::2/64 dev sr0 nodad
for l in "$C cr0" "$R rc0" "$R rs0" "$S sr0"; do set -- $l; ip -n $1 link set $2 up; done
ip -n $S route add default via 10.203.2.1
ip -n $S -6 route add default via fd00:203:2::1
ip netns exec $R sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
ip netns exec $R nft -f - <<'EOF'
table inet rtd_nat {
	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		ip daddr 10.203.1.1 tcp dport { 8303, 8304 } dnat ip to 10.203.2.2
		ip6 daddr fd00:203:1::1 tcp dport 8303 dnat ip6 to fd00:203:2::2
	}
}
EOF
# 8304: the server drops the SYN, the entry stays unreplied.
ip netns exec $S nft add table inet rtd_drop
ip netns exec $S nft 'add chain inet rtd_drop in { type filter hook input priority 0; }'
ip netns exec $S nft add rule inet rtd_drop in tcp dport 8304 drop
ip netns exec $S python3 -c '
import socket, sys
ls = []
for family, addr in ((socket.AF_INET, "10.203.2.2"), (socket.AF_INET6, "fd00:203:2::2")):
    s = socket.socket(family); s.bind((addr, 8303)); s.listen(); ls.append(s)
held = [s.accept()[0] for s in ls]
for c in held: c.send(b"x")
sys.stdin.read()' < <(sleep 10) &
SERVER=$!
ip netns exec $C python3 -c '
import socket, subprocess, sys, time
def connect(addr):
    for _ in range(100):                # until the server listens
        try:
            return socket.create_connection((addr, 8303), timeout=3)
        except ConnectionRefusedError:
            time.sleep(0.02)
held = [connect(a) for a in ("10.203.1.1", "fd00:203:1::1")]
for c in held: assert c.recv(1) == b"x"        # the ACKs went through the router: both entries assured
s = socket.socket(); s.setblocking(False); s.connect_ex(("10.203.1.1", 8304))
for _ in range(100):
    out = subprocess.run(["ip", "netns", "exec", sys.argv[1], "conntrack", "-L", "-o", "extended,id"],
                         capture_output=True, text=True).stdout
    if "dport=8304" in out: break
    time.sleep(0.02)
print(out, end="")' $R | sort > conntrack.txt
kill $SERVER
