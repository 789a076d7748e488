/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The few kernel types mace.bpf.c reads, instead of a 3 MB generated vmlinux.h.
 *
 * Every struct is marked preserve_access_index, so each field access is a CO-RE
 * relocation: libbpf resolves the real offsets from the running kernel's BTF
 * (/sys/kernel/btf/vmlinux) at load time. Field order and the missing fields here do
 * not matter; only names and types do. Anonymous unions/structs in the real kernel
 * (sk_buff's "headers" group) are matched by libbpf's member search.
 */
#ifndef __MACE_VMLINUX_MIN_H
#define __MACE_VMLINUX_MIN_H

typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef signed char __s8;
typedef short __s16;
typedef int __s32;
typedef long long __s64;
typedef __u16 __be16;
typedef __u32 __be32;
typedef __u32 __wsum;
typedef _Bool bool;
enum { false = 0, true = 1 };

#define BPF_ANY 0
#define BPF_NOEXIST 1

enum bpf_map_type {
	BPF_MAP_TYPE_HASH = 1,
	BPF_MAP_TYPE_ARRAY = 2,
	BPF_MAP_TYPE_PERCPU_ARRAY = 6,
	BPF_MAP_TYPE_LRU_HASH = 9,
	BPF_MAP_TYPE_HASH_OF_MAPS = 13,
	BPF_MAP_TYPE_RINGBUF = 27,
};

/* Features the verifier has beyond what its version says (kernel/bpf/verifier.c); CO-RE
 * asks whether the running kernel's BTF lists an enumerator (bpf_core_enum_value_exists). */
enum bpf_features {
	BPF_FEAT_RDONLY_CAST_TO_VOID = 0, /* bpf_rdonly_cast(p, 0): direct loads from any p */
};

#pragma clang attribute push(__attribute__((preserve_access_index)), apply_to = record)

struct ns_common {
	unsigned int inum;
};

struct net {
	struct ns_common ns;
};

typedef struct {
	struct net *net;
} possible_net_t;

struct net_device {
	char name[16];
	int ifindex;
	possible_net_t nd_net;
};

struct sk_buff {
	struct net_device *dev;
	unsigned int len;
	unsigned int data_len;	/* bytes in page fragments: len - data_len are linear */
	__be16 protocol;
	__u16 network_header;
	unsigned char *head;
	unsigned char *data;
};

#pragma clang attribute pop

/* UAPI types (no CO-RE): the opaque dynptr and the context type of bpf_dynptr_from_skb()
 * (an empty struct, not a forward declaration: libbpf matches the kfunc's prototype). */
struct bpf_dynptr {
	__u64 __opaque[2];
} __attribute__((aligned(8)));

struct __sk_buff {
};

#endif /* __MACE_VMLINUX_MIN_H */
