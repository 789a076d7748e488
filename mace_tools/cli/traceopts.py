"""mace-traceroute's arguments read as Linux traceroute 2.1 reads its own, and refused in
its words (traceroute.c's checks; its option parser, clif.c: `Bad option ...`, `Cannot
handle ...`, with the position of the word at fault as `(argc N)`), exit 2.

Numbers are read as traceroute reads them: counts as C's strtoul in base 0 (so 0x10 and
010 are 16 and 8, and -1 wraps to 4294967295, which the range checks then refuse), the
packet length as strtol, times as strtod. Ports and the -P protocol may be names
(/etc/services, /etc/protocols). Times must also be finite and fit epoll's range (a
bound traceroute does not have: it would wait forever), refused in its words.
"""

from __future__ import annotations

import math
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass

import click
from click.exceptions import BadOptionUsage, ClickException, NoSuchOption, UsageError

from mace_tools.cli.common import INT_MAX, c_double
from mace_tools.errors import MaceError
from mace_tools.probe.trace import DEFAULT_RAW_PROTOCOL, ICMP, RAW, TCP, UDP
from mace_tools.tracewait import DEFAULT_WAIT, WaitSpec

MAX_HOPS = 255
MAX_PROBES = 10
MAX_PACKET_LEN = 65000
MAX_SECONDS = INT_MAX / 1000  # -w and -z: as ping's -i bound; keeps every wait in epoll's range
UINT_MASK = 0xFFFFFFFF
_STRTOUL = re.compile(r"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")
_STRTOD_PREFIX = re.compile(r"[ \t\n\v\f\r]*[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)"
                            r"(?:[eE][+-]?[0-9]+)?|inf(?:inity)?|nan)", re.IGNORECASE)

# The methods (traceroute's modules) by the names -M takes; -I -T -U -P are shortcuts.
METHODS = {"default": UDP, "udp": UDP, "icmp": ICMP, "tcp": TCP, "raw": RAW}
UNSUPPORTED_METHODS = {
    "udplite": "UDP-Lite probes: the kernel programs match only ICMP, UDP and TCP probes",
    "dccp": "DCCP probes: the kernel programs match only ICMP, UDP and TCP probes",
    "tcpconn": "full TCP connections (connect()): the probes would be the kernel's own "
               "SYNs, which carry no mace tag for the kernel programs to match",
}
# -O keywords each method takes (traceroute's module options), beyond "help".
METHOD_OPTIONS = {ICMP: ("raw", "dgram"), RAW: ("protocol",)}
_OPTION_HELP = {
    "raw": "Use raw sockets only (tried first by default)",
    "dgram": "Use ICMP datagram (\"ping\") sockets only",
    "protocol": f"Use protocol PROT, as protocol=PROT (default is {DEFAULT_RAW_PROTOCOL})",
}

_argv: list[str] = []  # the command line being read, for (argc N)


def set_argv(argv: Sequence[str]) -> None:
    """The words mace-traceroute was given (without its name), for positions in errors."""
    _argv[:] = list(argv)


def strtoul(text: str) -> int | None:
    """text as traceroute's CLIF_set_uint reads all of it (strtoul base 0, cast to
    unsigned int); None if it is not a whole number."""
    m = _STRTOUL.fullmatch(text)
    return None if m is None else _unsigned(m)


def strtoul_prefix(text: str) -> int | None:
    """The number text starts with, as strtoul in base 0 (trailing words ignored, as
    traceroute's -p and --sport); None if it starts with none."""
    m = _STRTOUL.match(text)
    return None if m is None else _unsigned(m)


def _unsigned(m: re.Match[str]) -> int:
    sign, digits = m.groups()
    value = min(_digits(digits), 2**64 - 1)  # strtoul's ERANGE: ULONG_MAX
    return (-value if sign == "-" else value) & UINT_MASK


def _digits(digits: str) -> int:
    """A base-0 numeral's value: 0x hex, 0 octal, else decimal."""
    if digits[:2].lower() == "0x":
        return int(digits[2:], 16)
    return int(digits, 8 if digits.startswith("0") else 10)


def strtol_int(text: str) -> int | None:
    """text as CLIF_arg_int reads it (strtol base 0, cast to int); None if not whole."""
    m = _STRTOUL.fullmatch(text)
    if m is None:
        return None
    sign, digits = m.groups()
    value = -min(_digits(digits), 2**63) if sign == "-" else min(_digits(digits), 2**63 - 1)
    value &= UINT_MASK
    return value - 2**32 if value >= 2**31 else value


def argc(names: Sequence[str], value: str) -> tuple[str, int]:
    """(the option as it was typed, clif's argc: the 1-based position of the word that
    holds value) for option `names` (its short and long forms) given `value`."""
    words = _argv
    for i in range(len(words) - 1, -1, -1):
        word = words[i]
        following = words[i + 1] if i + 1 < len(words) else None
        for name in names:
            if word == name and following == value:
                return name, i + 2
            if name.startswith("--") and word == f"{name}={value}":
                return name, i + 1
            if not name.startswith("--") and _in_cluster(word, name[1], value):
                return name, i + 1
    return names[0], 0


def _in_cluster(word: str, letter: str, value: str) -> bool:
    """word is a cluster of short options ending in -LETTERvalue (-nq3)?"""
    return word.startswith("-") and not word.startswith("--") and \
        word.endswith(letter + value) and len(word) >= 2 + len(value)


def cannot_handle(names: Sequence[str], value: str) -> MaceError:
    name, n = argc(names, value)
    return MaceError(f"Cannot handle `{name}' option with arg `{value}' (argc {n})")


def uint_option(names: Sequence[str], value: str) -> int:
    """A count option (-f -m -q -N -t --fwmark) as CLIF_set_uint takes it."""
    number = strtoul(value)
    if number is None:
        raise cannot_handle(names, value)
    return number


def port_option(names: Sequence[str], value: str) -> int:
    """-p and --sport: a number (strtoul base 0, what follows it ignored) or a service
    name, as traceroute's set_port; 0 means the method's default."""
    number = strtoul_prefix(value)
    if number is not None:
        return number
    try:
        return socket.getservbyname(value)
    except OSError:
        raise cannot_handle(names, value) from None


def protocol_option(value: str) -> int:
    """-P: an IP protocol number or name (/etc/protocols), as the raw method's set_protocol;
    refused in its words (a module keyword)."""
    number = strtoul_prefix(value)
    if number is None:
        try:
            number = socket.getprotobyname(value)
        except OSError:
            _, n = argc(("-P", "--protocol"), value)
            raise MaceError(f"Cannot handle `protocol' keyword with arg `{value}' "
                            f"(argc {n})") from None
    if not 0 <= number <= 255:
        raise MaceError(f"protocol {number} out of range (0..255)")
    return number


def _strtod_fields(text: str) -> list[float] | None:
    """Up to three numbers, each strtod's, with one character of any kind between (as
    traceroute's set_wait_specs: `5,3,10`, `5/3/10`); None if that is not what it is."""
    values, pos = [], 0
    while True:
        m = _STRTOD_PREFIX.match(text, pos)
        if m is None:
            return None
        values.append(c_double(m.group()))
        pos = m.end()
        if pos == len(text):
            return values  # type: ignore[return-value]
        if len(values) == 3:
            return None
        pos += 1  # the separator


def wait_option(value: str | None) -> WaitSpec:
    """-w MAX[,HERE,NEAR]; HERE and NEAR are 0 when only MAX is given (traceroute's rule
    for old command lines), 3 and 10 when -w is not (tracewait.py)."""
    if value is None:
        return WaitSpec(*DEFAULT_WAIT)
    fields = _strtod_fields(value)
    if fields is None:
        raise cannot_handle(("-w", "--wait"), value)
    max_s, here, near = [*fields, 0.0, 0.0][:3]
    if not all(_finite_seconds(x) for x in (max_s, here, near)):
        raise MaceError(f"bad wait specifications `{_g(max_s)},{_g(here)},{_g(near)}' used")
    return WaitSpec(max_s, here, near)


def sendwait_option(value: str) -> float:
    """-z: seconds, or milliseconds when over 10 (traceroute's rule)."""
    seconds = c_double(value)
    if seconds is None:
        raise cannot_handle(("-z", "--sendwait"), value)
    if not _finite_seconds(seconds):
        raise MaceError(f"bad sendtime `{_g(seconds)}' specified")
    return seconds / 1000 if seconds >= 10 else seconds


def _finite_seconds(value: float) -> bool:
    return 0 <= value <= MAX_SECONDS  # nan fails


def _g(value: float) -> str:
    """C's %g."""
    if math.isnan(value):
        return "-nan" if math.copysign(1, value) < 0 else "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:g}"


def packetlen_argument(value: str | None) -> int | None:
    """The optional second argument: the whole IP packet's length; None: the method's
    default. A length too small to hold a probe is raised to the least one (as
    traceroute does); a negative one is an option to traceroute, and refused here."""
    if value is None:
        return None
    length = strtol_int(value)
    if length is None or length < 0:
        position = next((i + 1 for i in range(len(_argv) - 1, -1, -1) if _argv[i] == value), 0)
        raise MaceError(f'Cannot handle "packetlen" cmdline arg `{value}\' on position 2 '
                        f"(argc {position})")
    if length > MAX_PACKET_LEN:
        raise MaceError(f"too big packetlen {length} specified")
    return length


@dataclass(frozen=True, slots=True)
class Hops:
    first: int
    max: int
    queries: int


def hops_options(first: str, max_hops: str, queries: str) -> Hops:
    """-f, -m, -q, checked in traceroute's order and words."""
    first_ttl = uint_option(("-f", "--first"), first)
    max_ttl = uint_option(("-m", "--max-hops"), max_hops)
    nqueries = uint_option(("-q", "--queries"), queries)
    if not first_ttl or first_ttl > max_ttl:
        raise MaceError("first hop out of range")
    if max_ttl > MAX_HOPS:
        raise MaceError(f"max hops cannot be more than {MAX_HOPS}")
    if not 1 <= nqueries <= MAX_PROBES:
        raise MaceError(f"no more than {MAX_PROBES} probes per hop")
    return Hops(first_ttl, max_ttl, nqueries)


def method_of(name: str) -> str:
    """-M NAME (case as traceroute ignores it): the method, or one line why not."""
    key = name.lower()
    if key in UNSUPPORTED_METHODS:
        raise MaceError(f"method `{key}' not supported: {UNSUPPORTED_METHODS[key]}")
    if key not in METHODS:
        raise MaceError(f"Unknown traceroute module {name}")
    return METHODS[key]


def method_options(method: str, module: str, words: Sequence[str]) -> dict[str, str]:
    """-O words (comma-separated, several -O allowed) for the method: keyword -> value
    ("" for a flag). "help" lists them and exits (MethodHelp). As traceroute, a method
    without options (default, udp) ignores them all; tcp's are not supported."""
    keywords = [w for word in words for w in word.split(",") if w]
    if "help" in keywords:
        raise MethodHelp(method, module)
    if method == TCP and keywords:
        raise not_supported(f"-O {keywords[0]}", "mace's TCP probes are plain SYNs, with the "
                            "mace tag as payload and no TCP options, matched by their SYN-ACK "
                            "or RST")
    known = METHOD_OPTIONS.get(method)
    if known is None:
        return {}
    chosen: dict[str, str] = {}
    for keyword in keywords:
        key, _, value = keyword.partition("=")
        if key not in known:
            _, n = argc(("-O", "--options"), next((w for w in words if keyword in w), keyword))
            raise MaceError(f"`{keyword}' (argc {n}): arguments are not allowed")
        chosen[key] = value
    if "raw" in chosen and "dgram" in chosen:
        raise MaceError("-O raw and -O dgram: only one of them may be specified")
    return chosen


class MethodHelp(Exception):
    """-O help: what the method takes, printed by the command, which then exits 0."""

    def __init__(self, method: str, module: str) -> None:
        super().__init__(module)
        known = METHOD_OPTIONS.get(method, ())
        self.text = "\n".join(f"  {k:28}{_OPTION_HELP[k]}" for k in known) or \
            f"No options for module `{module}'"


def not_supported(option: str, why: str) -> MaceError:
    return MaceError(f"{option}: not supported: {why}")


def usage_error(exc: ClickException, command: click.Command) -> str:
    """click's refusal of the command line, in clif's words."""
    if isinstance(exc, NoSuchOption):
        return _bad_option(exc.option_name)
    if isinstance(exc, BadOptionUsage) and "requires" in exc.message:
        return _requires_argument(exc, command)
    if isinstance(exc, UsageError):
        m = re.fullmatch(r"Got unexpected extra arguments? \((.*)\)", exc.message)
        if m:
            extra = m.group(1).split(" ")[0]
            position = next((i + 1 for i in range(len(_argv) - 1, -1, -1)
                             if _argv[i] == extra), 0)
            return f"Extra arg `{extra}' (position 3, argc {position})"
    return exc.format_message()


def _bad_option(name: str) -> str:
    for i in range(len(_argv) - 1, -1, -1):
        word = _argv[i]
        if name.startswith("--") and word.startswith(name + "="):
            return f"Bad option `{word}' (with arg `{word.partition('=')[2]}') (argc {i + 1})"
        if word == name or (not name.startswith("--") and word.startswith("-")
                            and not word.startswith("--") and name[1:] in word[1:]):
            return f"Bad option `{name}' (argc {i + 1})"
    return f"Bad option `{name}' (argc 0)"


def _requires_argument(exc: BadOptionUsage, command: click.Command) -> str:
    name = exc.option_name
    position = next((i + 1 for i in range(len(_argv) - 1, -1, -1)
                     if _argv[i] == name or _argv[i].endswith(name.lstrip("-"))), 0)
    metavar = next((p.metavar or p.name for p in command.params if name in p.opts), None) \
        or "VALUE"
    shown = f"{name}={metavar}" if name.startswith("--") else f"{name} {metavar}"
    return f"Option `{name}' (argc {position}) requires an argument: `{shown}'"
