/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Event record shared by the kernel side (mace.bpf.c) and the user side
 * (mace_tools/kernel/events.py decodes it with struct format "<QIIIIHBB16sBBH" (48 bytes)).
 * Change both together; tests/test_events.py checks the size.
 */
#ifndef __MACE_H
#define __MACE_H

#define MACE_NONCE_LEN 8

enum mace_hook {
	MACE_HOOK_XMIT = 0,	/* net:net_dev_start_xmit: leaving a device, before the driver */
	MACE_HOOK_RX = 1,	/* net:netif_rx: queued to a device's backlog (veth, lo) */
	MACE_HOOK_RECEIVE = 2,	/* net:netif_receive_skb: taken up by the stack */
};

enum mace_packet {
	MACE_PKT_REQUEST = 0,	/* a probe: ICMP echo request, UDP or TCP SYN */
	MACE_PKT_REPLY = 1,	/* its answer: echo reply, ICMP error quoting it, SYN-ACK/RST */
};

/* Per-run configuration, written into .rodata by the loader before load. */
struct mace_config {
	__u64 nonce;		/* first MACE_NONCE_LEN payload bytes of this run's probes; 0: none */
	__u8 udp;		/* match UDP probes (payload: nonce, then u16 probe number) */
	__u8 tcp;		/* match TCP SYN probes (same payload) and their SYN-ACK/RST */
	__u8 errors;		/* match ICMP errors quoting a probe seen earlier (traceroute) */
	__u8 pad[5];
};

struct mace_event {
	__u64 ts_ns;		/* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u32 netns;		/* inode of the device's network namespace */
	__u32 ifindex;
	__u32 saddr;		/* IPv4 addresses as seen at this device (network order) */
	__u32 daddr;
	__u16 seq;		/* probe number: ICMP seq, or the u16 after a UDP/TCP nonce */
	__u8 packet;		/* enum mace_packet */
	__u8 hook;		/* enum mace_hook */
	char dev[16];
	__u8 proto;		/* IP protocol of the packet seen (1 ICMP, 6 TCP, 17 UDP) */
	__u8 icmp_type;		/* for ICMP: its type (11 time exceeded, 3 unreachable, ...) */
	__u16 pad;
};

#endif /* __MACE_H */
