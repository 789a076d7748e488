"""A tiny DNS responder for tests, bound inside a given netns (as Docker's embedded DNS
binds 127.0.0.11 inside each container). Written independently of mace_tools' resolver:
it parses queries and builds answers by hand, with a compression pointer to the question.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
from pathlib import Path

from mace_tools.probe.netns import entered

TYPE_A, TYPE_PTR, TYPE_AAAA = 1, 12, 28


def _encoded(name: str) -> bytes:
    return b"".join(bytes([len(label)]) + label.encode("latin-1")
                    for label in name.split(".")) + b"\0"


def _reverse_name(address: str) -> str:
    """The PTR question's name for an address: in-addr.arpa, or ip6.arpa by nibbles."""
    if ":" in address:
        nibbles = socket.inet_pton(socket.AF_INET6, address).hex()
        return ".".join(reversed(nibbles)) + ".ip6.arpa"
    return ".".join(reversed(address.split("."))) + ".in-addr.arpa"


class FakeDns:
    def __init__(self, netns_path: Path | str, address: str,
                 records: dict[str, str | list[str]], forge_first: bool = False,
                 ptr: dict[str, str] | None = None) -> None:
        """records: name -> its addresses (one, or a list), IPv4 ones answered to A
        queries and IPv6 ones to AAAA queries (a known name with none of the type asked:
        an empty answer); ptr: IPv4 or IPv6 -> the name its PTR record gives (the
        in-addr.arpa or ip6.arpa question is answered; anything else is NXDOMAIN)."""
        self.records = {k.lower(): [v] if isinstance(v, str) else list(v)
                        for k, v in records.items()}
        self.ptr = {_reverse_name(a): n for a, n in (ptr or {}).items()}
        self.forge_first = forge_first  # send one reply with a wrong id before the real one
        self.queries: list[str] = []
        with entered(Path(netns_path)):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((address, 53))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> FakeDns:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not select.select([self.sock], [], [], 0.1)[0]:
                continue
            query, peer = self.sock.recvfrom(512)
            qid = struct.unpack_from("!H", query)[0]
            labels, pos = [], 12
            while query[pos]:
                labels.append(query[pos + 1:pos + 1 + query[pos]].decode())
                pos += 1 + query[pos]
            question = query[12:pos + 5]
            qtype = struct.unpack_from("!H", query, pos + 1)[0]
            name = ".".join(labels).lower()
            self.queries.append(name)
            known = name in self.records or (qtype == TYPE_PTR and name in self.ptr)
            answers = self._answers(name, qtype)
            flags = 0x8180 if known else 0x8183  # response, RD+RA; rcode 0 or NXDOMAIN
            header = struct.pack("!HHHHHH", qid, flags, 1, len(answers), 0, 0)
            if self.forge_first:
                self.forge_first = False
                forged = struct.pack("!HHHHHH", qid ^ 1, 0x8180, 1, 1, 0, 0) + question + \
                    struct.pack("!HHHIH", 0xC00C, 1, 1, 60, 4) + socket.inet_aton("198.18.9.9")
                self.sock.sendto(forged, peer)
            self.sock.sendto(header + question + b"".join(answers), peer)

    def _answers(self, name: str, qtype: int) -> list[bytes]:
        """The answer records (each one's name a pointer to the question's)."""
        if qtype == TYPE_PTR and name in self.ptr:
            rdata = _encoded(self.ptr[name])
            return [struct.pack("!HHHIH", 0xC00C, TYPE_PTR, 1, 60, len(rdata)) + rdata]
        if qtype not in (TYPE_A, TYPE_AAAA):
            return []
        family = socket.AF_INET6 if qtype == TYPE_AAAA else socket.AF_INET
        return [struct.pack("!HHHIH", 0xC00C, qtype, 1, 60, 16 if ":" in a else 4)
                + socket.inet_pton(family, a)
                for a in self.records.get(name, []) if (":" in a) == (qtype == TYPE_AAAA)]
