"""The mace-agent protocol, version 2: JSON messages over a unix SOCK_SEQPACKET socket.

Version 2: the ring's events carry 16-byte addresses (bpf/mace.h, IPv6); a version 1
client would misread them, so the versions do not talk (the client says so in one line).

One message per datagram (SEQPACKET keeps the boundaries, so a message is never cut or
glued to the next), UTF-8 JSON, one object, at most MAX_MESSAGE bytes. Every request
carries "v": 2 and "op"; every answer carries "v", "ok" and, when not ok, "error" (one
line for people). A connection is a client: its runs end when it closes.

  {"v":2, "op":"run", "records":B, "path":B, "udp":B, "tcp":B, "errors":B}
      -> {"v":2, "ok":true, "run":ID, "nonce":"16 hex digits", "ring_bytes":N,
          "host_details":B, "probe_rate":N}  with two fds (SCM_RIGHTS): the run's ring
          buffer (mmap it as libbpf's ring_buffer does) and its lost-records counter (one
          u64, mmap it read-only). The run probes from the client's own netns;
          host_details: false when host-side device names and addresses are withheld
          (agent --reveal-path); probe_rate: the new probes a second the run gets kernel
          data for (agent --probe-rate; 0: no limit; an agent before it sends none).
  {"v":2, "op":"state", "run":ID, "number":N}
      -> {"v":2, "ok":true, "state": null | {"departed":NS, "returned":NS,
          "delivered":NS, "outer_netns":INO, "outer_ifindex":I, "outer_dev":"NAME",
          "returned_hook":H}}  (a probe's kernel state, for a reply that came with no
          record: macvlan; H: the kernel hook that stamped "returned", model.Hook; an
          agent before it sends none, taken as unknown)
  {"v":2, "op":"end", "run":ID}  ->  {"v":2, "ok":true}

B: true or false; the switches are kernel/backend.py's. Anything else (not JSON, not an
object, unknown op, a wrong type, a message too long, fds sent to the agent) is answered
with ok false and the connection is closed; the agent goes on serving the others.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Any

from mace_tools.errors import MaceError

VERSION = 2
MAX_MESSAGE = 4096
MAX_FDS = 2  # what an answer carries at most
DEFAULT_SOCKET = Path("/run/mace/agent.sock")
# A client run's probes a second with kernel data (mace-agent --probe-rate): 20x what an
# unprivileged ping may send (-i 0.002 at least); a root client's flood past it is
# measured raw. The kernel's per-probe states are one LRU map for every run on the host
# (16384 entries): the limit bounds how fast one run can fill it with unanswered probes,
# evicting other runs' probes in flight.
DEFAULT_PROBE_RATE = 10_000
_FDS_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


class ProtocolError(MaceError):
    """A message that breaks the protocol (the peer is not a mace client or agent)."""


def encode(message: dict[str, Any]) -> bytes:
    data = json.dumps(message, separators=(",", ":"), allow_nan=False).encode()
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(data)} bytes (at most {MAX_MESSAGE})")
    return data


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")  # NaN, Infinity: json.loads takes them


def decode(data: bytes) -> dict[str, Any]:
    """One message, checked for shape: an object with "v" == VERSION."""
    try:
        message = json.loads(data.decode(), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError("not a JSON message") from None
    if not isinstance(message, dict):
        raise ProtocolError("not a JSON object")
    if message.get("v") != VERSION:
        raise ProtocolError(f"protocol version {message.get('v')!r} not spoken here "
                            f"(this side speaks {VERSION})")
    return message


def send(sock: socket.socket, message: dict[str, Any], fds: tuple[int, ...] = ()) -> None:
    """One message, with fds if any (raises OSError as sendmsg does)."""
    data = encode({"v": VERSION, **message})
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds \
        else []
    sock.sendmsg([data], ancillary)


def receive(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """One message and the fds that came with it; (None, []) when the peer closed. Fds
    come to the receiver's process: the caller closes them (also on ProtocolError, which
    closes them itself before raising)."""
    data, ancdata, flags, _ = sock.recvmsg(MAX_MESSAGE + 1, _FDS_SPACE)
    fds = _fds_of(ancdata)
    if not data and not fds and not flags & socket.MSG_TRUNC:
        return None, []
    try:
        if flags & socket.MSG_CTRUNC:
            raise ProtocolError("too many file descriptors in one message")
        if flags & socket.MSG_TRUNC or len(data) > MAX_MESSAGE:
            raise ProtocolError(f"message longer than {MAX_MESSAGE} bytes")
        return decode(data), fds
    except ProtocolError:
        close_all(fds)
        raise


def _fds_of(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, value in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(value) - len(value) % array.array("i").itemsize
            fds.extend(array.array("i", value[:usable]))
    return fds


def close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def boolean(message: dict[str, Any], key: str) -> bool:
    """A switch: true or false (absent: false); anything else breaks the protocol."""
    value = message.get(key, False)
    if not isinstance(value, bool):
        raise ProtocolError(f"{key!r} must be true or false")
    return value


def integer(message: dict[str, Any], key: str, lo: int, hi: int) -> int:
    """A whole number in lo..hi (bool is not one, nor 1.0)."""
    value = message.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ProtocolError(f"{key!r} must be a whole number in {lo}..{hi}")
    return value
