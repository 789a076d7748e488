/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Types shared by the kernel side (mace.bpf.c) and the user side (mace_tools/kernel/
 * events.py decodes the records, mace_tools/kernel/programs.py writes the run entries).
 * Change both together; tests/test_events.py checks the sizes.
 *
 * One program set serves every run on the host: a run is an entry in the runs map,
 * keyed by its nonce, with its own ring buffer and its own lost-records counter, both
 * maps the run creates and puts into a map of maps under the same nonce. Every entry is
 * inserted only if its key is new (BPF_NOEXIST), so two runs can never share one; the
 * kernel only ever writes a run's records into that run's ring.
 */
#ifndef __MACE_H
#define __MACE_H

#define MACE_NONCE_LEN 8
#define MACE_MAX_RUNS 512		/* concurrent runs one program set serves (an agent
				 * probing for Prometheus holds one per probe) */
#define MACE_RING_BYTES (1 << 20)	/* each run's ring buffer: ~11k events or ~16k records */

enum mace_hook {
	MACE_HOOK_XMIT = 0,	/* net:net_dev_start_xmit: leaving a device, before the driver */
	MACE_HOOK_RX = 1,	/* net:netif_rx: queued to a device's backlog (veth, lo) */
	MACE_HOOK_RECEIVE = 2,	/* net:netif_receive_skb: taken up by the stack */
};

enum mace_packet {
	MACE_PKT_REQUEST = 0,	/* a probe: ICMP echo request, UDP or TCP SYN */
	MACE_PKT_REPLY = 1,	/* its answer: echo reply, ICMP error quoting it, SYN-ACK/RST */
};

enum mace_run_flags {
	MACE_RUN_RECORDS = 1,	/* ping: correlate in the kernel, one record per answer; the
				 * echo payload carries the probe number (u32, network order)
				 * after the nonce */
	MACE_RUN_PATH = 2,	/* also ship an event per device crossed (-v, JSON path,
				 * traceroute) */
	MACE_RUN_UDP = 4,	/* match UDP probes (payload: nonce, then u16 probe number) */
	MACE_RUN_TCP = 8,	/* match TCP SYN probes (same payload) and their SYN-ACK/RST */
	MACE_RUN_ERRORS = 16,	/* match ICMP errors quoting a probe seen earlier */
	MACE_RUN_HIDE_HOST = 32, /* a client of the agent: its records carry no host-side
				  * device names or addresses (netns and ifindex stay: numbers
				  * that name nothing outside the host) */
};

/* Value of the runs map (key: the nonce, as the first 8 payload bytes read little-endian). */
struct mace_run {
	__u32 flags;		/* enum mace_run_flags */
	__u32 prober_netns;	/* inode of the netns its probes leave from */
	__u32 host_netns;	/* inode of the container host's netns; 0: the first other
				 * netns the request enters (correlate.py's rule) */
	__u32 token_id;		/* user side only: the id of a map only the run holds; the
				 * run is alive while that map exists (any pid namespace) */
	__u32 owner_pid;	/* user side only: its pid, as its own pid namespace saw it */
	__u32 probe_gap_ns;	/* the agent's limit on a client's run: a new probe admitted
				 * every this many ns on average, in bursts of at most
				 * MACE_PROBE_BURST_NS; 0: no limit */
	__u64 next_probe_ns;	/* kernel side only: the limit's clock (0 when written) */
};

#define MACE_PROBE_BURST_NS 1000000000ULL /* a limited run may run ahead of its rate by a
					   * second's worth of probes */

#define MACE_NONCE_BITS 4096	/* nonce_bits: one bit per (first nonce word % 4096) */

/* Counts of runs that need the costlier matches: read first, on every packet. Which
 * build of mace.bpf.c a loaded set is (the first 8 bytes of the object's SHA-256, set
 * before load): a run joins only a set of its own build. And a bit per active run's
 * nonce (its first u32, little-endian, modulo MACE_NONCE_BITS): an echo whose bit is
 * clear is foreign, known without a hash lookup. */
struct mace_switches {
	__u32 runs;
	__u32 udp;
	__u32 tcp;
	__u32 errors;
	__u64 build;
	__u64 nonce_bits[MACE_NONCE_BITS / 64];
};

enum mace_record_kind {
	MACE_REC_EVENT = 1,	/* struct mace_event */
	MACE_REC_PROBE = 2,	/* struct mace_probe_record */
};

/* One probe packet at one device (MACE_RUN_PATH runs). 80 bytes. */
struct mace_event {
	__u8 kind;		/* MACE_REC_EVENT */
	__u8 packet;		/* enum mace_packet */
	__u8 hook;		/* enum mace_hook */
	__u8 proto;		/* IP protocol of the packet seen (1 ICMP, 6 TCP, 17 UDP, 58 ICMPv6) */
	__u8 icmp_type;		/* for ICMP/ICMPv6: its type (11/3 time exceeded, 3/1 unreachable) */
	__u8 family;		/* 4 or 6: how many bytes of saddr/daddr are the address */
	__u16 seq;		/* ICMP seq, or the u16 after a UDP/TCP nonce */
	__u32 number;		/* probe number: the payload's u32 (records runs), else seq */
	__u32 netns;		/* inode of the device's network namespace */
	__u32 ifindex;
	__u32 pad1;
	__u64 ts_ns;		/* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u8 saddr[16];		/* addresses as seen at this device (network order; IPv4: the */
	__u8 daddr[16];		/* first 4 bytes, the rest 0) */
	char dev[16];
};

/*
 * One answered probe, correlated in the kernel (MACE_RUN_RECORDS runs): sent when its
 * reply reaches a device of the prober's netns (its delivery). Times are CLOCK_MONOTONIC;
 * 0 where the point was not seen (then there is no corrected RTT). 56 bytes.
 */
struct mace_probe_record {
	__u8 kind;		/* MACE_REC_PROBE */
	__u8 returned_hook;	/* enum mace_hook that stamped returned_ns (correlate.py checks
				 * a netif_rx stamp against the socket's receive stamp) */
	__u8 pad0[2];
	__u32 number;		/* probe number (payload u32) */
	__u64 departed_ns;	/* the request's last departure from the host netns */
	__u64 returned_ns;	/* the reply's first arrival on that device, after it */
	__u64 delivered_ns;	/* the reply's arrival in the prober netns (this record) */
	__u32 outer_netns;	/* the device of departed_ns / returned_ns */
	__u32 outer_ifindex;
	char outer_dev[16];
};

#endif /* __MACE_H */
