// SPDX-License-Identifier: Apache-2.0
/*
 * cnikit's eBPF pod datapath.
 *
 * from_pod, on the tc ingress of each pod's host-side veth (every packet a pod sends):
 * an IPv4 packet to a pod of this node (an entry of `endpoints`) is handed straight into
 * that pod with bpf_redirect_peer: it enters the pod's end of its veth as if the kernel had
 * routed it there, without the node's routing table, neighbour table or netfilter. Its TTL
 * goes down by one and its Ethernet addresses become those of the destination's veth pair,
 * as a router would set them. A packet to a block of another node (an entry of `remotes`,
 * written by the node agent's `ebpf` routing mode) gets that node's underlay address and
 * the VNI as its tunnel key and is redirected to the node's collect_md VXLAN device, which
 * encapsulates it. Everything else (the node itself, the outside, ARP, IPv6) goes on into
 * the node's stack unchanged (TC_ACT_OK).
 *
 * from_tunnel, on the tc ingress of the VXLAN device (every packet another node sent
 * through the tunnel): a packet of our VNI to a pod of this node goes into it by
 * bpf_redirect_peer, as above; anything else of our VNI goes to the node's stack.
 *
 * to_tunnel, on the tc egress of the VXLAN device: a packet the node's own stack routed
 * into the tunnel (the node talking to a pod of another node, or answering one) gets the
 * tunnel key of its destination's block; one that has none is dropped, as the device could
 * not send it anywhere.
 *
 * The maps are pinned by name under the network's and node's bpffs directory, so the
 * short-lived CNI plugin and every program instance share them.
 *
 * Build: scripts/bpf.sh (clang -O2 -g -target bpf); the object is committed.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
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
	/* To a block of another node: tunnel key set, redirected to the VXLAN device. */
	COUNTER_REDIRECT_TUNNEL = 4,
	/* To a block of another node, but no VXLAN device is set up: passed to the stack. */
	COUNTER_PASS_NO_TUNNEL = 5,
	/* From the tunnel, delivered into a local pod by bpf_redirect_peer. */
	COUNTER_TUNNEL_REDIRECT_PEER = 6,
	/* From the tunnel, not to a local pod (or not IPv4): passed to the node's stack. */
	COUNTER_TUNNEL_PASS = 7,
	/* From the tunnel with another VNI (or no tunnel key): dropped. */
	COUNTER_TUNNEL_DROP_VNI = 8,
	/* Sent by the node's stack into the tunnel: tunnel key set from `remotes`. */
	COUNTER_STACK_TO_TUNNEL = 9,
	/* Sent by the node's stack into the tunnel to no known block: dropped. */
	COUNTER_STACK_DROP_NO_REMOTE = 10,
	COUNTER_MAX = 11,
};

/* Key of `remotes`: a prefix length and an IPv4 address (network byte order). */
struct lpm_v4 {
	__u32 prefixlen;
	__u32 addr;
};

/* The VXLAN device of the node (value of `tunnel`, index 0; written by the node agent). */
struct tunnel {
	/* Its index in the node's namespace; 0 while there is none. */
	__u32 ifindex;
	/* The VNI every node of the network uses. */
	__u32 vni;
};

/* Pod IPv4 address (network byte order) -> where that pod is plugged in. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, struct endpoint);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} endpoints SEC(".maps");

/* Block of another node -> that node's underlay IPv4 address (network byte order). */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 16384);
	__type(key, struct lpm_v4);
	__type(value, __u32);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} remotes SEC(".maps");

/* The node's VXLAN device (one entry). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct tunnel);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tunnel SEC(".maps");

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

/* The node's VXLAN device, NULL while there is none. */
static __always_inline struct tunnel *tunnel_device(void)
{
	__u32 zero = 0;
	struct tunnel *t = bpf_map_lookup_elem(&tunnel, &zero);

	return t && t->ifindex ? t : NULL;
}

/* The underlay address (network byte order) of the node whose block holds `daddr`. */
static __always_inline __u32 *remote_of(__u32 daddr)
{
	struct lpm_v4 key = { .prefixlen = 32, .addr = daddr };

	return bpf_map_lookup_elem(&remotes, &key);
}

/* Sets the tunnel key: to `underlay` (network byte order), with the network's VNI. */
static __always_inline long set_key(struct __sk_buff *skb, __u32 underlay, __u32 vni)
{
	struct bpf_tunnel_key key = {
		.remote_ipv4 = bpf_ntohl(underlay),
		.tunnel_id = vni,
		.tunnel_ttl = 64,
	};

	return bpf_skb_set_tunnel_key(skb, &key, sizeof(key), 0);
}

/* Hands an IPv4 packet into the pod of `ep` as a router would: TTL minus one, Ethernet
 * addresses of the pod's veth pair; one whose TTL would expire goes to the stack. */
static __always_inline int into_pod(struct ethhdr *eth, struct iphdr *ip, struct endpoint *ep,
				    __u32 counter)
{
	if (ip->ttl <= 1) {
		count(COUNTER_PASS_TTL);
		return TC_ACT_OK;
	}
	decrease_ttl(ip);
	__builtin_memcpy(eth->h_dest, ep->pod_mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, ep->host_mac, ETH_ALEN);
	count(counter);
	return bpf_redirect_peer(ep->ifindex, 0);
}

SEC("classifier")
int from_pod(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);
	struct endpoint *ep;
	struct tunnel *t;
	__u32 *underlay;

	if ((void *)(ip + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP)) {
		count(COUNTER_PASS_NOT_IPV4);
		return TC_ACT_OK;
	}
	ep = bpf_map_lookup_elem(&endpoints, &ip->daddr);
	if (ep)
		return into_pod(eth, ip, ep, COUNTER_REDIRECT_PEER);

	underlay = remote_of(ip->daddr);
	if (!underlay) {
		count(COUNTER_PASS_NOT_LOCAL);
		return TC_ACT_OK;
	}
	t = tunnel_device();
	if (!t) {
		count(COUNTER_PASS_NO_TUNNEL);
		return TC_ACT_OK;
	}
	if (ip->ttl <= 1) {
		count(COUNTER_PASS_TTL);
		return TC_ACT_OK;
	}
	decrease_ttl(ip);
	if (set_key(skb, *underlay, t->vni) < 0) {
		count(COUNTER_PASS_NO_TUNNEL);
		return TC_ACT_SHOT;
	}
	count(COUNTER_REDIRECT_TUNNEL);
	return bpf_redirect(t->ifindex, 0);
}

SEC("classifier")
int from_tunnel(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);
	struct bpf_tunnel_key key = {};
	struct endpoint *ep;
	struct tunnel *t;

	t = tunnel_device();
	if (!t || bpf_skb_get_tunnel_key(skb, &key, sizeof(key), 0) < 0 ||
	    key.tunnel_id != t->vni) {
		count(COUNTER_TUNNEL_DROP_VNI);
		return TC_ACT_SHOT;
	}
	/* The inner frame is addressed to the sending node's idea of this device: the stack
	 * takes it as this host's. */
	bpf_skb_change_type(skb, PACKET_HOST);
	if ((void *)(ip + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP)) {
		count(COUNTER_TUNNEL_PASS);
		return TC_ACT_OK;
	}
	ep = bpf_map_lookup_elem(&endpoints, &ip->daddr);
	if (!ep) {
		count(COUNTER_TUNNEL_PASS);
		return TC_ACT_OK;
	}
	return into_pod(eth, ip, ep, COUNTER_TUNNEL_REDIRECT_PEER);
}

SEC("classifier")
int to_tunnel(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);
	struct bpf_tunnel_key key = {};
	struct tunnel *t;
	__u32 *underlay;

	/* Redirected by from_pod: the key is set already. */
	if (bpf_skb_get_tunnel_key(skb, &key, sizeof(key), 0) == 0)
		return TC_ACT_OK;
	t = tunnel_device();
	if (!t || (void *)(ip + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP)) {
		count(COUNTER_STACK_DROP_NO_REMOTE);
		return TC_ACT_SHOT;
	}
	underlay = remote_of(ip->daddr);
	if (!underlay || set_key(skb, *underlay, t->vni) < 0) {
		count(COUNTER_STACK_DROP_NO_REMOTE);
		return TC_ACT_SHOT;
	}
	count(COUNTER_STACK_TO_TUNNEL);
	return TC_ACT_OK;
}

char _license[] SEC("license") = "Apache-2.0";
