"""Events the ring buffer had no room for are counted where every reply can check them."""

from __future__ import annotations

import os
import socket

import pytest

from mace_tools.kernel.backend import Backend
from mace_tools.kernel.events import EVENT
from mace_tools.kernel.programs import RING_BYTES
from mace_tools.probe.icmp import build_echo_request

pytestmark = pytest.mark.lab

RING_EVENTS = RING_BYTES // (EVENT.size + 8)  # a run's ring: events + 8-byte headers


def test_a_full_ring_is_counted_without_a_syscall() -> None:
    """Loopback echoes carrying the run's nonce make 4 events each (request and reply, out
    and in on lo); nobody drains, so the ring fills and the rest is counted as lost."""
    nonce = os.urandom(8)
    with Backend(nonce) as backend:
        assert backend.lost() == 0
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)  # replies dropped
        with sock:
            for seq in range(RING_EVENTS // 4 + 2000):
                sock.sendto(build_echo_request(0x4d41, seq & 0xFFFF, nonce, 56),
                            ("127.0.0.1", 0))
        lost = backend.lost()
        assert lost > 0
        assert backend.drain(lambda ev: None) > 0.9 * RING_EVENTS
        assert backend.lost() == lost  # draining does not reset what was lost
