// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * mace.bpf.c: per-device kernel timestamps of mace's probes, correlated in the kernel.
 *
 * Three BTF tracepoints see every packet of every namespace on every CPU:
 *   net_dev_start_xmit  a packet leaves a device (before the driver may change it)
 *   netif_rx            a packet is queued to a device's backlog (veth, lo): the point
 *                       where capture timestamps are taken (netdev_tstamp_prequeue)
 *   netif_receive_skb   a packet is taken up by the stack (NICs, bridges, after backlog)
 *
 * One program set serves every run on the host (mace.h): a probe's payload starts with
 * its run's nonce, the key of the `runs` map. Foreign packets must cost as little as
 * possible: no run at all is one load; then skb->protocol; then a few direct loads of
 * the IPv4 or IPv6 header and what follows it (first_look: no helper call, where the
 * kernel allows it); a foreign echo costs a nonce-bit test, rarely a hash lookup more.
 * Only a packet that may be ours is copied (IPv4 + ICMP headers + nonce, a second read
 * with IP options; IPv6 + 16 bytes, more behind extension headers); at netif_receive_skb
 * such a packet is first looked up in the per-CPU veth dedup (mace_rx_seen). Nothing is
 * written to any map for foreign traffic. IPv4 and IPv6 alike: echo, UDP and TCP probes,
 * ICMP/ICMPv6 errors quoting them, SYN-ACK and RST answers (VXLAN is read over an IPv4
 * underlay only).
 *
 * For a ping run (MACE_RUN_RECORDS) the kernel keeps each probe's state, keyed by
 * (run, probe number): the request's last departure from the host netns, the reply's
 * first arrival on that same device, and sends one record per answer when the reply
 * reaches the prober's netns. A run that asks for the path (MACE_RUN_PATH: -v, JSON,
 * traceroute) also gets one event per device crossed, and correlates in userspace
 * (mace_tools/correlate.py: the same rules, and the tests hold the two to each other).
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
#define ETH_P_IPV6 0x86DD
#define IPPROTO_ICMP 1
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define ICMP_ECHOREPLY 0
#define ICMP_DEST_UNREACH 3
#define ICMP_ECHO 8
#define ICMP_TIME_EXCEEDED 11
#define IP_OFFSET_MASK 0x1fff
#define IPPROTO_ICMPV6 58
#define ICMPV6_ECHO_REQUEST 128
#define ICMPV6_ECHO_REPLY 129
#define ICMPV6_DEST_UNREACH 1
#define ICMPV6_TIME_EXCEEDED 3
/* IPv6 extension headers a probe's ICMPv6 header may sit behind (RFC 8200 order) */
#define NEXTHDR_HOP 0
#define NEXTHDR_ROUTING 43
#define NEXTHDR_FRAGMENT 44
#define NEXTHDR_DEST 60
#define IPV6_EXT_MAX 2		/* extension headers skipped at most (each one costs the verifier ~7 ms
				 * per load, measured), more: not ours */
#define IPV6_FRAG_OFFSET 0xfff8	/* fragment header: the offset bits (network order) */
#define BPF_RB_NO_WAKEUP 1 /* uapi linux/bpf.h: bpf_ringbuf_submit flags */
#define BPF_F_MMAPABLE (1U << 10) /* uapi linux/bpf.h */

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Written by the user side whenever a run joins or leaves (kernel/programs.py). */
struct mace_switches switches = {};

/* Active runs, by nonce. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MACE_MAX_RUNS);
	__type(key, __u64);
	__type(value, struct mace_run);
} mace_runs SEC(".maps");

/* Each run's own ring buffer, under its nonce, put there by the run (or the agent serving
 * it): only the holder of that ring's fd reads its records. */
struct ring {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, MACE_RING_BYTES);
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__uint(max_entries, MACE_MAX_RUNS);
	__type(key, __u64);
	__array(values, struct ring);
} mace_rings SEC(".maps");

/* Records a run's ring had no room for: one counter per run, in a map of its own under its
 * nonce, mapped into the reader's memory (BPF_F_MMAPABLE): it compares its counter at a
 * probe's send and at its reply, with no syscall, and any change marks the probes in
 * flight as incomplete (never corrected from what is left). Loss is rare, so the atomic
 * add costs nothing that matters. */
struct lost_counter {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, __u64);
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__uint(max_entries, MACE_MAX_RUNS);
	__type(key, __u64);
	__array(values, struct lost_counter);
} mace_lost SEC(".maps");

/*
 * A probe arriving on a veth or lo is seen at netif_rx and again, later and on the same
 * CPU, at netif_receive_skb; only the first is its arrival. Remember the last few
 * (skb, device) pairs that netif_rx recorded on this CPU and skip their
 * netif_receive_skb, before the packet is classified: every packet that may be ours
 * (record4, record6) is looked up there, foreign ones that pass the cheap filters too
 * (VXLAN, UDP/TCP while a traceroute runs: one per-CPU lookup). Keyed by the device's
 * address, not its ifindex (ifindex repeats across namespaces). Written for our own
 * probes only; a miss (RPS, eviction) just sends one redundant event, which the
 * per-probe state and userspace both ignore. (A foreign skb that reuses a remembered
 * address on the same device is skipped: it was not ours anyway.)
 */
#define RX_SLOTS 4
struct rx_seen {
	__u64 skb[RX_SLOTS];
	__u64 dev[RX_SLOTS];
	__u32 next;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rx_seen);
} mace_rx_seen SEC(".maps");

static __always_inline void remember_rx(const struct sk_buff *skb, const struct net_device *dev)
{
	__u32 zero = 0;
	struct rx_seen *seen = bpf_map_lookup_elem(&mace_rx_seen, &zero);
	__u32 slot;

	if (!seen)
		return;
	slot = seen->next++ & (RX_SLOTS - 1);
	seen->skb[slot] = (__u64)skb;
	seen->dev[slot] = (__u64)dev;
}

/* True (and forgotten) if netif_rx already recorded this skb on this device. */
static __always_inline bool seen_at_rx(const struct sk_buff *skb, const struct net_device *dev)
{
	__u32 zero = 0;
	struct rx_seen *seen = bpf_map_lookup_elem(&mace_rx_seen, &zero);

	if (!seen)
		return false;
	for (int i = 0; i < RX_SLOTS; i++) {
		if (seen->skb[i] == (__u64)skb && seen->dev[i] == (__u64)dev) {
			seen->skb[i] = 0;
			return true;
		}
	}
	return false;
}

/* A probe of a run. */
struct probe_id {
	__u64 nonce;	/* the run */
	__u32 number;	/* its probe */
	__u32 pad;
};

/*
 * A ping probe's state, from its request's departure from the prober netns (which
 * resets it: a number is never reused within a run, but a state is never trusted across
 * a reset either) to its reply's delivery, which sends its record and frees it. An LRU
 * map: a probe never answered is evicted in time; one evicted in flight (16384 newer
 * probes on the host during its round trip) gets no record: its reply is shown raw.
 */
struct probe_state {
	__u64 departed_ns;	/* last departure from the host netns (0: none yet) */
	__u64 returned_ns;	/* first reply arrival on that device after it */
	__u64 delivered_ns;	/* last reply arrival in the prober netns */
	__u64 outer_dev;	/* the departure's device (address): the outer device */
	__u64 delivered_dev;	/* the delivery's device: one record per device */
	__u32 host_netns;	/* known (the run's), or inferred; 0: not yet, the prober's */
	__u32 outer_netns;
	__u32 outer_ifindex;
	__u32 returned_hook;	/* enum mace_hook that stamped returned_ns */
	char outer_name[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct probe_id);
	__type(value, struct probe_state);
} mace_probes SEC(".maps");

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

struct ipv6hdr_min {
	__u8 ver_tc;
	__u8 tc_flow;
	__be16 flow;
	__be16 payload_len;
	__u8 nexthdr;
	__u8 hop_limit;
	__u8 saddr[16];
	__u8 daddr[16];
};

struct probe_hdrs6 { /* 56 bytes: the fixed IPv6 header then 16 bytes of what follows */
	struct ipv6hdr_min ip;
	__u8 l4[16];
};
_Static_assert(sizeof(struct probe_hdrs6) == 56, "probe_hdrs6 must match the wire layout");

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
 * matches a key is an answer to that probe of that run, at that device. TCP answers are
 * keyed on the reversed ports and their ack: seq + 1 for a SYN-ACK (proto | 0x80),
 * seq + 1 + payload length for a RST from a closed port (proto | 0x40).
 * Written for our own probes only; an LRU map, so it never fills up. Addresses are 16
 * bytes: IPv6, or IPv4 in the first 4 (the rest 0); proto is IPv6's next header there.
 */
struct flow_key {
	__u8 saddr[16];
	__u8 daddr[16];
	__u8 proto;
	__u8 family;	/* 4 or 6: an IPv4 key never equals an IPv6 one */
	__u8 pad[2];
	__u8 l4[8];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct flow_key);
	__type(value, struct probe_id);
} mace_flows SEC(".maps");

#define TCP_SYNACK_KEY 0x80 /* proto marker of the key a SYN-ACK answer is looked up by */
#define TCP_RST_KEY 0x40 /* ... and a RST answer */
#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

/* A record the run's ring had no room for: its probes in flight are not corrected. */
static __always_inline void count_lost(__u64 nonce)
{
	void *counter = bpf_map_lookup_elem(&mace_lost, &nonce);
	__u32 zero = 0;
	__u64 *n;

	if (!counter)
		return;
	n = bpf_map_lookup_elem(counter, &zero);
	if (n)
		__sync_fetch_and_add(n, 1);
}

/* The run whose nonce a payload starts with, or NULL: the one map lookup a foreign ICMP
 * echo costs. */
static __always_inline struct mace_run *run_of(const struct probe_tag *tag)
{
	__u64 nonce = (__u64)tag->nonce_hi << 32 | tag->nonce_lo;

	return bpf_map_lookup_elem(&mace_runs, &nonce);
}

/* saddr, daddr: 16-byte addresses (flow_key). */
static __always_inline void learn(__u8 family, const __u8 *saddr, const __u8 *daddr,
				  __u8 proto, const __u8 *l4, const struct probe_id *id)
{
	struct flow_key key = {.proto = proto, .family = family};

	__builtin_memcpy(key.saddr, saddr, 16);
	__builtin_memcpy(key.daddr, daddr, 16);
	__builtin_memcpy(key.l4, l4, 8);
	bpf_map_update_elem(&mace_flows, &key, id, BPF_ANY);
}

/* The probe an answer keyed so belongs to, copied into id; false if none. */
static __always_inline bool lookup(__u8 family, const __u8 *saddr, const __u8 *daddr,
				   __u8 proto, const __u8 *l4, struct probe_id *id)
{
	struct flow_key key = {.proto = proto, .family = family};
	struct probe_id *found;

	__builtin_memcpy(key.saddr, saddr, 16);
	__builtin_memcpy(key.daddr, daddr, 16);
	__builtin_memcpy(key.l4, l4, 8);
	found = bpf_map_lookup_elem(&mace_flows, &key);
	if (!found)
		return false;
	*id = *found;
	return true;
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

extern void *bpf_rdonly_cast(const void *obj__ign, __u32 btf_id__k) __ksym __weak;

/*
 * Can the program load from any kernel address itself? bpf_rdonly_cast(p, 0) makes p a
 * read-only pointer whose loads the JIT emits as plain loads with an exception-table
 * entry (a fault reads 0): no helper call. bpf_probe_read_kernel() of the 36 bytes a
 * first look needs was most of what a foreign packet cost: ~100 ns per program run
 * against ~70 with direct loads, where the programs' floor (switches.runs and
 * skb->protocol only) is ~61 (kernel.bpf_stats_enabled, a flood crossing the lab, 6.18).
 * The kernel's answer is a CO-RE constant: the verifier walks only one of the two ways.
 */
static __always_inline bool direct_loads(void)
{
	return bpf_core_enum_value_exists(enum bpf_features, BPF_FEAT_RDONLY_CAST_TO_VOID);
}

/* Where a program first looks at len bytes at l3: the packet itself (direct_loads), else
 * a copy made in `copy`. NULL: nothing readable there. */
static __always_inline const void *first_look(const unsigned char *l3, void *copy, __u32 len)
{
	if (direct_loads())
		return bpf_rdonly_cast(l3, 0);
	return bpf_probe_read_kernel(copy, len, l3) ? NULL : copy;
}

/* After first_look, for a packet its loads did not reject: the same bytes in `copy`
 * (there already if first_look copied them), for the many tests that follow: one helper
 * call, which costs the verifier less than copying through loads. False: unreadable. */
static __always_inline bool copy_look(const unsigned char *l3, void *copy, __u32 len)
{
	return !direct_loads() || !bpf_probe_read_kernel(copy, len, l3);
}

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

/* An ICMP error: is the datagram it quotes (at `at`) a probe of a run (as seen here)?
 * Only the quoted IP header and 8 bytes of L4 are read: RFC 792 quotes no more. */
static __always_inline bool quoted_probe4(const struct pkt *p, __u32 at, struct probe_id *id)
{
	struct {
		struct iphdr_min ip;
		__u8 l4[8];
	} q;
	__u8 saddr[16] = {}, daddr[16] = {};
	__u8 ihl;

	if (pkt_read(p, at, &q, sizeof(q)))
		return false;
	ihl = (q.ip.ver_ihl & 0x0f) * 4;
	if ((q.ip.ver_ihl >> 4) != 4 || ihl < sizeof(q.ip))
		return false;
	if (ihl > sizeof(q.ip) && pkt_read(p, at + ihl, q.l4, sizeof(q.l4)))
		return false;
	__builtin_memcpy(saddr, &q.ip.saddr, 4);
	__builtin_memcpy(daddr, &q.ip.daddr, 4);
	return lookup(4, saddr, daddr, q.ip.protocol, q.l4, id);
}

/* The same for an ICMPv6 error, whose quote starts with an IPv6 header: our probes carry
 * no extension header, but a fragmented one is quoted behind its fragment header. */
static __always_inline bool quoted_probe6(const struct pkt *p, __u32 at, struct probe_id *id)
{
	struct {
		struct ipv6hdr_min ip;
		__u8 l4[8];
	} q;
	__u8 nexthdr;

	if (pkt_read(p, at, &q, sizeof(q)) || (q.ip.ver_tc >> 4) != 6)
		return false;
	nexthdr = q.ip.nexthdr;
	if (nexthdr == NEXTHDR_FRAGMENT) { /* q.l4 holds the fragment header */
		if (*(__be16 *)&q.l4[2] & bpf_htons(IPV6_FRAG_OFFSET))
			return false; /* a later fragment: no L4 header */
		nexthdr = q.l4[0];
		if (pkt_read(p, at + sizeof(q.ip) + 8, q.l4, sizeof(q.l4)))
			return false;
	}
	return lookup(6, q.ip.saddr, q.ip.daddr, nexthdr, q.l4, id);
}

static __always_inline bool ipv6_ext(__u8 nexthdr)
{
	return nexthdr == NEXTHDR_HOP || nexthdr == NEXTHDR_ROUTING ||
	       nexthdr == NEXTHDR_FRAGMENT || nexthdr == NEXTHDR_DEST;
}

/* Where an IPv6 packet's L4 header (ICMPv6, UDP or TCP, written to *proto) is, past its
 * extension headers; 0 if there is none (another protocol, a later fragment, a chain too
 * long or cut short). */
static __always_inline __u32 ipv6_l4_at(const struct pkt *p, __u8 nexthdr, __u8 *proto)
{
	__u32 at = sizeof(struct ipv6hdr_min);

	for (int i = 0; i <= IPV6_EXT_MAX; i++) {
		__u8 ext[4];
		bool frag;

		if (nexthdr == IPPROTO_ICMPV6 || nexthdr == IPPROTO_UDP || nexthdr == IPPROTO_TCP) {
			*proto = nexthdr;
			return at;
		}
		if (i == IPV6_EXT_MAX || !ipv6_ext(nexthdr) || at + sizeof(ext) > p->linear ||
		    bpf_probe_read_kernel(ext, sizeof(ext), p->l3 + at))
			return 0;
		frag = nexthdr == NEXTHDR_FRAGMENT;
		if (frag && *(__be16 *)&ext[2] & bpf_htons(IPV6_FRAG_OFFSET))
			return 0; /* a later fragment: no L4 header */
		at += frag ? 8 : (ext[1] + 1) * 8;
		nexthdr = ext[0];
	}
	return 0;
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
		return switches.udp || vxlan(h);
	return switches.tcp && h->ip.protocol == IPPROTO_TCP;
}

/* False for an ICMP packet no run can want, judged on its first read (IPv4 header with
 * no options, then ICMP): an echo whose nonce has no bit in switches.nonce_bits, an error
 * while no run matches errors. Only for bytes read from the linear data. */
static __always_inline bool may_be_wanted(const struct probe_hdrs *h)
{
	__u32 lo;

	if (h->ip.ver_ihl != 0x45 || h->ip.protocol != IPPROTO_ICMP)
		return true;
	if (h->l4[0] != ICMP_ECHO && h->l4[0] != ICMP_ECHOREPLY)
		return switches.errors;
	lo = *(__u32 *)&h->l4[8];
	return switches.nonce_bits[(lo / 64) % (MACE_NONCE_BITS / 64)] & (1ULL << (lo % 64));
}

/* How many bytes from the IPv4 header on deciding about this packet may read. */
static __always_inline __u32 bytes_to_read(const struct probe_hdrs *h)
{
	if (h->ip.protocol == IPPROTO_UDP && vxlan(h))
		return VXLAN_INNER_L3 + sizeof(*h);
	if (switches.errors && h->ip.protocol == IPPROTO_ICMP && h->l4[0] != ICMP_ECHO &&
	    h->l4[0] != ICMP_ECHOREPLY)
		return sizeof(h->ip) + 8 + sizeof(h->ip) + 8; /* an error's quote */
	return sizeof(*h);
}

/* What a packet was found to be: whose probe, which, and what kind of packet. */
struct seen_packet {
	struct probe_id id;
	struct mace_run *run;
	__u16 seq;
	__u8 packet;
	__u8 proto;
	__u8 icmp_type;
	__u8 family;	/* 4 or 6 */
	__u8 saddr[16];	/* as seen here; IPv4: the first 4 bytes, the rest 0 */
	__u8 daddr[16];
};

/* An ICMP or ICMPv6 packet (an echo, or an error quoting a probe). */
static __always_inline bool is_icmp(const struct seen_packet *s)
{
	return s->proto == IPPROTO_ICMP || s->proto == IPPROTO_ICMPV6;
}

/* The ping probe number after an echo's nonce (MACE_RUN_RECORDS runs), else the seq. */
static __always_inline bool probe_number(const struct pkt *p, __u32 l4_at, struct seen_packet *s)
{
	__be32 number;

	if (!(s->run->flags & MACE_RUN_RECORDS)) {
		s->id.number = s->seq;
		return true;
	}
	if (pkt_read(p, l4_at + 8 + MACE_NONCE_LEN, &number, sizeof(number)))
		return false;
	s->id.number = bpf_ntohl(number);
	return true;
}

/*
 * Whether a run needs this crossing of its echo. A ping run that asks for no path uses
 * only its request's departures (follow_request) and its reply's arrivals (follow_reply),
 * plus its request's arrivals while its host netns is not known (they infer it); the
 * rest of a probe's ~14 crossings per round trip are left before any other read. (With
 * the early dedup in record4 and act's plain loads: a lab flood probe's sendto, which
 * holds its whole round trip, 14.7 -> 13.1 µs; the programs' time 4.3 -> 2.7 µs a probe.)
 */
static __always_inline bool crossing_needed(const struct mace_run *run, __u8 packet, __u8 hook)
{
	if (run->flags & (MACE_RUN_PATH | MACE_RUN_ERRORS) || !(run->flags & MACE_RUN_RECORDS))
		return true; /* (errors: every crossing teaches mace_flows the probe as seen there) */
	if (packet == MACE_PKT_REQUEST)
		return hook == MACE_HOOK_XMIT || !run->host_netns;
	return hook != MACE_HOOK_XMIT;
}

/* Classify a packet whose L4 header is at `at` (its first 16 bytes read into l4; l4_len:
 * bytes from there to the end of the IP payload), of either family (s->family, with its
 * addresses in s), crossing a device at `hook`: fills s and returns true if it is a probe
 * of an active run or an answer to one, at a crossing its run needs. */
static __always_inline bool classify(struct pkt *p, const __u8 *l4, __u8 proto, __u32 at,
				     __u32 l4_len, __u8 hook, struct seen_packet *s)
{
	bool six = s->family == 6;
	struct probe_tag tag;

	s->proto = proto;
	if (proto == (six ? IPPROTO_ICMPV6 : IPPROTO_ICMP)) {
		__u8 request = six ? ICMPV6_ECHO_REQUEST : ICMP_ECHO;

		s->icmp_type = l4[0];
		if (s->icmp_type == request ||
		    s->icmp_type == (six ? ICMPV6_ECHO_REPLY : ICMP_ECHOREPLY)) {
			s->run = run_of((struct probe_tag *)&l4[8]);
			if (!s->run)
				return false;
			s->packet = s->icmp_type == request ? MACE_PKT_REQUEST : MACE_PKT_REPLY;
			if (!crossing_needed(s->run, s->packet, hook))
				return false;
			__builtin_memcpy(&s->id.nonce, &l4[8], sizeof(s->id.nonce)); /* unaligned */
			s->seq = bpf_ntohs(*(__be16 *)&l4[6]);
			if (!probe_number(p, at, s))
				return false;
			if (s->run->flags & MACE_RUN_ERRORS && s->packet == MACE_PKT_REQUEST)
				learn(s->family, s->saddr, s->daddr, proto, l4, &s->id);
			return true;
		}
		if (switches.errors && (six ? s->icmp_type == ICMPV6_TIME_EXCEEDED ||
					      s->icmp_type == ICMPV6_DEST_UNREACH
					    : s->icmp_type == ICMP_TIME_EXCEEDED ||
					      s->icmp_type == ICMP_DEST_UNREACH)) {
			if (!(six ? quoted_probe6(p, at + 8, &s->id) :
				    quoted_probe4(p, at + 8, &s->id)))
				return false;
			s->run = bpf_map_lookup_elem(&mace_runs, &s->id.nonce);
			s->seq = s->id.number;
			s->packet = MACE_PKT_REPLY;
			return s->run != NULL;
		}
		return false;
	}
	s->icmp_type = 0;
	if (switches.udp && proto == IPPROTO_UDP) {
		s->run = run_of((struct probe_tag *)&l4[8]);
		if (!s->run || !(s->run->flags & MACE_RUN_UDP))
			return false;
		if (pkt_read(p, at + 8, &tag, sizeof(tag)))
			return false;
		s->id.nonce = (__u64)tag.nonce_hi << 32 | tag.nonce_lo;
		s->seq = s->id.number = bpf_ntohs(tag.probe);
		s->packet = MACE_PKT_REQUEST;
		learn(s->family, s->saddr, s->daddr, IPPROTO_UDP, l4, &s->id);
		return true;
	}
	if (switches.tcp && proto == IPPROTO_TCP) {
		__u8 flags = l4[13];
		__u32 doff = (l4[12] >> 4) * 4;
		__u8 key[8];

		if ((flags & (TCP_SYN | TCP_ACK)) == TCP_SYN) {
			__u32 ack;

			if (pkt_read(p, at + doff, &tag, sizeof(tag)))
				return false;
			s->run = run_of(&tag);
			if (!s->run || !(s->run->flags & MACE_RUN_TCP))
				return false;
			s->id.nonce = (__u64)tag.nonce_hi << 32 | tag.nonce_lo;
			s->seq = s->id.number = bpf_ntohs(tag.probe);
			s->packet = MACE_PKT_REQUEST;
			learn(s->family, s->saddr, s->daddr, IPPROTO_TCP, l4, &s->id);
			/* The answer: addresses and ports swapped; a SYN-ACK acks seq + 1 (the
			 * SYN counts one), a RST from a closed port acks seq + 1 + our payload
			 * length. */
			__builtin_memcpy(&key[0], &l4[2], 2);
			__builtin_memcpy(&key[2], &l4[0], 2);
			ack = bpf_ntohl(*(__be32 *)&l4[4]) + 1;
			*(__be32 *)&key[4] = bpf_htonl(ack);
			learn(s->family, s->daddr, s->saddr, IPPROTO_TCP | TCP_SYNACK_KEY, key, &s->id);
			*(__be32 *)&key[4] = bpf_htonl(ack + l4_len - doff);
			learn(s->family, s->daddr, s->saddr, IPPROTO_TCP | TCP_RST_KEY, key, &s->id);
			return true;
		}
		if ((flags & (TCP_SYN | TCP_ACK)) == (TCP_SYN | TCP_ACK) || (flags & TCP_RST)) {
			/* ports as they are, then the ack number */
			__builtin_memcpy(&key[0], &l4[0], 4);
			__builtin_memcpy(&key[4], &l4[8], 4);
			if (!lookup(s->family, s->saddr, s->daddr, IPPROTO_TCP |
				    (flags & TCP_RST ? TCP_RST_KEY : TCP_SYNACK_KEY), key, &s->id))
				return false;
			s->run = bpf_map_lookup_elem(&mace_runs, &s->id.nonce);
			s->seq = s->id.number;
			s->packet = MACE_PKT_REPLY;
			return s->run != NULL;
		}
	}
	return false;
}

/* A request crossing a device: the probe's state follows its departures (correlate.py's
 * rules: the host netns is the run's, or the first other netns the request enters; the
 * outer departure is the last one from the host netns). Returns the departure's stamp
 * when it was one from the host netns (the path's event then carries the same), else 0.
 * Called last of this program's work on a request: the packet leaves after we return. */
static __always_inline __u64 follow_request(const struct seen_packet *s,
					    const struct net_device *dev, __u32 netns,
					    __u32 ifindex, __u8 hook)
{
	struct probe_state *st;
	__u32 host;

	if (netns == s->run->prober_netns && hook == MACE_HOOK_XMIT) {
		struct probe_state fresh = {.host_netns = s->run->host_netns};

		/* Leaving the prober netns starts (or restarts) the probe's life. */
		if (bpf_map_update_elem(&mace_probes, &s->id, &fresh, BPF_ANY))
			return 0;
	}
	st = bpf_map_lookup_elem(&mace_probes, &s->id);
	if (!st)
		return 0; /* evicted, or never seen leaving the prober: no record */
	if (!st->host_netns && netns != s->run->prober_netns) {
		st->host_netns = netns; /* inferred: departures from the prober's do not count */
		st->departed_ns = 0;
	}
	host = st->host_netns ? st->host_netns : s->run->prober_netns;
	if (hook != MACE_HOOK_XMIT || netns != host)
		return 0;
	st->outer_dev = (__u64)dev;
	st->outer_netns = netns;
	st->outer_ifindex = ifindex;
	bpf_probe_read_kernel(st->outer_name, sizeof(st->outer_name), dev->name);
	st->departed_ns = bpf_ktime_get_ns(); /* last: the packet leaves after we return */
	return st->departed_ns;
}

/* One event per device crossed, into the run's ring (MACE_RUN_PATH runs). A request of a
 * records run also has its state followed here (follow_request), between filling the
 * event and stamping it: a departure's one stamp is then taken as late as can be, after
 * this program's other work, and the record and the event carry the same time. */
static __always_inline void ship_event(const struct seen_packet *s, const struct net_device *dev,
				       __u32 netns, __u32 ifindex, __u8 hook, __u64 ts,
				       bool follow)
{
	void *ring = bpf_map_lookup_elem(&mace_rings, &s->id.nonce);
	struct mace_event *e = NULL;

	if (ring) {
		e = bpf_ringbuf_reserve(ring, sizeof(*e), 0);
		if (!e)
			count_lost(s->id.nonce);
	}
	if (e) {
		e->kind = MACE_REC_EVENT;
		e->packet = s->packet;
		e->hook = hook;
		e->proto = s->proto;
		e->icmp_type = is_icmp(s) ? s->icmp_type : 0;
		e->family = s->family;
		e->seq = s->seq;
		e->number = s->id.number;
		e->netns = netns;
		e->ifindex = ifindex;
		e->pad1 = 0;
		if (s->run->flags & MACE_RUN_HIDE_HOST && netns != s->run->prober_netns) {
			/* NAT'd addresses and host devices */
			__builtin_memset(e->saddr, 0, sizeof(e->saddr));
			__builtin_memset(e->daddr, 0, sizeof(e->daddr));
			__builtin_memset(e->dev, 0, sizeof(e->dev));
		} else {
			__builtin_memcpy(e->saddr, s->saddr, sizeof(e->saddr));
			__builtin_memcpy(e->daddr, s->daddr, sizeof(e->daddr));
			/* The whole array, not a _str read: ring-buffer records are not
			 * zeroed, so bytes after a _str copy's NUL would differ per event (and
			 * defeat userspace's name cache). */
			bpf_probe_read_kernel(e->dev, sizeof(e->dev), dev->name);
		}
	}
	if (follow)
		ts = follow_request(s, dev, netns, ifindex, hook) ?: ts;
	if (!e)
		return;
	/* A departure not stamped by follow_request() is stamped here, as late as can be. */
	e->ts_ns = ts ?: bpf_ktime_get_ns();
	/* No wakeup: a wakeup runs irq_work (an IPI here) and the reader's wake-up inside
	 * the probe's own path (measured with 4 flooding neighbours: +10 µs on a flood's raw
	 * RTT and egress, -20% probes/s). Readers drain the ring when a reply reaches their
	 * socket, which is always after its records were submitted, and on every turn of
	 * their loop. */
	bpf_ringbuf_submit(e, BPF_RB_NO_WAKEUP);
}

/* A reply arriving at a device: its first arrival on the outer device, and its delivery
 * in the prober netns, which sends the probe's record. */
static __always_inline void follow_reply(const struct seen_packet *s,
					 const struct net_device *dev, __u32 netns, __u64 ts,
					 __u8 hook)
{
	struct mace_probe_record *r;
	struct probe_state *st;
	void *ring;

	st = bpf_map_lookup_elem(&mace_probes, &s->id);
	if (!st)
		return;
	if (st->departed_ns && !st->returned_ns && st->outer_dev == (__u64)dev &&
	    ts >= st->departed_ns) {
		st->returned_ns = ts;
		st->returned_hook = hook;
	}
	/* A delivery counts only after the return: an echo reply with the run's nonce that
	 * reaches the prober's netns first was never on the outer device (a forgery from
	 * inside, say), and must neither send a record nor take the real reply's place. */
	if (netns != s->run->prober_netns || !st->returned_ns ||
	    st->delivered_dev == (__u64)dev)
		return;
	st->delivered_ns = ts;
	st->delivered_dev = (__u64)dev;
	ring = bpf_map_lookup_elem(&mace_rings, &s->id.nonce);
	if (!ring)
		return;
	r = bpf_ringbuf_reserve(ring, sizeof(*r), 0);
	if (!r) {
		count_lost(s->id.nonce);
		return;
	}
	r->kind = MACE_REC_PROBE;
	r->returned_hook = st->returned_hook;
	r->pad0[0] = r->pad0[1] = 0;
	r->number = s->id.number;
	r->departed_ns = st->departed_ns;
	r->returned_ns = st->returned_ns;
	r->delivered_ns = ts;
	r->outer_netns = st->outer_netns;
	r->outer_ifindex = st->outer_ifindex;
	if (s->run->flags & MACE_RUN_HIDE_HOST && st->outer_netns != s->run->prober_netns)
		__builtin_memset(r->outer_dev, 0, sizeof(r->outer_dev));
	else
		__builtin_memcpy(r->outer_dev, st->outer_name, sizeof(r->outer_dev));
	bpf_ringbuf_submit(r, BPF_RB_NO_WAKEUP); /* see ship_event */
	/* Answered: the state is freed at once, so the LRU map, shared by every run, holds
	 * only probes in flight (and unanswered ones until they are evicted). */
	bpf_map_delete_elem(&mace_probes, &s->id);
}

/* A run the agent serves (MACE_RUN_HIDE_HOST) hears only of probes seen leaving its own
 * netns, and of their answers: its nonce is no password (it is on the wire), so a probe
 * carrying it from anywhere else must not reach its records or its path. Leaving the
 * prober netns creates the probe's state (follow_request does for ping's records); any
 * later packet of the probe is admitted only while that state exists. */
static __always_inline bool admitted(const struct seen_packet *s, __u32 netns, __u8 hook)
{
	if (s->packet == MACE_PKT_REQUEST && hook == MACE_HOOK_XMIT &&
	    netns == s->run->prober_netns) {
		if (!(s->run->flags & MACE_RUN_RECORDS && is_icmp(s))) {
			struct probe_state fresh = {.host_netns = s->run->host_netns};

			bpf_map_update_elem(&mace_probes, &s->id, &fresh, BPF_NOEXIST);
		}
		return true;
	}
	return bpf_map_lookup_elem(&mace_probes, &s->id) != NULL;
}

/*
 * The agent's limit on a client's run (struct mace_run.probe_gap_ns), checked as a request
 * leaves the prober netns: GCRA, one clock per run that moves a gap forward per crossing
 * admitted and never stays behind now; one that would put it more than
 * MACE_PROBE_BURST_NS ahead is refused. Runs on other CPUs may race on the clock: the
 * limit is kept to within a probe or two, and nothing else depends on it. A refused probe
 * gets no state in the map every run shares (mace_probes, an LRU map that a flood of
 * unanswered probes would otherwise empty of other runs' probes in flight), so no record;
 * and no event of its run's path where it left (an agent's client, MACE_RUN_HIDE_HOST,
 * none anywhere: admitted() finds no state).
 */
static __always_inline bool within_limit(struct mace_run *run)
{
	__u64 now, next, at;

	if (!run->probe_gap_ns)
		return true;
	now = bpf_ktime_get_ns();
	/* one read (volatile): another CPU may write it meanwhile */
	at = *(volatile __u64 *)&run->next_probe_ns;
	next = at > now ? at : now;
	if (next - now > MACE_PROBE_BURST_NS)
		return false;
	*(volatile __u64 *)&run->next_probe_ns = next + run->probe_gap_ns;
	return true;
}

/* What every probe or answer of a run gets, once found (record4, record6): its arrival
 * stamped, its state followed, its event shipped. ts: an arrival stamp taken already, or
 * 0. */
static __always_inline int act(const struct sk_buff *skb, const struct net_device *dev,
			       __u8 hook, struct seen_packet *s, __u64 ts)
{
	__u32 ifindex, netns;
	bool follow;

	/* An arrival is stamped as soon as the packet is known to be ours (or before a slow
	 * read of its fragments); a departure as late as can be (ship_event,
	 * follow_request): the packet leaves only after this program returns, so the
	 * program's own work must fall before the one stamp and after the other, never
	 * inside the corrected RTT. */
	if (!ts && hook != MACE_HOOK_XMIT)
		ts = bpf_ktime_get_ns();
	if (hook == MACE_HOOK_RX)
		remember_rx(skb, dev);
	/* Plain loads (tp_btf: dev is a BTF pointer; a fault reads 0): BPF_CORE_READ's helper
	 * calls cost more than the rest of act(). */
	ifindex = dev->ifindex;
	netns = dev->nd_net.net->ns.inum;
	if (s->packet == MACE_PKT_REQUEST && hook == MACE_HOOK_XMIT &&
	    netns == s->run->prober_netns && !within_limit(s->run)) {
		count_lost(s->id.nonce); /* its probes in flight get no correction */
		return 0;
	}
	if (s->run->flags & MACE_RUN_HIDE_HOST && !admitted(s, netns, hook))
		return 0;

	follow = s->run->flags & MACE_RUN_RECORDS && is_icmp(s);
	if (follow && s->packet == MACE_PKT_REPLY && hook != MACE_HOOK_XMIT)
		follow_reply(s, dev, netns, ts, hook);
	follow = follow && s->packet == MACE_PKT_REQUEST;
	if (s->run->flags & MACE_RUN_PATH)
		ship_event(s, dev, netns, ifindex, hook, ts, follow);
	else if (follow)
		follow_request(s, dev, netns, ifindex, hook);
	return 0;
}

/* A packet whose IPv4 header is at l3: act on it if it is one of our probes or an answer
 * to one. Returns early, and writes nothing, for everything else. */
static __always_inline int record4(const struct sk_buff *skb, unsigned char *l3,
				   const struct net_device *dev, __u8 hook)
{
	const struct probe_hdrs *look;
	struct probe_hdrs h;
	__u8 ihl;
	__u64 ts = 0;
	struct pkt p;

	/* Every probe and answer has at least IPv4 + 16 bytes of L4, which follow l3 for the
	 * usual 20-byte IP header. For almost every foreign packet a few of those bytes
	 * decide (not IPv4, not a protocol of ours), at no other cost: the IP header is
	 * always in the linear data (a driver or GRO pulls it). Only a packet that may be
	 * ours has its bounds looked at (bytes past the linear data are not the packet), and
	 * only one that may be wanted is copied. */
	look = first_look(l3, &h, sizeof(h));
	if (!look || !maybe_ours(look))
		return 0;
	p = pkt_at(skb, l3);
	if (p.len < sizeof(h) || (p.linear >= sizeof(h) && !may_be_wanted(look)))
		return 0; /* a foreign echo leaves here, unless its nonce was not in that look */
	if (hook == MACE_HOOK_RECEIVE && seen_at_rx(skb, dev))
		return 0; /* the arrival netif_rx took already: before any other work on it */
	if (!copy_look(l3, &h, sizeof(h)))
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
	if (ihl > sizeof(h.ip)) { /* IP options: read L4 where it really is */
		if (h.ip.protocol == IPPROTO_TCP)
			return 0; /* our SYNs carry no IP options, nor do their answers */
		if (pkt_read(&p, ihl, h.l4, sizeof(h.l4)))
			return 0;
	}
	/* Declared here, not at the top: clang zeroed it there, before the first look, on
	 * every foreign packet's way (~1 ns per run). */
	struct seen_packet s = {.family = 4};

	__builtin_memcpy(s.saddr, &h.ip.saddr, 4);
	__builtin_memcpy(s.daddr, &h.ip.daddr, 4);
	if (!classify(&p, h.l4, h.ip.protocol, ihl, bpf_ntohs(h.ip.tot_len) - ihl, hook,
		      &s))
		return 0;
	return act(skb, dev, hook, &s, ts);
}

/*
 * IPv6: a probe's L4 header (ICMPv6, UDP or TCP) follows the fixed header, or up to
 * IPV6_EXT_MAX extension headers (hop-by-hop, routing, destination options, a fragment
 * header with offset 0), which are skipped; anything else is not ours. Foreign traffic
 * costs one read of the fixed header and 16 bytes after it, as IPv4's does, and a foreign
 * echo one nonce-bit test. VXLAN is read over an IPv4 underlay only (decapsulate): an
 * IPv6 underlay's probes are seen on the overlay's devices, not the underlay's.
 */
static __always_inline bool maybe_ours6(const struct probe_hdrs6 *h)
{
	__u8 next = h->ip.nexthdr;

	if ((h->ip.ver_tc >> 4) != 6)
		return false;
	return next == IPPROTO_ICMPV6 || ipv6_ext(next) || (next == IPPROTO_UDP && switches.udp) ||
	       (next == IPPROTO_TCP && switches.tcp);
}

/* False for ICMPv6 right after the fixed header that no run can want: an echo whose nonce
 * has no bit in switches.nonce_bits, an error while no run matches errors, the rest (NDP,
 * MLD, ...) always. */
static __always_inline bool may_be_wanted6(const struct probe_hdrs6 *h)
{
	__u8 type = h->l4[0];
	__u32 lo;

	if (h->ip.nexthdr != IPPROTO_ICMPV6)
		return true;
	if (type != ICMPV6_ECHO_REQUEST && type != ICMPV6_ECHO_REPLY)
		return switches.errors && (type == ICMPV6_DEST_UNREACH || type == ICMPV6_TIME_EXCEEDED);
	lo = *(__u32 *)&h->l4[8];
	return switches.nonce_bits[(lo / 64) % (MACE_NONCE_BITS / 64)] & (1ULL << (lo % 64));
}

/* A packet whose IPv6 header is at l3: act on it if it is a probe of a run or an answer. */
static __always_inline int record6(const struct sk_buff *skb, unsigned char *l3,
				   const struct net_device *dev, __u8 hook)
{
	const struct probe_hdrs6 *look;
	struct probe_hdrs6 h;
	__u8 proto = 0;
	__u64 ts = 0;
	struct pkt p;
	__u32 at;

	look = first_look(l3, &h, sizeof(h));
	if (!look || !maybe_ours6(look))
		return 0;
	p = pkt_at(skb, l3);
	if (p.len < sizeof(h) || (p.linear >= sizeof(h) && !may_be_wanted6(look)))
		return 0; /* a foreign echo, or ICMPv6 that no run wants (NDP, MLD, errors) */
	if (hook == MACE_HOOK_RECEIVE && seen_at_rx(skb, dev))
		return 0; /* as record4 */
	if (!copy_look(l3, &h, sizeof(h)))
		return 0;
	/* Headers not in the linear data are read through a dynptr, which takes time: stamp
	 * such a packet before, as record4 does. Only the first 56 bytes are judged here (a
	 * finer test, as record4's bytes_to_read, cost the verifier 12 ms per load): a probe
	 * whose later bytes alone are in fragments is stamped after their read. */
	if (hook != MACE_HOOK_XMIT && p.linear < sizeof(h))
		ts = bpf_ktime_get_ns();
	if (p.linear < sizeof(h) && (pkt_read(&p, 0, &h, sizeof(h)) || !maybe_ours6(&h)))
		return 0;
	at = ipv6_l4_at(&p, h.ip.nexthdr, &proto);
	if (!at)
		return 0;
	if (at != sizeof(h.ip) && pkt_read(&p, at, h.l4, sizeof(h.l4)))
		return 0;
	struct seen_packet s = {.family = 6}; /* here, not at the top: as record4's */

	__builtin_memcpy(s.saddr, h.ip.saddr, 16);
	__builtin_memcpy(s.daddr, h.ip.daddr, 16);
	if (!classify(&p, h.l4, proto, at, sizeof(h.ip) + bpf_ntohs(h.ip.payload_len) - at,
		      hook, &s))
		return 0;
	return act(skb, dev, hook, &s, ts);
}

/* A packet whose network header is at l3, by its protocol. */
static __always_inline int record(const struct sk_buff *skb, unsigned char *l3,
				  const struct net_device *dev, __u8 hook)
{
	__be16 protocol = skb->protocol;

	if (protocol == bpf_htons(ETH_P_IP))
		return record4(skb, l3, dev, hook);
	if (protocol == bpf_htons(ETH_P_IPV6))
		return record6(skb, l3, dev, hook);
	return 0;
}

SEC("tp_btf/net_dev_start_xmit")
int BPF_PROG(mace_xmit, const struct sk_buff *skb, const struct net_device *dev)
{
	if (!switches.runs)
		return 0;
	/* Leaving a device, skb->data is at L2; the IP header is at network_header. */
	return record(skb, skb->head + skb->network_header, dev, MACE_HOOK_XMIT);
}

SEC("tp_btf/netif_rx")
int BPF_PROG(mace_rx, struct sk_buff *skb)
{
	if (!switches.runs)
		return 0;
	/* After eth_type_trans, skb->data is at L3 (network_header is not reset yet). */
	return record(skb, skb->data, skb->dev, MACE_HOOK_RX);
}

SEC("tp_btf/netif_receive_skb")
int BPF_PROG(mace_receive, struct sk_buff *skb)
{
	if (!switches.runs)
		return 0;
	return record(skb, skb->data, skb->dev, MACE_HOOK_RECEIVE);
}
