// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * floor.bpf.c: programs that do nothing, on mace's three tracepoints. The bench attaches
 * them beside mace's set while foreign floods run (bench/floor.py) and reads the kernel's
 * ns per run of both: what any program costs per run here (the trampoline's entry and the
 * stats' own clock reads, kernel.bpf_stats_enabled) against what mace's foreign path adds.
 */
#include "vmlinux_min.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("tp_btf/net_dev_start_xmit")
int BPF_PROG(floor_xmit)
{
	return 0;
}

SEC("tp_btf/netif_rx")
int BPF_PROG(floor_rx)
{
	return 0;
}

SEC("tp_btf/netif_receive_skb")
int BPF_PROG(floor_receive)
{
	return 0;
}
