// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * mace.bpf.c: per-device kernel timestamps of our own ICMP echo probes.
 *
 * Three BTF tracepoints see every packet of every namespace on every CPU:
 *   net_dev_start_xmit  a packet leaves a device (before the driver may change it)
 *   netif_rx            a packet is queued to a device's backlog (veth, lo): the point
 *                       where capture timestamps are taken (netdev_tstamp_prequeue)
 *   netif_receive_skb   a packet is taken up by the stack (NICs, bridges, after backlog)
 * Foreign packets must cost as little as possible: the first check is skb->protocol,
 * then a single read of IPv4 + ICMP headers + nonce (a second only with IP options). Only probes
 * carrying this run's nonce (set in .rodata before load, one program set per run) reach
 * the ring buffer, so concurrent runs never see each other's events. Nothing is written
 * to any map for foreign traffic.
 */
#include "vmlinux_min.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include "mace.h"

#define ETH_P_IP 0x0800
#define IPPROTO_ICMP 1
#define ICMP_ECHOREPLY 0
#define ICMP_ECHO 8
#define IP_OFFSET_MASK 0x1fff

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Set by the loader before load (one program set per run); nonce 0 matches nothing. */
const volatile struct mace_config cfg = {};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 22); /* 4 MiB: ~87k events of 48 bytes */
} events SEC(".maps");

/* Events we could not record (ring buffer full), per CPU; summed by the loader. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} lost SEC(".maps");

/*
 * A probe arriving on a veth or lo is seen at netif_rx and again, later and on the same
 * CPU, at netif_receive_skb; only the first is its arrival. Remember the last few
 * (skb, ifindex) pairs that netif_rx recorded on this CPU and skip their
 * netif_receive_skb. Written for our own probes only; a miss (RPS, eviction) just sends
 * one redundant event, which userspace discards.
 */
#define RX_SLOTS 4
struct rx_seen {
	__u64 skb[RX_SLOTS];
	__u32 ifindex[RX_SLOTS];
	__u32 next;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rx_seen);
} rx_seen SEC(".maps");

static __always_inline void remember_rx(const struct sk_buff *skb, __u32 ifindex)
{
	__u32 zero = 0;
	struct rx_seen *seen = bpf_map_lookup_elem(&rx_seen, &zero);
	__u32 slot;

	if (!seen)
		return;
	slot = seen->next++ & (RX_SLOTS - 1);
	seen->skb[slot] = (__u64)skb;
	seen->ifindex[slot] = ifindex;
}

/* True (and forgotten) if netif_rx already recorded this skb on this device. */
static __always_inline bool seen_at_rx(const struct sk_buff *skb, __u32 ifindex)
{
	__u32 zero = 0;
	struct rx_seen *seen = bpf_map_lookup_elem(&rx_seen, &zero);

	if (!seen)
		return false;
	for (int i = 0; i < RX_SLOTS; i++) {
		if (seen->skb[i] == (__u64)skb && seen->ifindex[i] == ifindex) {
			seen->skb[i] = 0;
			return true;
		}
	}
	return false;
}

struct iphdr_min {
	__u8 ver_ihl;
	__u8 tos;
	__be16 tot_len;
	__be16 id;
	__be16 frag_off;
	__u8 ttl;
	__u8 protocol;
	__be16 check;
	__be32 saddr;
	__be32 daddr;
};

struct icmp_probe {
	__u8 type;
	__u8 code;
	__be16 checksum;
	__be16 id;
	__be16 seq;
	/* first MACE_NONCE_LEN payload bytes, as two u32 so the struct packs right after a
	 * 20-byte IP header (a u64 would align it to 24) */
	__u32 nonce_lo;
	__u32 nonce_hi;
};

static __always_inline void count_lost(void)
{
	__u32 zero = 0;
	__u64 *n = bpf_map_lookup_elem(&lost, &zero);

	if (n)
		*n += 1; /* per-CPU slot: no atomic needed */
}

struct probe_hdrs { /* 36 bytes, no padding: IPv4 header then ICMP */
	struct iphdr_min ip;
	struct icmp_probe icmp; /* valid as read only when the IP header has no options */
};
_Static_assert(sizeof(struct probe_hdrs) == 36, "probe_hdrs must match the wire layout");

/* l3 points at the IPv4 header of skb; record an event if it is one of our probes. */
static __always_inline int record(const struct sk_buff *skb, unsigned char *l3,
				  const struct net_device *dev, __u8 hook)
{
	struct probe_hdrs h;
	struct mace_event *e;
	__u32 ifindex;
	__u8 ihl;

	/* One read covers IPv4 + ICMP header + nonce for the usual 20-byte IP header. */
	if (bpf_probe_read_kernel(&h, sizeof(h), l3))
		return 0;
	if (h.ip.protocol != IPPROTO_ICMP || (h.ip.ver_ihl >> 4) != 4)
		return 0;
	if (h.ip.frag_off & bpf_htons(IP_OFFSET_MASK))
		return 0; /* a later fragment: no ICMP header */
	ihl = (h.ip.ver_ihl & 0x0f) * 4;
	if (ihl < sizeof(h.ip))
		return 0;
	if (ihl > sizeof(h.ip) && bpf_probe_read_kernel(&h.icmp, sizeof(h.icmp), l3 + ihl))
		return 0; /* IP options: read the ICMP part where it really is */
	if (cfg.nonce == 0 || h.icmp.nonce_lo != (__u32)cfg.nonce ||
	    h.icmp.nonce_hi != (__u32)(cfg.nonce >> 32))
		return 0;
	if (h.icmp.type != ICMP_ECHO && h.icmp.type != ICMP_ECHOREPLY)
		return 0;

	ifindex = BPF_CORE_READ(dev, ifindex);
	if (hook == MACE_HOOK_RECEIVE && seen_at_rx(skb, ifindex))
		return 0;
	if (hook == MACE_HOOK_RX)
		remember_rx(skb, ifindex);

	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count_lost();
		return 0;
	}
	e->ts_ns = bpf_ktime_get_ns();
	e->netns = BPF_CORE_READ(dev, nd_net.net, ns.inum);
	e->ifindex = ifindex;
	e->saddr = h.ip.saddr;
	e->daddr = h.ip.daddr;
	e->seq = bpf_ntohs(h.icmp.seq);
	e->packet = h.icmp.type == ICMP_ECHO ? MACE_PKT_REQUEST : MACE_PKT_REPLY;
	e->hook = hook;
	/* The whole array, not a _str read: ring-buffer records are not zeroed, so bytes
	 * after a _str copy's NUL would differ per event (and defeat userspace's name cache). */
	bpf_probe_read_kernel(e->dev, sizeof(e->dev), dev->name);
	e->cpu = bpf_get_smp_processor_id();
	bpf_ringbuf_submit(e, 0);
	return 0;
}

SEC("tp_btf/net_dev_start_xmit")
int BPF_PROG(mace_xmit, const struct sk_buff *skb, const struct net_device *dev)
{
	if (skb->protocol != bpf_htons(ETH_P_IP))
		return 0;
	/* Leaving a device, skb->data is at L2; the IPv4 header is at network_header. */
	return record(skb, skb->head + skb->network_header, dev, MACE_HOOK_XMIT);
}

SEC("tp_btf/netif_rx")
int BPF_PROG(mace_rx, struct sk_buff *skb)
{
	if (skb->protocol != bpf_htons(ETH_P_IP))
		return 0;
	/* After eth_type_trans, skb->data is at L3 (network_header is not reset yet). */
	return record(skb, skb->data, skb->dev, MACE_HOOK_RX);
}

SEC("tp_btf/netif_receive_skb")
int BPF_PROG(mace_receive, struct sk_buff *skb)
{
	if (skb->protocol != bpf_htons(ETH_P_IP))
		return 0;
	return record(skb, skb->data, skb->dev, MACE_HOOK_RECEIVE);
}
