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
 *
 * A packet that may be ours is read only within its bounds: headers a NIC left in page
 * fragments (napi_gro_frags) are read through an skb dynptr (kernel >= 6.12), never from
 * the memory after the linear data. A probe inside VXLAN (UDP to 4789 or 8472) is read
 * through the encapsulation, so an overlay's underlay device sees it too.
 */
#include "vmlinux_min.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include "mace.h"

#define ETH_P_IP 0x0800
#define IPPROTO_ICMP 1
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define ICMP_ECHOREPLY 0
#define ICMP_DEST_UNREACH 3
#define ICMP_ECHO 8
#define ICMP_TIME_EXCEEDED 11
#define IP_OFFSET_MASK 0x1fff
#define BPF_RB_NO_WAKEUP 1 /* uapi linux/bpf.h: bpf_ringbuf_submit flags */

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Set by the loader before load (one program set per run); nonce 0 matches nothing. */
const volatile struct mace_config cfg = {};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 22); /* 4 MiB: ~75k events of 48 bytes + 8 of header */
} events SEC(".maps");

/* Events we could not record (ring buffer full). One counter, mapped into the reader's
 * memory (BPF_F_MMAPABLE): the reader compares it at a probe's send and at its reply, with
 * no syscall, and any change marks the probes in flight as incomplete (never corrected
 * from what is left). Loss is rare, so the atomic add costs nothing that matters. */
#define BPF_F_MMAPABLE (1U << 10) /* uapi linux/bpf.h */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_MMAPABLE);
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

struct probe_hdrs { /* 36 bytes, no padding: IPv4 header then 16 bytes of L4 */
	struct iphdr_min ip;
	__u8 l4[16]; /* valid as read only when the IP header has no options */
};
_Static_assert(sizeof(struct probe_hdrs) == 36, "probe_hdrs must match the wire layout");

/* The payload every probe starts with (ICMP echo: after the 8-byte header; UDP: after
 * the 8-byte header; TCP: after the header). */
struct probe_tag {
	__u32 nonce_lo;
	__u32 nonce_hi;
	__be16 probe; /* UDP/TCP only: the probe number */
} __attribute__((packed));

/*
 * ICMP errors quote the probe's IP header and first 8 bytes of L4 (RFC 792) and NAT
 * rewrites both between the container and the outer device. So every device where a
 * probe is seen (its payload carries the nonce) teaches this map the probe's IP
 * addresses + protocol + first 8 L4 bytes *as seen there*; an ICMP error whose quote
 * matches a key is an answer to that probe, at that device. TCP answers are keyed on
 * the reversed ports and their ack: seq + 1 for a SYN-ACK (proto | 0x80), seq + 1 +
 * payload length for a RST from a closed port (proto | 0x40).
 * Written for our own probes only; an LRU map, so it never fills up.
 */
struct flow_key {
	__be32 saddr;
	__be32 daddr;
	__u8 proto;
	__u8 pad[3];
	__u8 l4[8];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct flow_key);
	__type(value, __u16);
} flows SEC(".maps");

#define TCP_SYNACK_KEY 0x80 /* proto marker of the key a SYN-ACK answer is looked up by */
#define TCP_RST_KEY 0x40 /* ... and a RST answer */
#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

static __always_inline void count_lost(void)
{
	__u32 zero = 0;
	__u64 *n = bpf_map_lookup_elem(&lost, &zero);

	if (n)
		__sync_fetch_and_add(n, 1);
}

static __always_inline bool our_nonce(const struct probe_tag *tag)
{
	return cfg.nonce != 0 && tag->nonce_lo == (__u32)cfg.nonce &&
	       tag->nonce_hi == (__u32)(cfg.nonce >> 32);
}

static __always_inline void learn(__be32 saddr, __be32 daddr, __u8 proto, const __u8 *l4,
				  __u16 probe)
{
	struct flow_key key = {.saddr = saddr, .daddr = daddr, .proto = proto};

	__builtin_memcpy(key.l4, l4, 8);
	bpf_map_update_elem(&flows, &key, &probe, BPF_ANY);
}

static __always_inline int lookup(__be32 saddr, __be32 daddr, __u8 proto, const __u8 *l4)
{
	struct flow_key key = {.saddr = saddr, .daddr = daddr, .proto = proto};
	__u16 *probe;

	__builtin_memcpy(key.l4, l4, 8);
	probe = bpf_map_lookup_elem(&flows, &key);
	return probe ? *probe : -1;
}

/*
 * Where a packet's IPv4 header is, and how much of the packet can be read from there
 * directly. The linear data of an skb ends at skb->data + (len - data_len); what follows
 * in memory is not the packet. A NIC that receives into pages (napi_gro_frags) leaves
 * the headers there, and GRO pulls only the IP header of an ICMP packet into the linear
 * part: such bytes are read through an skb dynptr, which copies from the fragments.
 */
struct pkt {
	const struct sk_buff *skb;
	unsigned char *l3;	/* the IPv4 header (after decapsulation: the inner one) */
	__s64 off;		/* l3 - skb->data: where the dynptr finds l3 */
	__u64 len;		/* bytes of the packet from l3 on */
	__u64 linear;		/* ... of which in the linear data */
};

extern int LINUX_KERNEL_VERSION __kconfig;
extern int bpf_dynptr_from_skb(struct __sk_buff *skb, __u64 flags,
			       struct bpf_dynptr *ptr__uninit) __ksym __weak;

static __always_inline struct pkt pkt_at(const struct sk_buff *skb, unsigned char *l3)
{
	unsigned char *data = skb->data;
	__u64 headlen = skb->len - skb->data_len;
	struct pkt p = {.skb = skb, .l3 = l3, .off = l3 - data};

	if (l3 >= data && p.off <= skb->len) { /* else nothing is read: len 0 */
		p.len = skb->len - p.off;
		p.linear = p.off < headlen ? headlen - p.off : 0;
	}
	return p;
}

/* len bytes from skb->data + off, wherever they are (fragments included). Not inlined: the
 * dynptr must live in a stack frame of its own (the verifier forbids any other write to
 * its slot, and an inlined copy shares slots with the caller's temporaries). */
static __noinline long read_frags(const struct sk_buff *skb, __u64 off, void *dst, __u32 len)
{
	struct bpf_dynptr frags;

	if (!skb || bpf_dynptr_from_skb((struct __sk_buff *)skb, 0, &frags))
		return -1;
	return bpf_dynptr_read(dst, len, &frags, off, 0);
}

/* len bytes at l3 + at into dst: 0, or an error when the packet has no such bytes. */
static __always_inline long pkt_read(const struct pkt *p, __u32 at, void *dst, __u32 len)
{
	if (at + len > p->len)
		return -1; /* past the end of the packet */
	if (at + len <= p->linear)
		return bpf_probe_read_kernel(dst, len, p->l3 + at);
	/* tp_btf programs may make an skb dynptr from 6.12 on (the verifier drops this
	 * branch on older kernels); there, headers in fragments are simply not seen. */
	if (LINUX_KERNEL_VERSION < KERNEL_VERSION(6, 12, 0) || p->off < 0)
		return -1;
	return read_frags(p->skb, p->off + at, dst, len);
}

/* Advance p past n bytes of encapsulation (outer headers). */
static __always_inline void pkt_skip(struct pkt *p, __u32 n)
{
	p->l3 += n;
	p->off += n;
	p->len = p->len > n ? p->len - n : 0;
	p->linear = p->linear > n ? p->linear - n : 0;
}

/* An ICMP error: is the datagram it quotes (at `at`) one of our probes (as seen here)?
 * Only the quoted IP header and 8 bytes of L4 are read: RFC 792 quotes no more. */
static __always_inline int quoted_probe(const struct pkt *p, __u32 at)
{
	struct {
		struct iphdr_min ip;
		__u8 l4[8];
	} q;
	__u8 ihl;

	if (pkt_read(p, at, &q, sizeof(q)))
		return -1;
	ihl = (q.ip.ver_ihl & 0x0f) * 4;
	if ((q.ip.ver_ihl >> 4) != 4 || ihl < sizeof(q.ip))
		return -1;
	if (ihl > sizeof(q.ip) && pkt_read(p, at + ihl, q.l4, sizeof(q.l4)))
		return -1;
	return lookup(q.ip.saddr, q.ip.daddr, q.ip.protocol, q.l4);
}

/*
 * VXLAN (UDP to 4789, the IANA port, or 8472, Linux's and flannel's default): the probe is
 * the inner packet, behind the outer IPv4 (no options) + UDP (8) + VXLAN (8) + Ethernet
 * (14) headers. Seen inside, an overlay's underlay device is a device the probe crosses,
 * so the host's outer device can be the NIC under the overlay, not the overlay device.
 */
#define VXLAN_PORT 4789
#define VXLAN_LINUX_PORT 8472
#define VXLAN_INNER_L2 (20 + 8 + 8)
#define VXLAN_INNER_L3 (VXLAN_INNER_L2 + 14)

/* An unfragmented outer IPv4 (no options) + UDP datagram to a VXLAN port? */
static __always_inline bool vxlan(const struct probe_hdrs *h)
{
	__u16 port = bpf_ntohs(*(__be16 *)&h->l4[2]);

	return h->ip.ver_ihl == 0x45 && !(h->ip.frag_off & bpf_htons(IP_OFFSET_MASK)) &&
	       (port == VXLAN_PORT || port == VXLAN_LINUX_PORT);
}

/* Move p and h to the IPv4 packet inside a VXLAN datagram; false (and both left as they
 * were, a plain UDP datagram) when there is none. */
static __always_inline bool decapsulate(struct pkt *p, struct probe_hdrs *h)
{
	struct pkt inner = *p;
	struct probe_hdrs ih;
	__be16 ethertype;

	if (pkt_read(p, VXLAN_INNER_L2 + 12, &ethertype, sizeof(ethertype)) ||
	    ethertype != bpf_htons(ETH_P_IP))
		return false;
	pkt_skip(&inner, VXLAN_INNER_L3);
	if (pkt_read(&inner, 0, &ih, sizeof(ih)) || (ih.ip.ver_ihl >> 4) != 4)
		return false;
	*p = inner;
	*h = ih;
	return true;
}

/* Could this packet be a probe of ours or an answer to one, judged by its IPv4 header
 * and the ports of a UDP datagram (VXLAN)? */
static __always_inline bool maybe_ours(const struct probe_hdrs *h)
{
	if ((h->ip.ver_ihl >> 4) != 4)
		return false;
	if (h->ip.protocol == IPPROTO_ICMP)
		return true;
	if (h->ip.protocol == IPPROTO_UDP)
		return cfg.udp || vxlan(h);
	return cfg.tcp && h->ip.protocol == IPPROTO_TCP;
}

/* How many bytes from the IPv4 header on deciding about this packet may read. */
static __always_inline __u32 bytes_to_read(const struct probe_hdrs *h)
{
	if (h->ip.protocol == IPPROTO_UDP && vxlan(h))
		return VXLAN_INNER_L3 + sizeof(*h);
	if (cfg.errors && h->ip.protocol == IPPROTO_ICMP && h->l4[0] != ICMP_ECHO &&
	    h->l4[0] != ICMP_ECHOREPLY)
		return sizeof(h->ip) + 8 + sizeof(h->ip) + 8; /* an error's quote */
	return sizeof(*h);
}

/* A packet whose IPv4 header is at l3; record an event if it is one of our probes or
 * an answer to one. Returns early, and writes nothing, for everything else. */
static __always_inline int record(const struct sk_buff *skb, unsigned char *l3,
				  const struct net_device *dev, __u8 hook)
{
	struct probe_hdrs h;
	struct probe_tag tag;
	struct mace_event *e;
	__u8 packet, icmp_type = 0;
	__u32 ifindex;
	int probe = -1;
	__u8 ihl;
	__u64 ts = 0;
	struct pkt p;

	/* Every probe and answer has at least IPv4 + 16 bytes of L4, and one read at l3
	 * covers them for the usual 20-byte IP header. For almost every foreign packet that
	 * read decides (not IPv4, not a protocol of ours), at no other cost: the IP header
	 * is always in the linear data (a driver or GRO pulls it). Only a packet that may be
	 * ours has its bounds looked at: bytes past the linear data are not the packet. */
	if (bpf_probe_read_kernel(&h, sizeof(h), l3) || !maybe_ours(&h))
		return 0;
	p = pkt_at(skb, l3);
	if (p.len < sizeof(h))
		return 0;
	/* What is not in the linear data is read through a dynptr, which takes time (1-2 µs
	 * when its code is cold): stamp such a packet before, not after. */
	if (hook != MACE_HOOK_XMIT && p.linear < bytes_to_read(&h))
		ts = bpf_ktime_get_ns();
	if (p.linear < sizeof(h) && (pkt_read(&p, 0, &h, sizeof(h)) || !maybe_ours(&h)))
		return 0; /* the first read went past the linear data: read again */
	if (h.ip.protocol == IPPROTO_UDP && vxlan(&h))
		decapsulate(&p, &h); /* or not VXLAN after all: then a UDP datagram */
	if (h.ip.frag_off & bpf_htons(IP_OFFSET_MASK))
		return 0; /* a later fragment: no L4 header */
	ihl = (h.ip.ver_ihl & 0x0f) * 4;
	if (ihl < sizeof(h.ip))
		return 0;

	if (h.ip.protocol == IPPROTO_ICMP) {
		if (ihl > sizeof(h.ip) && pkt_read(&p, ihl, h.l4, sizeof(h.l4)))
			return 0; /* IP options: read L4 where it really is */
		icmp_type = h.l4[0];
		if (icmp_type == ICMP_ECHO || icmp_type == ICMP_ECHOREPLY) {
			if (!our_nonce((struct probe_tag *)&h.l4[8]))
				return 0;
			probe = bpf_ntohs(*(__be16 *)&h.l4[6]);
			packet = icmp_type == ICMP_ECHO ? MACE_PKT_REQUEST : MACE_PKT_REPLY;
			if (cfg.errors && packet == MACE_PKT_REQUEST)
				learn(h.ip.saddr, h.ip.daddr, IPPROTO_ICMP, h.l4, probe);
		} else if (cfg.errors && (icmp_type == ICMP_TIME_EXCEEDED ||
					  icmp_type == ICMP_DEST_UNREACH)) {
			probe = quoted_probe(&p, ihl + 8);
			if (probe < 0)
				return 0;
			packet = MACE_PKT_REPLY;
		} else {
			return 0;
		}
	} else if (cfg.udp && h.ip.protocol == IPPROTO_UDP) {
		if (ihl > sizeof(h.ip) && pkt_read(&p, ihl, h.l4, sizeof(h.l4)))
			return 0;
		if (!our_nonce((struct probe_tag *)&h.l4[8]))
			return 0;
		if (pkt_read(&p, ihl + 8, &tag, sizeof(tag)))
			return 0;
		probe = bpf_ntohs(tag.probe);
		packet = MACE_PKT_REQUEST;
		learn(h.ip.saddr, h.ip.daddr, IPPROTO_UDP, h.l4, probe);
	} else if (cfg.tcp && h.ip.protocol == IPPROTO_TCP) {
		__u8 flags = h.l4[13];

		if (ihl > sizeof(h.ip))
			return 0; /* our SYNs carry no IP options; answers are keyed below */
		if ((flags & (TCP_SYN | TCP_ACK)) == TCP_SYN) {
			struct flow_key reply = {.saddr = h.ip.daddr, .daddr = h.ip.saddr,
						 .proto = IPPROTO_TCP | TCP_SYNACK_KEY};
			__u32 ack, datalen;

			if (pkt_read(&p, ihl + (h.l4[12] >> 4) * 4, &tag, sizeof(tag)))
				return 0;
			if (!our_nonce(&tag))
				return 0;
			probe = bpf_ntohs(tag.probe);
			packet = MACE_PKT_REQUEST;
			learn(h.ip.saddr, h.ip.daddr, IPPROTO_TCP, h.l4, probe);
			/* The answer: ports swapped; a SYN-ACK acks seq + 1 (the SYN counts
			 * one), a RST from a closed port acks seq + 1 + our payload length. */
			__builtin_memcpy(&reply.l4[0], &h.l4[2], 2);
			__builtin_memcpy(&reply.l4[2], &h.l4[0], 2);
			ack = bpf_ntohl(*(__be32 *)&h.l4[4]) + 1;
			datalen = bpf_ntohs(h.ip.tot_len) - ihl - (h.l4[12] >> 4) * 4;
			*(__be32 *)&reply.l4[4] = bpf_htonl(ack);
			bpf_map_update_elem(&flows, &reply, &probe, BPF_ANY);
			reply.proto = IPPROTO_TCP | TCP_RST_KEY;
			*(__be32 *)&reply.l4[4] = bpf_htonl(ack + datalen);
			bpf_map_update_elem(&flows, &reply, &probe, BPF_ANY);
		} else if ((flags & (TCP_SYN | TCP_ACK)) == (TCP_SYN | TCP_ACK) ||
			   (flags & TCP_RST)) {
			__u8 key[8];

			/* ports as they are, then the ack number */
			__builtin_memcpy(&key[0], &h.l4[0], 4);
			__builtin_memcpy(&key[4], &h.l4[8], 4);
			probe = lookup(h.ip.saddr, h.ip.daddr, IPPROTO_TCP |
				       (flags & TCP_RST ? TCP_RST_KEY : TCP_SYNACK_KEY), key);
			if (probe < 0)
				return 0;
			packet = MACE_PKT_REPLY;
		} else {
			return 0;
		}
	} else {
		return 0;
	}

	/* An arrival is stamped as soon as the packet is known to be ours (or before a slow
	 * read of its fragments, above); a departure as late as can be, below: the packet
	 * leaves only after this program returns, so the program's own work must fall before
	 * the one stamp and after the other, never inside the corrected RTT. */
	if (!ts && hook != MACE_HOOK_XMIT)
		ts = bpf_ktime_get_ns();
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
	e->netns = BPF_CORE_READ(dev, nd_net.net, ns.inum);
	e->ifindex = ifindex;
	e->saddr = h.ip.saddr;
	e->daddr = h.ip.daddr;
	e->seq = probe;
	e->packet = packet;
	e->hook = hook;
	/* The whole array, not a _str read: ring-buffer records are not zeroed, so bytes
	 * after a _str copy's NUL would differ per event (and defeat userspace's name cache). */
	bpf_probe_read_kernel(e->dev, sizeof(e->dev), dev->name);
	e->proto = h.ip.protocol;
	e->icmp_type = h.ip.protocol == IPPROTO_ICMP ? icmp_type : 0;
	e->pad = 0;
	e->ts_ns = hook == MACE_HOOK_XMIT ? bpf_ktime_get_ns() : ts;
	/* No wakeup: a wakeup runs irq_work (an IPI here) and the reader's wake-up inside
	 * the probe's own path (measured with 4 flooding neighbours: +10 µs on a flood's raw
	 * RTT and egress, -20% probes/s). Readers drain the ring when a reply reaches their
	 * socket, which is always after the reply's events were submitted, and on every turn
	 * of their loop. */
	bpf_ringbuf_submit(e, BPF_RB_NO_WAKEUP);
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
