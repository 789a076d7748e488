"""mace-agent probing and exporting (issue 13), in the namespace lab: a real Prometheus
server (Debian's) scrapes the agent's probes of the lab's target; sources that end.

The agent runs in the lab's host netns, where a container host's agent runs; Prometheus
runs there too, on loopback, with storage of its own (mace_tools/lab/prometheus.py).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from waiting import eventually

from mace_tools.agent import client
from mace_tools.lab.agent import AgentProcess
from mace_tools.lab.prometheus import PrometheusServer, free_port, http_get
from mace_tools.lab.topology import Lab

pytestmark = pytest.mark.lab


def _wait_for(check: Callable[[], bool], timeout: float = 30.0) -> bool:
    return eventually(check, timeout, every_s=0.2)  # (each check may ask Prometheus)


class Exporter:
    """The agent's /metrics, read from its netns, by (family name, labels) -> value."""

    def __init__(self, lab: Lab, port: int) -> None:
        self.netns, self.port = lab.host_ns, port

    def samples(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        status, body, _ = http_get(self.port, "/metrics", self.netns)
        assert status == 200
        return {(s.name, frozenset(s.labels.items())): s.value
                for f in text_string_to_metric_families(body.decode()) for s in f.samples}

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples().get((name, frozenset(labels.items())))


@pytest.fixture(scope="module")
def sleeper(lab: Lab) -> Iterator[subprocess.Popen[bytes]]:
    """A process in container c1's netns, for a pid: source that the test ends."""
    proc = subprocess.Popen(["ip", "netns", "exec", lab.container_ns(1), "sleep", "600"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def exporting(lab: Lab, sleeper: subprocess.Popen[bytes]) -> Iterator[tuple[Exporter, str]]:
    """An agent probing the target from c0 (by netns name), from c1 (by a pid in it) and
    from a netns that does not exist; its metrics on a free port of the host netns."""
    port = free_port(lab.host_ns)
    agent = AgentProcess(
        "-v", "--metrics", f"127.0.0.1:{port}", "--probe-interval", "0.1",
        "--probe", f"netns:{lab.container_ns(0)}={lab.target_addr}",
        "--probe", f"pid:{sleeper.pid}={lab.target_addr}",
        "--probe", f"netns:{lab.prefix}-none={lab.target_addr}",
        prefix=lab.on_host(), env={**os.environ, "PYTHONPATH": os.getcwd()}).start()
    try:
        yield Exporter(lab, port), str(agent.socket)
    finally:
        log = agent.log_text()
        assert agent.stop() == 0, log
        assert not agent.socket_left


def test_prometheus_scrapes_raw_and_corrected(lab: Lab,
                                              exporting: tuple[Exporter, str]) -> None:
    exporter, _ = exporting
    source = f"netns:{lab.container_ns(0)}"
    labels = f'source="{source}",target="{lab.target_addr}"'
    with PrometheusServer([f"127.0.0.1:{exporter.port}"], lab.host_ns,
                          scrape_s=0.5) as prom:
        def enough() -> bool:
            counts = prom.values(f"sum by (kind) (mace_ping_rtt_seconds_count{{{labels}}})",
                                 "kind")
            return counts.get("raw", 0) >= 40 and counts.get("corrected", 0) >= 40

        assert _wait_for(enough), prom.log_text()
        medians = prom.values("histogram_quantile(0.5, sum by (le, kind) "
                              f"(mace_ping_rtt_seconds_bucket{{{labels}}}))", "kind")
        assert 0 < medians["corrected"] < medians["raw"], medians
        stages = prom.values("sum by (stage) (mace_ping_stage_seconds_count"
                             f"{{{labels}}})", "stage")
        assert stages["egress"] >= 40 and stages["ingress"] >= 40
        up = prom.values("mace_probe_up", "source")
        assert up[source] == 1 and up[f"netns:{lab.prefix}-none"] == 0
    # the counters of one scrape (queries made one after another may straddle two)
    of_c0 = {"source": source, "target": lab.target_addr}
    page = exporter.samples()

    def counter(name: str) -> float:
        return page[(name, frozenset(of_c0.items()))]

    sent, answered = counter("mace_ping_requests_total"), counter("mace_ping_responses_total")
    corrected = counter("mace_ping_responses_with_kernel_data_total")
    assert sent >= answered >= corrected >= 40
    assert corrected >= 0.95 * answered  # an idle lab: every reply has its records
    assert counter("mace_kernel_events_lost_total") == 0


def test_clients_and_runs_are_counted(exporting: tuple[Exporter, str]) -> None:
    exporter, socket_path = exporting
    probing = sum(v for (name, _), v in exporter.samples().items() if name == "mace_probe_up")
    assert probing >= 1
    assert _wait_for(lambda: exporter.value("mace_agent_runs") == probing)  # a run each
    run = client.open_run(Path(socket_path), None, records=True)
    try:
        assert exporter.value("mace_agent_clients") == 1
        assert exporter.value("mace_agent_runs") == probing + 1
    finally:
        run.close()
    assert _wait_for(lambda: exporter.value("mace_agent_clients") == 0)


def test_a_source_that_ends_is_down_and_the_agent_goes_on(
        lab: Lab, exporting: tuple[Exporter, str],
        sleeper: subprocess.Popen[bytes]) -> None:
    exporter, _ = exporting
    labels = {"source": f"pid:{sleeper.pid}", "target": lab.target_addr}
    assert _wait_for(lambda: (exporter.value("mace_ping_responses_with_kernel_data_total",
                                             **labels) or 0) >= 10)
    assert exporter.value("mace_probe_up", **labels) == 1
    sleeper.kill()
    sleeper.wait()
    assert _wait_for(lambda: exporter.value("mace_probe_up", **labels) == 0, timeout=5)
    sent = exporter.value("mace_ping_requests_total", **labels)
    time.sleep(1.0)
    assert exporter.value("mace_ping_requests_total", **labels) == sent  # stopped probing
    # the others go on
    c0 = {"source": f"netns:{lab.container_ns(0)}", "target": lab.target_addr}
    before = exporter.value("mace_ping_requests_total", **c0) or 0
    assert _wait_for(lambda: (exporter.value("mace_ping_requests_total", **c0) or 0)
                     >= before + 5, timeout=10)
