// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * stamp_tc.bpf.c: where per-device attachment would stamp a probe (bench/tcx_stamps.py).
 * Attached by tcx to the lab host's outer device (its near end): a run's echo requests
 * at egress, stamped last as mace stamps a departure, and its replies at ingress, stamped
 * first, with the kernel's receive stamp of the reply (skb->tstamp) beside ours. Attached
 * to the outer link's far end at ingress: the kernel's receive stamp of the request. The
 * two kernel stamps are truth v2's (both REALTIME, taken at netif_rx on veth while a
 * socket asks for timestamps, as the prober's does). Keyed by ICMP seq.
 * UAPI headers only: it reads __sk_buff, which mace's own programs never see.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

const volatile __u64 nonce = 0; /* the run's first 8 payload bytes, as on the wire */

/* keys' first field: bench/tcx_stamps.py reads them by these numbers */
enum { EGRESS, INGRESS, KERNEL_RX, FAR_KERNEL_RX };
enum { ECHO_REPLY = 0, ECHO_REQUEST = 8 };

struct key {
	__u32 what;
	__u32 seq;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 2 * 65536);
	__type(key, struct key);
	__type(value, __u64);
} stamps SEC(".maps");

struct echo {
	__u8 type, code;
	__u16 csum, id, seq;
	__u64 nonce;
};

/* The run's echo of this type in the packet, or NULL. */
static __always_inline struct echo *ours(struct __sk_buff *skb, __u8 type)
{
	void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct echo *icmp = (void *)(ip + 1);

	if ((void *)(icmp + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP) ||
	    ip->ihl != 5 || ip->protocol != 1 /* ICMP */ || icmp->type != type ||
	    icmp->nonce != nonce)
		return NULL;
	return icmp;
}

static __always_inline void put(__u32 what, __u16 seq, __u64 value)
{
	struct key k = { what, bpf_ntohs(seq) };

	bpf_map_update_elem(&stamps, &k, &value, BPF_NOEXIST);
}

SEC("tc")
int stamp_egress(struct __sk_buff *skb)
{
	struct echo *icmp = ours(skb, ECHO_REQUEST);

	if (icmp)
		put(EGRESS, icmp->seq, bpf_ktime_get_ns()); /* last: it leaves after us */
	return -1; /* TC_ACT_UNSPEC */
}

SEC("tc")
int stamp_ingress(struct __sk_buff *skb)
{
	__u64 now = bpf_ktime_get_ns(); /* first: it arrived before us */
	struct echo *icmp = ours(skb, ECHO_REPLY);

	if (icmp) {
		put(INGRESS, icmp->seq, now);
		put(KERNEL_RX, icmp->seq, skb->tstamp);
	}
	return -1;
}

SEC("tc")
int stamp_far(struct __sk_buff *skb)
{
	struct echo *icmp = ours(skb, ECHO_REQUEST);

	if (icmp)
		put(FAR_KERNEL_RX, icmp->seq, skb->tstamp);
	return -1;
}
