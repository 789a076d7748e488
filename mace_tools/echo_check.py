"""Which probe an echo reply answers, and what ping says of it beside its time.

iputils takes any echo reply with its ICMP id for one of its own (a raw socket's id is
its pid) and then says what is wrong with it: "(BAD CHECKSUM!)" (counted as corrupted,
not received), "(truncated)" (shorter than the probe: counted), "wrong data byte ..."
(payload not as sent: counted). mace-ping keys replies on the run's nonce and probe
number instead (NAT may rewrite the id, other pings share it), and follows iputils where
that cannot let a stranger's packet count:

- a reply carrying the nonce and a number that agrees with its seq answers that probe;
  with a bad checksum it is corrupted only if its id is ours too (iputils' own test);
- a reply cut before the probe number (a path that does not echo the whole payload)
  answers the probe its seq names if its id is ours, it still carries the nonce (when
  the probe did: an id and a seq alone are guessable), what it has of the payload is
  what that probe sent, and that probe is still unanswered: a copy of an answered probe
  cut so short cannot be told from a forgery, so it is not a DUP. It is counted, as
  iputils counts it, but never corrected: the kernel matched nothing to it;
- anything else is not this run's.
Checking the payload costs the replies that are ours two compares in place; a foreign
reply is rejected on the nonce as before.

A flood reads tens of thousands of replies a second, nearly all of one kind: a full-size,
undamaged answer from the target to a probe still unanswered. PlainReply recognises that
kind in the datagram as read, without parsing it; whatever it does not recognise is
parsed and judged as above, so it decides nothing the checks above would decide otherwise.
"""

from __future__ import annotations

import socket
import struct
from typing import NamedTuple, Protocol

from mace_tools.model import WrongData
from mace_tools.probe.icmp import (
    ICMP6_ECHO_REPLY,
    ICMP_ECHOREPLY,
    IPV6_HEADER,
    NONCE_LEN,
    TAG_LEN,
    EchoTemplate,
    ParsedIcmp,
    checksum,
    fill_bytes,
)

ICMP_HEADER = 8
IPV4_HEADER = 20  # without options
# PlainReply reads these fields of a reply at once: IPv4 version and IHL, total length,
# protocol, source; ICMP type, seq, nonce and probe number. IPv6: the first byte, payload
# length, next header, source; then the same of ICMPv6.
_HEAD4 = struct.Struct(f"!BxH5xB2x4s4xB5xH{NONCE_LEN}sI")
_HEAD6 = struct.Struct(f"!B3xHB1x16s16xB5xH{NONCE_LEN}sI")


class Window(Protocol):
    """The run's probes in flight (pinger._Probes): by key; key_of_seq names the probe
    a 16-bit seq stands for."""

    numbered: bool
    sent: dict
    answered: set

    def key_of_seq(self, seq: int, transmitted: int) -> int | None: ...
    def number_of(self, key: int, transmitted: int) -> int: ...


class Verdict(NamedTuple):
    """What ping says of a reply of the run's beside its time."""

    corrupted: bool  # bad checksum: shown, counted apart, the probe still unanswered
    truncated: bool  # shorter than the probe
    wrong_data: WrongData | None


PLAIN = Verdict(False, False, None)  # nothing to say (one object: a flood's every reply)


class EchoCheck:
    """The checks of one run (its probe size and payload fill)."""

    def __init__(self, size: int, pattern: bytes | None = None) -> None:
        self.size = size
        self._start = min(size, TAG_LEN)  # what a reply must carry to be keyed on its own
        self._tail = fill_bytes(size, pattern)[TAG_LEN:size]  # the same in every probe
        self._pattern = pattern

    def judge(self, p: ParsedIcmp, nonce: bytes, ident: int, window: Window,
              template: EchoTemplate, transmitted: int) -> tuple[int, Verdict] | None:
        """The key of the probe an echo reply answers and the verdict on it, or None if
        it is not one of this run's."""
        if p.icmp_type != p.ECHO_REPLY:
            return None
        carried = p.icmp_len - ICMP_HEADER
        key = self._carried_key(p, nonce, ident, window) if carried >= self._start \
            else self._cut_key(p, ident, window, template, transmitted)
        if key is None:
            return None
        corrupted = not p.checksum_ok
        if corrupted and p.ident != ident:
            return None  # iputils' own test too: a damaged reply must at least have our id
        truncated = carried < self.size
        wrong = None if truncated or corrupted else self._wrong_data(p)
        if not (corrupted or truncated or wrong):
            return key, PLAIN
        return key, Verdict(corrupted, truncated, wrong)

    def _carried_key(self, p: ParsedIcmp, nonce: bytes, ident: int,
                     window: Window) -> int | None:
        """A reply that carries the nonce (and the number, for probes that have one)."""
        if self.size < NONCE_LEN and p.ident != ident:
            return None  # a few bytes of nonce are no key: the id must agree too
        head = nonce[:self._start]
        if not p._data.startswith(head, p._icmp + ICMP_HEADER, p._end):  # in place
            return None
        if not window.numbered:
            key = p.seq
        else:
            number = p.number
            if number is None or number & 0xFFFF != p.seq:
                return None
            key = number
        return key if key in window.sent else None

    def _cut_key(self, p: ParsedIcmp, ident: int, window: Window, template: EchoTemplate,
                 transmitted: int) -> int | None:
        """A reply cut before its key: ours only as the module docstring says, and only if
        it still carries the nonce the probe carried (an id and a seq alone are guessed
        by a forger: a raw socket's id is the pid's)."""
        if p.ident != ident or p.icmp_len - ICMP_HEADER < min(self.size, NONCE_LEN):
            return None
        key = window.key_of_seq(p.seq, transmitted)
        if key is None or key in window.answered:
            return None
        number = window.number_of(key, transmitted)
        sent = template.message(number)[ICMP_HEADER:ICMP_HEADER + self._start]
        return key if sent.startswith(p.payload) else None

    def _wrong_data(self, p: ParsedIcmp) -> WrongData | None:
        """iputils' data check, from the first byte after the nonce and number."""
        at = p._icmp + ICMP_HEADER + TAG_LEN
        if not self._tail or p._data.startswith(self._tail, at, at + len(self._tail)):
            return None
        got = p._data[at:at + len(self._tail)]
        index = next(i for i, (a, b) in enumerate(zip(self._tail, got, strict=False))
                     if a != b)
        return WrongData(TAG_LEN + index, self._tail[index], got[index], TAG_LEN, got)


class PlainReply:
    """The common reply of a run (module docstring), recognised in the datagram as read
    (an IP header, then ICMP, as every socket of ours hands it on: probe/sockets.py).
    Plain: an echo reply from the target, no IPv4 options, exactly the probe's size, the
    run's nonce, a probe number that agrees with the seq and names a probe in the window
    not yet answered, the fill as sent, and for IPv4 a good checksum (the kernel checks
    ICMPv6's). EchoCheck would judge such a reply that probe's answer, not corrupted,
    truncated, wrong or from another address; its seq is the number's low 16 bits, its
    source the target, its size the ICMP header and the probe's payload."""

    def __init__(self, family: int, size: int, nonce: bytes, source: bytes,
                 pattern: bytes | None = None) -> None:
        self.icmp_len = ICMP_HEADER + size
        header = IPV4_HEADER if family == 4 else IPV6_HEADER
        self._length = header + self.icmp_len
        self._ipv4 = family == 4
        # what the fields key() reads must be (_HEAD4, _HEAD6): IPv4 version 4 and no
        # options; IPv6 version 6 (the first byte's low half is traffic class: masked)
        self._first_mask = 0xFF if family == 4 else 0xF0
        self._expected = (0x45, self._length, socket.IPPROTO_ICMP, source, ICMP_ECHOREPLY,
                          nonce) if family == 4 else \
            (0x60, self.icmp_len, socket.IPPROTO_ICMPV6, source, ICMP6_ECHO_REPLY, nonce)
        self._head = _HEAD4 if family == 4 else _HEAD6
        self._icmp_at = header
        self._tail = fill_bytes(size, pattern)[TAG_LEN:size]
        self._tail_at = header + ICMP_HEADER + TAG_LEN
        self.ttl_at = 8 if family == 4 else 7  # its IPv4 TTL, IPv6 hop limit

    @classmethod
    def of_run(cls, family: int, size: int, nonce: bytes, target: bytes | None,
               pattern: bytes | None) -> PlainReply | None:
        """The recogniser of a run's replies to the target (packed); None where none can
        be plain: probes too short for their number, or no numeric target."""
        if size < TAG_LEN or target is None:
            return None
        return cls(family, size, nonce, target, pattern)

    def key(self, data: bytes, window: Window) -> int | None:
        """The key of the probe `data` answers if it is plain, else None."""
        if len(data) != self._length:
            return None
        # (one call for every field: this is a flood's per-reply path)
        first, length, proto, source, icmp_type, seq, nonce, key = \
            self._head.unpack_from(data)
        if (first & self._first_mask, length, proto, source, icmp_type, nonce) \
                != self._expected or key & 0xFFFF != seq or key not in window.sent \
                or key in window.answered or not data.startswith(self._tail, self._tail_at):
            return None
        if self._ipv4 and checksum(data[self._icmp_at:]) != 0:
            return None
        return key
