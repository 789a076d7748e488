"""A classic BPF socket filter (SO_ATTACH_FILTER) for a run's raw ICMP socket.

The kernel delivers every ICMP message of the netns to every raw ICMP socket: on a host
where many pings run, most echo replies are other runs'. The filter runs on each of them
before it is queued, so the ones that do not carry this run's nonce never reach Python:
    - an echo reply (type 0) passes if its payload starts with the run's nonce (a run whose
      probes are too short for the nonce: every echo reply passes, the receiver checks the
      id and payload as before); given the run's ICMP id, one with that id passes too
      (ping counts a reply that did not echo the payload: the receiver decides);
    - an error that quotes a datagram (types 3, 4, 5, 11, 12) passes: the quote is matched
      in Python (its nonce may be cut off, or sit after IP options of the quote);
    - anything else is dropped.
A raw socket's filter sees the packet from its IP header (raw_rcv pushes back to it), so
the ICMP header is found with the MSH load X = 4 * (IHL), which copes with IP options; a
packet too short for a load is dropped by the kernel (an echo reply too short for the nonce
is not ours). A raw ICMPv6 socket's filter sees the message from its ICMPv6 header (the
IPv6 layer pulled its headers before raw delivery; iputils' ping6 filter reads it so), so
X is 0 there, and the types are ICMPv6's (echo reply 129, errors 1 to 4).
The program is a handful of instructions, assembled here by hand: no compiler
or ctypes needed (struct sock_fprog points at the array through array's buffer_info()).
The filter only saves work: the receiver still matches every datagram itself, so datagrams
queued before it was attached, or a kernel refusing it, change nothing but the cost.
"""

from __future__ import annotations

import array
import socket
import struct
from typing import NamedTuple

from mace_tools.probe.icmp import (
    ERRORS6_WITH_QUOTE,
    ERRORS_WITH_QUOTE,
    ICMP6_ECHO_REPLY,
    ICMP_ECHOREPLY,
    NONCE_LEN,
)

SO_ATTACH_FILTER = 26  # asm-generic/socket.h
# linux/bpf_common.h
BPF_LD, BPF_LDX, BPF_JMP, BPF_RET = 0x00, 0x01, 0x05, 0x06
BPF_W, BPF_H, BPF_B = 0x00, 0x08, 0x10
BPF_IMM, BPF_IND, BPF_MSH = 0x00, 0x40, 0xA0
BPF_JEQ, BPF_K = 0x10, 0x00
ACCEPT_ALL = 0xFFFFFFFF  # a return value: keep this many bytes of the packet (all of it)
ICMP_HEADER = 8

_INSN = struct.Struct("=HBBI")  # struct sock_filter {u16 code; u8 jt; u8 jf; u32 k}
_FPROG = struct.Struct("@HP")  # struct sock_fprog {unsigned short len; sock_filter *filter}


class Insn(NamedTuple):
    code: int
    jt: int  # instructions skipped when a jump's condition holds
    jf: int  # ... when it does not
    k: int


Target = int | str  # a jump target: an offset, or a label resolved by assemble()


def reply_filter(nonce: bytes | None, ident: int | None = None, family: int = 4) -> list[Insn]:
    """The program described above, for a run with this nonce (None: no nonce) and, if
    given, ICMP id, on a raw ICMP (family 4) or ICMPv6 (family 6) socket."""
    if nonce is not None and len(nonce) != NONCE_LEN:
        raise ValueError(f"a nonce is {NONCE_LEN} bytes, not {len(nonce)}")
    echo: Target = "echo" if nonce is not None else "accept"
    six = family == 6
    errors = ERRORS6_WITH_QUOTE if six else ERRORS_WITH_QUOTE
    code: list[tuple[int, Target, Target, int] | str] = [
        # X: where the ICMP header is (after an IPv4 header: 4 * (IP[0] & 0xf))
        (BPF_LDX | BPF_IMM, 0, 0, 0) if six else (BPF_LDX | BPF_B | BPF_MSH, 0, 0, 0),
        (BPF_LD | BPF_B | BPF_IND, 0, 0, 0),  # A = ICMP type
        (BPF_JMP | BPF_JEQ | BPF_K, echo, 0, ICMP6_ECHO_REPLY if six else ICMP_ECHOREPLY),
    ]
    for i, icmp_type in enumerate(errors):
        last = i == len(errors) - 1
        code.append((BPF_JMP | BPF_JEQ | BPF_K, "accept", "drop" if last else 0, icmp_type))
    if nonce is not None:
        code.append("echo")
        if ident is not None:  # the ICMP id (a big-endian H load), before the nonce
            code.append((BPF_LD | BPF_H | BPF_IND, 0, 0, 4))
            code.append((BPF_JMP | BPF_JEQ | BPF_K, "accept", 0, ident & 0xFFFF))
        for at in (0, 4):  # the nonce, as two big-endian words (a W load is big-endian)
            word = int.from_bytes(nonce[at:at + 4], "big")
            code.append((BPF_LD | BPF_W | BPF_IND, 0, 0, ICMP_HEADER + at))
            code.append((BPF_JMP | BPF_JEQ | BPF_K, 0 if at == 0 else "accept", "drop", word))
    code += ["accept", (BPF_RET | BPF_K, 0, 0, ACCEPT_ALL), "drop", (BPF_RET | BPF_K, 0, 0, 0)]
    return assemble(code)


def assemble(code: list[tuple[int, Target, Target, int] | str]) -> list[Insn]:
    """Instructions with jump targets given as offsets or as labels (a str entry marks the
    place of the next instruction); labels become the offsets the kernel wants."""
    labels: dict[str, int] = {}
    count = 0
    for entry in code:
        if isinstance(entry, str):
            labels[entry] = count
        else:
            count += 1
    program: list[Insn] = []
    for entry in code:
        if isinstance(entry, str):
            continue
        op, jt, jf, k = entry
        here = len(program) + 1  # jumps count from the next instruction
        program.append(Insn(op, _offset(jt, labels, here), _offset(jf, labels, here), k))
    return program


def _offset(target: Target, labels: dict[str, int], here: int) -> int:
    if isinstance(target, int):
        return target
    offset = labels[target] - here
    if not 0 <= offset <= 0xFF:
        raise ValueError(f"jump to {target!r} out of reach ({offset})")
    return offset


def encode(program: list[Insn]) -> bytes:
    """The struct sock_filter array the kernel copies."""
    return b"".join(_INSN.pack(*insn) for insn in program)


def attach(sock: socket.socket, program: list[Insn]) -> None:
    """Attach program to sock (replacing a filter it had); OSError if the kernel refuses."""
    insns = array.array("B", encode(program))  # alive until setsockopt has copied it
    address, _ = insns.buffer_info()
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, _FPROG.pack(len(program), address))
