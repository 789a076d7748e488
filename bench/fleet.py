"""The fleet row (issue 13): mace-agent probing and exporting, 100 probes at 1/s each from
10 lab containers, its CPU, memory and the cost of a scrape.

The agent runs in the lab's host netns with a config of 100 probes: 10 lab containers
(by `netns:` name) each ping 10 targets, addresses 198.18.3.1-10 put on the lab target's
loopback (routed there from the lab host; only the lab's own netns change, and go with
the lab). After a warm-up (every probe's run made), the agent's CPU is read from
/proc/PID/stat over the window and its memory at the end; then /metrics is scraped
SCRAPES times from the same netns, timed from request to last byte. For scale, the same
number of series is rendered by prometheus_client's generate_latest (synthetic values).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from bench import experiments as ex
from bench.agent import usage_window
from mace_tools.lab.agent import AgentProcess
from mace_tools.lab.prometheus import free_port, http_get
from mace_tools.lab.topology import Lab, LabError
from mace_tools.stats import percentile

TARGETS = [f"198.18.3.{i}" for i in range(1, 11)]
CONTAINERS = 10
SCRAPES = 20
AGENT_START_S = 30.0


def _add_targets(lab: Lab) -> None:
    """Ten more target addresses on the lab target's loopback, routed from the host."""
    for addr in TARGETS:
        subprocess.run(["ip", "-n", lab.target_ns, "addr", "add", f"{addr}/32", "dev", "lo"],
                       check=True)
    subprocess.run(["ip", "-n", lab.host_ns, "route", "replace", "198.18.3.0/24", "via",
                    lab.target_addr], check=True)


def _remove_targets(lab: Lab) -> None:
    subprocess.run(["ip", "-n", lab.host_ns, "route", "del", "198.18.3.0/24"], check=False,
                   capture_output=True)
    for addr in TARGETS:
        subprocess.run(["ip", "-n", lab.target_ns, "addr", "del", f"{addr}/32", "dev", "lo"],
                       check=False, capture_output=True)


def _config(lab: Lab, path: Path, interval: float) -> int:
    lines = [f"interval = {interval}"]
    for c in range(CONTAINERS):
        for target in TARGETS:
            lines += ["[[probe]]", f'source = "netns:{lab.container_ns(c)}"',
                      f'target = "{target}"']
    path.write_text("\n".join(lines) + "\n")
    return CONTAINERS * len(TARGETS)


def _samples(body: bytes, name: str) -> list[float]:
    prefix = name.encode() + b"{"
    return [float(line.rsplit(b" ", 1)[1]) for line in body.splitlines()
            if line.startswith(prefix)]


def fleet_resources(lab: Lab, seconds: float, warmup_s: float, interval: float = 1.0) -> dict:
    if lab.containers < CONTAINERS:
        raise ex.NotMeasured(f"the lab has fewer than {CONTAINERS} containers")
    _add_targets(lab)
    port = free_port(lab.host_ns)
    config = Path(f"/tmp/mace-bench-fleet-{os.getpid()}.toml")
    try:
        probes = _config(lab, config, interval)
        agent = AgentProcess("--metrics", f"127.0.0.1:{port}", "--config", str(config),
                             prefix=lab.on_host(), start_s=AGENT_START_S)
        try:
            agent.start()
        except LabError as exc:
            raise ex.NotMeasured(str(exc)) from None
        try:
            assert agent.proc is not None
            pid = agent.proc.pid  # (`ip netns exec` execs the agent)
            time.sleep(warmup_s)
            window = usage_window(pid, [], seconds)
            scrape_ms, body = [], b""
            for _ in range(SCRAPES):
                status, body, took = http_get(port, "/metrics", lab.host_ns, timeout=10)
                if status != 200:
                    raise ex.NotMeasured(f"/metrics answered {status}")
                scrape_ms.append(took * 1000)
                time.sleep(0.2)
        finally:
            agent.stop()
    finally:
        config.unlink(missing_ok=True)
        _remove_targets(lab)
    up = _samples(body, "mace_probe_up")
    requests = sum(_samples(body, "mace_ping_requests_total"))
    responses = sum(_samples(body, "mace_ping_responses_total"))
    corrected = sum(_samples(body, "mace_ping_responses_with_kernel_data_total"))
    ordered = sorted(scrape_ms)
    row = {"probes": probes, "containers": CONTAINERS, "interval_s": interval,
           "window": window, "probes_up": sum(up), "requests": requests,
           "responses": responses, "corrected": corrected,
           "scrapes": SCRAPES, "scrape_ms_median": percentile(ordered, 50),
           "scrape_ms_max": ordered[-1],
           "scrape_bytes": len(body), "scrape_lines": body.count(b"\n"),
           "prometheus_client_ms": _prometheus_client_ms(body)}
    print(f"  {probes} probes ({row['probes_up']:.0f} up): agent CPU "
          f"{window['cpu_percent']:.2f}% of a core, RSS {window['VmRSS']:.1f} MB (peak "
          f"{window['VmHWM']:.1f}); scrape {row['scrape_ms_median']:.1f} ms median, "
          f"{row['scrape_ms_max']:.1f} max ({row['scrape_lines']} lines); prometheus_client "
          f"would render them in {row['prometheus_client_ms']:.0f} ms", flush=True)
    return row


def _prometheus_client_ms(body: bytes) -> float | None:
    """generate_latest over the same families and label sets as the agent's scrape (the
    series counts from it; the values synthetic), median of 5."""
    try:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            disable_created_metrics,
            generate_latest,
        )
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:
        return None
    disable_created_metrics()
    from mace_tools.agent.metrics import SECONDS_BUCKETS

    registry = CollectorRegistry()
    for family in text_string_to_metric_families(body.decode()):
        if family.type == "histogram":
            names = sorted({k for s in family.samples for k in s.labels if k != "le"})
            metric = Histogram(family.name, "x", names, buckets=SECONDS_BUCKETS,
                               registry=registry)
            for s in family.samples:
                if s.name.endswith("_count"):
                    metric.labels(**s.labels).observe(1e-4)
        elif family.samples:
            names = sorted(family.samples[0].labels)
            cls = Counter if family.type == "counter" else Gauge
            metric = cls(family.name, "x", names, registry=registry)
            for s in family.samples:
                (metric.labels(**s.labels) if names else metric).inc()
    times = []
    for _ in range(5):
        began = time.perf_counter()
        generate_latest(registry)
        times.append((time.perf_counter() - began) * 1000)
    return percentile(sorted(times), 50)
