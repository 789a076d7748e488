"""How mace-ping names hosts (probe/names.py): hosts-file canonical and reverse names as
glibc's files backend gives them, PTR queries and answers parsed defensively."""

from __future__ import annotations

import struct

import pytest

from mace_tools.probe import names

HOSTS = """# comment
198.18.0.2  target.lab tgt   # the target
198.18.0.2  second.lab
198.18.0.6  other.lab
"""


def test_hosts_canonical_and_reverse() -> None:
    assert names.hosts_canonical(HOSTS, "tgt", "198.18.0.2") == "target.lab"
    assert names.hosts_canonical(HOSTS, "SECOND.lab.", "198.18.0.2") == "second.lab"
    assert names.hosts_canonical(HOSTS, "tgt", "198.18.0.6") is None
    assert names.hosts_reverse(HOSTS, "198.18.0.2") == "target.lab"  # the first line's
    assert names.hosts_reverse(HOSTS, "198.18.0.9") is None


def test_ptr_query() -> None:
    query = names.ptr_query(0x1234, "198.18.0.2")
    assert query[:12] == struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    assert query[12:] == b"\x012\x010\x0218\x03198\x07in-addr\x04arpa\x00\x00\x0c\x00\x01"


def answer(query_id: int, rdata: bytes, flags: int = 0x8180, ancount: int = 1) -> bytes:
    question = names.ptr_query(query_id, "198.18.0.2")[12:]
    record = b"\xc0\x0c" + struct.pack("!HHIH", 12, 1, 60, len(rdata)) + rdata
    return struct.pack("!HHHHHH", query_id, flags, 1, ancount, 0, 0) + question + \
        record * ancount


def test_ptr_answer_with_a_compressed_name() -> None:
    # "host" then a pointer to "18.198.in-addr.arpa" inside the question (offset 16)
    assert names.parse_ptr_answer(answer(7, b"\x04host\xc0\x10"), 7) == \
        (0, "host.18.198.in-addr.arpa")
    assert names.parse_ptr_answer(answer(7, b"\x03tgt\x03lab\x00"), 7) == (0, "tgt.lab")


@pytest.mark.parametrize(("msg", "query_id"), [
    (answer(7, b"\x03tgt\x00"), 8),  # another query's
    (answer(7, b"\x03tgt\x00", flags=0x0100), 7),  # a query, not an answer
    (answer(7, b"\xc0\x35"), 7),  # a pointer to itself (rdata at 53): a loop
    (answer(7, b"\x09tgt\x00"), 7),  # a label running past the end
    (b"\x00\x07", 7),  # too short for a header
])
def test_ptr_answers_that_are_not_taken(msg: bytes, query_id: int) -> None:
    assert names.parse_ptr_answer(msg, query_id) is None


def test_no_such_name_is_an_answer_without_a_name() -> None:
    assert names.parse_ptr_answer(answer(7, b"", flags=0x8183, ancount=0), 7) == (3, None)


def test_namer_caches_and_shows_ping_style(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []

    def reverse(addr: str) -> str | None:
        asked.append(addr)
        return {"198.18.0.2": "target.lab", "198.18.0.7": "198.18.0.7"}.get(addr)

    monkeypatch.setattr(names, "own_reverse", reverse)
    namer = names.Namer(None)
    assert namer("198.18.0.2") == "target.lab (198.18.0.2)"
    assert namer("198.18.0.2") == "target.lab (198.18.0.2)"
    assert namer("198.18.0.9") == "198.18.0.9"  # no name: the address alone
    assert namer("198.18.0.7") == "198.18.0.7"  # a "name" that is the address: alone too
    assert asked == ["198.18.0.2", "198.18.0.9", "198.18.0.7"]
