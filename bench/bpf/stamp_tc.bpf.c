// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * stamp_tc.bpf.c: where per-device attachment would stamp a probe (bench/tcx_stamps.py).
 * Attached by tcx to the lab host's outer device: a run's echo requests at egress and its
 * replies at ingress, keyed by ICMP seq, with the kernel's receive stamp of the reply
 * (skb->tstamp: REALTIME, taken at netif_rx on veth) beside our ingress stamp.
 * UAPI headers only: it reads __sk_buff, which mace's own programs never see.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

const volatile __u64 nonce = 0; /* the run's first 8 payload bytes, as on the wire */

enum { EGRESS, INGRESS, KERNEL_RX };

struct key {
	__u32 what;
	__u32 seq;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 3 * 65536);
	__type(key, struct key);
	__type(value, __u64);
} stamps SEC(".maps");

struct echo {
	__u8 type, code;
	__u16 csum, id, seq;
	__u64 nonce;
};

static __always_inline void stamp(struct __sk_buff *skb, __u32 what, __u8 type)
{
	__u64 now = bpf_ktime_get_ns(); /* first: as mace's programs stamp at entry */
	void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct echo *icmp = (void *)(ip + 1);

	if ((void *)(icmp + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP) ||
	    ip->ihl != 5 || ip->protocol != 1 /* ICMP */ || icmp->type != type ||
	    icmp->nonce != nonce)
		return;
	struct key k = { what, bpf_ntohs(icmp->seq) };
	bpf_map_update_elem(&stamps, &k, &now, BPF_NOEXIST);
	if (what == INGRESS) {
		__u64 rx = skb->tstamp;
		k.what = KERNEL_RX;
		bpf_map_update_elem(&stamps, &k, &rx, BPF_NOEXIST);
	}
}

SEC("tc")
int stamp_egress(struct __sk_buff *skb)
{
	stamp(skb, EGRESS, 8); /* echo request */
	return -1; /* TC_ACT_UNSPEC */
}

SEC("tc")
int stamp_ingress(struct __sk_buff *skb)
{
	stamp(skb, INGRESS, 0); /* echo reply */
	return -1;
}
