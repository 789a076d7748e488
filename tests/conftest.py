"""Shared fixtures: one namespace lab per test session, removed at the end, also on failure.

Lab tests need root, BPF and network namespaces; elsewhere they are skipped with the reason.
The lab's names carry a per-run prefix (mt<pid>) so parallel or leftover runs never clash.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_dns import FakeDns

from mace_tools.kernel.backend import object_path
from mace_tools.lab.topology import Lab

CONTAINERS = 6  # c0 prober, c1..c4 flood neighbours, c5 second prober


def _lab_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (BPF, network namespaces)"
    if not Path("/sys/kernel/btf/vmlinux").exists():
        return "kernel has no BTF"
    if not object_path().exists():
        return "BPF object not built (make build)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _lab_unavailable()
    if reason:
        for item in items:
            if "lab" in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    with Lab(prefix=f"mt{os.getpid() % 100000}", containers=CONTAINERS) as built:
        built.warm_up()
        yield built


@pytest.fixture(scope="session")
def lab_dns(lab: Lab) -> Iterator[tuple[str, FakeDns]]:
    """Lab container c0 gets its own resolver, as `ip netns exec` sees it: an
    /etc/netns/NAME/resolv.conf naming 127.0.0.11, answered inside that netns, so no test
    ever asks a real DNS server. Knows target.lab.test; everything else is NXDOMAIN."""
    ns = lab.container_ns(0)
    etc = Path("/etc/netns") / ns
    created_parent = not etc.parent.exists()
    etc.mkdir(parents=True, exist_ok=True)
    try:
        (etc / "resolv.conf").write_text("nameserver 127.0.0.11\noptions timeout:1 attempts:1\n")
        with FakeDns(lab.netns_path(ns), "127.0.0.11",
                     {"target.lab.test": lab.target_addr}) as dns:
            yield ns, dns
    finally:
        shutil.rmtree(etc.parent if created_parent else etc, ignore_errors=True)
