// SPDX-License-Identifier: Apache-2.0
/*
 * cnikit's eBPF pod datapath: tc ingress of each pod's host-side veth, that is every packet
 * a pod sends.
 *
 * An IPv4 packet to a pod of this node (an entry of `endpoints`) is handed straight into
 * that pod with bpf_redirect_peer: it enters the pod's end of its veth as if the kernel had
 * routed it there, without the node's routing table, neighbour table or netfilter. Its TTL
 * goes down by one and its Ethernet addresses become those of the destination's veth pair,
 * as a router would set them. Everything else (other nodes, the node itself, the outside,
 * ARP, IPv6) goes on into the node's stack unchanged (TC_ACT_OK).
 *
 * The maps are pinned by name under the network's and node's bpffs directory, so the
 * short-lived CNI plugin and every program instance share them.
 *
 * Build: scripts/bpf.sh (clang -O2 -g -target bpf); the object is committed.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

/* Layout shared with backend-ebpf/src/maps.rs (`Endpoint`). */
struct endpoint {
	/* The pod's host-side veth, in the node's namespace. */
	__u32 ifindex;
	/* The MAC of the pod's interface (the destination MAC to write). */
	__u8 pod_mac[ETH_ALEN];
	/* The MAC of the pod's host-side veth (the source MAC to write). */
	__u8 host_mac[ETH_ALEN];
};

/* Indexes of `counters`, shared with backend-ebpf/src/maps.rs (`Counter`). */
enum counter {
	/* Delivered into a local pod by bpf_redirect_peer. */
	COUNTER_REDIRECT_PEER = 0,
	/* IPv4, but not to a local pod: passed to the node's stack. */
	COUNTER_PASS_NOT_LOCAL = 1,
	/* Not IPv4 (ARP, IPv6) or too short: passed to the node's stack. */
	COUNTER_PASS_NOT_IPV4 = 2,
	/* To a local pod with a TTL that would expire: the stack answers with ICMP. */
	COUNTER_PASS_TTL = 3,
	COUNTER_MAX = 4,
};

/* Pod IPv4 address (network byte order) -> where that pod is plugged in. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, struct endpoint);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} endpoints SEC(".maps");

/* Per-CPU packet counters, indexed by `enum counter`. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, COUNTER_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} counters SEC(".maps");

static __always_inline void count(__u32 which)
{
	__u64 *n = bpf_map_lookup_elem(&counters, &which);

	if (n)
		*n += 1;
}

/* Like the kernel's ip_decrease_ttl: TTL minus one, header checksum updated in place. */
static __always_inline void decrease_ttl(struct iphdr *ip)
{
	__u32 check = ip->check;

	check += bpf_htons(0x0100);
	ip->check = (__u16)(check + (check >= 0xFFFF));
	ip->ttl--;
}

SEC("classifier")
int from_pod(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);
	struct endpoint *ep;

	if ((void *)(ip + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP)) {
		count(COUNTER_PASS_NOT_IPV4);
		return TC_ACT_OK;
	}
	ep = bpf_map_lookup_elem(&endpoints, &ip->daddr);
	if (!ep) {
		count(COUNTER_PASS_NOT_LOCAL);
		return TC_ACT_OK;
	}
	if (ip->ttl <= 1) {
		count(COUNTER_PASS_TTL);
		return TC_ACT_OK;
	}
	decrease_ttl(ip);
	__builtin_memcpy(eth->h_dest, ep->pod_mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, ep->host_mac, ETH_ALEN);
	count(COUNTER_REDIRECT_PEER);
	return bpf_redirect_peer(ep->ifindex, 0);
}

char _license[] SEC("license") = "Apache-2.0";
