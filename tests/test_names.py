"""How mace-ping names hosts (probe/names.py): hosts-file canonical and reverse names as
glibc's files backend gives them (PTR queries and answers: resolver.py, traceroute's
tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mace_tools.probe import names
from mace_tools.probe.resolver import Vantage, lookup_hosts_name, ptr_name

HOSTS = """# comment
198.18.0.2  target.lab tgt   # the target
198.18.0.2  second.lab
198.18.0.6  other.lab
"""


def test_hosts_canonical_and_reverse() -> None:
    assert names.hosts_canonical(HOSTS, "tgt", "198.18.0.2") == "target.lab"
    assert names.hosts_canonical(HOSTS, "SECOND.lab.", "198.18.0.2") == "second.lab"
    assert names.hosts_canonical(HOSTS, "tgt", "198.18.0.6") is None
    # reverse: the first line's name, IPv4 or IPv6 (however the address is written)
    six = HOSTS + "2001:2:0::2 six.lab\n"
    assert lookup_hosts_name(six, "198.18.0.2") == "target.lab"
    assert lookup_hosts_name(six, "198.18.0.9") is None
    assert lookup_hosts_name(six, "2001:2::2") == "six.lab"
    assert lookup_hosts_name(six, "not an address") is None


def test_ptr_names_of_both_families() -> None:
    assert ptr_name("198.18.0.2") == "2.0.18.198.in-addr.arpa"
    assert ptr_name("2001:2::2") == ".".join(reversed("2001" "0002" + "0" * 20 + "0002")) + \
        ".ip6.arpa"


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


def test_a_hostile_canonical_name_is_not_printed(tmp_path: Path) -> None:
    """A container's hosts file is its own: a canonical name with a terminal escape is not
    printed; the name as typed is."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "hosts").write_text("198.18.0.2 evil\x1b[2Jname tgt\n")
    vantage = Vantage(tmp_path, label="pid 1")
    assert names.canonical_name("tgt", "198.18.0.2", vantage) == "tgt"
    (tmp_path / "etc" / "hosts").write_text("198.18.0.2 target.lab tgt\n")
    assert names.canonical_name("tgt", "198.18.0.2", vantage) == "target.lab"
