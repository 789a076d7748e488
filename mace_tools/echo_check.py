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
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from mace_tools.model import WrongData
from mace_tools.probe.icmp import (
    NONCE_LEN,
    TAG_LEN,
    EchoTemplate,
    ParsedIcmp,
    fill_bytes,
)

ICMP_HEADER = 8


class Window(Protocol):
    """The run's probes in flight (pinger._Probes): by key; key_of_seq names the probe
    a 16-bit seq stands for."""

    numbered: bool
    sent: dict
    answered: set

    def key_of_seq(self, seq: int, transmitted: int) -> int | None: ...
    def number_of(self, key: int, transmitted: int) -> int: ...


class Verdict(NamedTuple):
    key: int  # the probe's key in the window
    corrupted: bool  # bad checksum: shown, counted apart, the probe still unanswered
    truncated: bool  # shorter than the probe
    wrong_data: WrongData | None


class EchoCheck:
    """The checks of one run (its probe size and payload fill)."""

    def __init__(self, size: int, pattern: bytes | None = None) -> None:
        self.size = size
        self._start = min(size, TAG_LEN)  # what a reply must carry to be keyed on its own
        self._tail = fill_bytes(size, pattern)[TAG_LEN:size]  # the same in every probe
        self._pattern = pattern

    def judge(self, p: ParsedIcmp, nonce: bytes, ident: int, window: Window,
              template: EchoTemplate, transmitted: int) -> Verdict | None:
        """The verdict on an echo reply, or None if it is not one of this run's."""
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
        return Verdict(key, corrupted, truncated, wrong)

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

