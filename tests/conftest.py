"""Shared fixtures: one namespace lab per test session, removed at the end, also on failure.

Lab tests need root, BPF and network namespaces; elsewhere they are skipped with the reason,
but with CI=true a lab test that skips, for whatever reason, is a failure: a CI run that
skipped them all would otherwise be green. The lab's names carry a per-run prefix (mt<pid>)
so parallel or leftover runs never clash. A session that runs root_ns tests (real container
engines) fails if the root network namespace is not as it found it at the end.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from fake_dns import FakeDns
from netns_etc import remove_netns_etc

from mace_tools.errors import MaceError
from mace_tools.kernel.backend import object_path
from mace_tools.lab import engines, hoststate
from mace_tools.lab.topology import Lab

CONTAINERS = 6  # c0 prober, c1..c4 flood neighbours, c5 second prober


def _lab_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (BPF, network namespaces)"
    if not Path("/sys/kernel/btf/vmlinux").exists():
        return "kernel has no BTF"
    try:
        built = object_path().exists()
    except MaceError as exc:  # $MACE_BPF_OBJECT missing or not trusted
        return f"BPF object not built or not trusted: {exc}"
    if not built:
        return "BPF object not built (make build)"
    return None


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "root_ns: changes the root network namespace (real "
                            "container engines); the session checks it is restored")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _lab_unavailable()
    if reason:
        for item in items:
            if "lab" in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None],
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """With CI=true, a lab test that skipped (a marker, a fixture or the test itself said
    so) is reported as failed, with the skip's reason."""
    report = yield
    if report.skipped and not hasattr(report, "wasxfail") and "lab" in item.keywords \
            and _in_ci():
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        report.outcome = "failed"
        report.longrepr = f"a lab test may not skip with CI=true: {reason}"
    return report


@pytest.fixture(scope="session", autouse=True)
def root_ns_restored(request: pytest.FixtureRequest) -> Iterator[None]:
    """A session with root_ns tests ends with the root namespace's firewall (every iptables
    backend, nft), links and forwarding as it began (after removing what an earlier, killed
    run left). One snapshot at each end; other sessions are not checked, since they may run
    beside one that starts an engine."""
    if not any("root_ns" in item.keywords for item in request.session.items):
        yield
        return
    engines.remove_leftovers()
    before = hoststate.snapshot()
    yield
    changed = before.differences(hoststate.snapshot())
    if changed:
        pytest.fail("root network namespace changed by this session: " + "; ".join(changed),
                    pytrace=False)


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    with Lab(prefix=f"mt{os.getpid() % 100000}", containers=CONTAINERS) as built:
        built.warm_up()
        yield built


@pytest.fixture(scope="session")
def lab6() -> Iterator[Lab]:
    """A dual-stack lab (NAT66 out of the host, as Docker does it): c0 the prober, c1..c4
    flood neighbours. Apart from the IPv4 lab, whose tests and figures stay IPv4 only."""
    with Lab(prefix=f"m6{os.getpid() % 100000}", containers=5, ipv6=True) as built:
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
        remove_netns_etc(etc, created_parent)
