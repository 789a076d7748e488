// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * floor_tc.bpf.c: a tc program that does nothing, for bench/hook_floor.py: attached with
 * tcx to one device (the lab host's outer device), it prices per-device attachment, the
 * alternative to tracepoints that every packet on the host crosses.
 */
#include "vmlinux_min.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("tc")
int floor_tc(void *skb)
{
	return -1; /* TC_ACT_UNSPEC: the packet goes on as if nothing were attached */
}
