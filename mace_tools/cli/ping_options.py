"""iputils ping's option values, checked and worded as ping.c and ping_common.c check them
(iputils 20221126 and its current source agree on all of these).

Each parser takes the option's text and returns its value or raises a MaceError whose
message is ping's line without the "ping: " (the CLI prints it with mace-ping's name).
One difference on purpose: iputils exits 1 for the strtol_or_err family (-c -l -S -e -m
...) and 2 for the others; mace-ping exits 2 for every bad value, as for every usage
error.
"""

from __future__ import annotations

import os
import re
import string

from mace_tools.cli.common import LONG_MAX, c_long, strtol_or_err
from mace_tools.errors import MaceError
from mace_tools.probe.sockopts import FLOWLABEL_MASK, PMTUDISC

ULONG_MAX = 2**64 - 1
MAX_DUP_CHK = 0x10000  # iputils' window of seqs: -l's bound
MAX_USER_PRELOAD = 3  # -l for a user other than root
TOS_MAX = 255
_C_HEX = re.compile(r"[ \t\n\v\f\r]*[+-]?(?:0[xX])?[0-9a-fA-F]+")
TIMESTAMP_TYPES = ("tsonly", "tsandaddr", "tsprespec")
IP_OPTIONS_UNSUPPORTED = ("not supported: IP options make the probe's header longer than "
                          "20 bytes, and the eBPF programs match echo probes without "
                          "options only (bpf/mace.bpf.c), so no reply could be corrected")


def strtoul_or_err(text: str, lo: int, hi: int, what: str = "invalid argument") -> int:
    """iputils' strtoul_or_err: C's strtoul (a minus sign wraps, as in C) in lo..hi."""
    value = c_long(text)
    if value is None:
        raise MaceError(f"{what}: '{text}'")
    if not -ULONG_MAX <= value <= ULONG_MAX:  # strtoul's ERANGE
        raise MaceError(f"{what}: '{text}': Numerical result out of range")
    value %= 2**64
    if not lo <= value <= hi:
        raise MaceError(f"{what}: '{text}': out of range: {lo} <= value <= {hi}")
    return value


def _c_int(value: int) -> int:
    """C's (int) cast of a long: the low 32 bits, signed."""
    value &= 0xFFFFFFFF
    return value - 2**32 if value >= 2**31 else value


def _strtol_prefix(text: str, base: int) -> tuple[int, str]:
    """C's strtol(text, &end, base) with base 10 or 16: its value (saturated to a long,
    as on ERANGE) and what it left unread."""
    pattern = _C_HEX if base == 16 else re.compile(r"[ \t\n\v\f\r]*[+-]?[0-9]+")
    found = pattern.match(text)
    if found is None:
        return 0, text
    value = int(found.group(), base)
    return max(-LONG_MAX - 1, min(value, LONG_MAX)), text[found.end():]


def _hex_or_decimal(text: str) -> tuple[int, str]:
    """ping's parsetos/parseflow: after "0x" in hex, else in decimal."""
    if text[:2] in ("0x", "0X"):
        return _strtol_prefix(text[2:], 16)
    return _strtol_prefix(text, 10)


def parse_tos(text: str) -> int:
    """-Q: ping's parsetos."""
    value, rest = _hex_or_decimal(text)
    if rest:
        raise MaceError(f"bad TOS value: {text}")
    tos = _c_int(value)
    if tos > TOS_MAX:
        raise MaceError(f"the decimal value of TOS bits must be in range 0-255: {tos}")
    return tos


def parse_flowlabel(text: str) -> int:
    """-F: ping's parseflow (the flow label of IPv6 probes; IPv4 ones have none)."""
    value, rest = _hex_or_decimal(text)
    if rest:
        raise MaceError(f"bad value for flowinfo: {text}")
    if _c_int(value) % 2**64 & ~FLOWLABEL_MASK:
        raise MaceError(f"flow value is greater than 20 bits: {text}")
    return value


def parse_pmtudisc(text: str) -> int:
    """-M do|dont|want|probe."""
    try:
        return PMTUDISC[text]
    except KeyError:
        raise MaceError(f"invalid -M argument: {text}") from None


def parse_pattern(text: str) -> bytes:
    """-p: up to 16 bytes as hex digit pairs (sscanf's %2x: a last odd digit is a byte)."""
    for at, char in enumerate(text):
        if char not in string.hexdigits:
            raise MaceError(f"patterns must be specified as hex digits: {text[at:]}")
    return bytes(int(text[at:at + 2], 16) for at in range(0, min(len(text), 32), 2))


def parse_preload(text: str) -> int:
    """-l: 1..65536; at most 3 for a user other than root."""
    preload = strtol_or_err(text, 1, MAX_DUP_CHK)
    if os.getuid() != 0 and preload > MAX_USER_PRELOAD:
        raise MaceError(f"cannot set preload to value greater than 3: {preload}")
    return preload


def check_ip_options(record_route: bool, timestamp: str | None) -> None:
    """-R and -T: checked as ping checks them, then refused in one line (why: above)."""
    if timestamp is not None and timestamp not in TIMESTAMP_TYPES:
        raise MaceError(f"invalid timestamp type: {timestamp}")
    if record_route and timestamp is not None:
        raise MaceError("only one of -T or -R may be used")
    if record_route:
        raise MaceError(f"-R (record route) is {IP_OPTIONS_UNSUPPORTED}")
    if timestamp is not None:
        raise MaceError(f"-T (IP timestamp) is {IP_OPTIONS_UNSUPPORTED}")
