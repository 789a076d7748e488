"""mace-agent's metrics (agent/metrics.py) held to prometheus_client's parser, its probe
configuration (agent/probeconfig.py) and --metrics address parsing (agent/exporter.py)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mace_tools.agent.exporter import MetricsServer, parse_listen
from mace_tools.agent.metrics import SECONDS_BUCKETS, Registry, exponential_buckets
from mace_tools.agent.probeconfig import (
    MAX_PROBES,
    ProbeSpec,
    checked,
    load_config,
    parse_probe,
)
from mace_tools.agent.probes import MetricsSink, PingMetrics, probe_idents
from mace_tools.errors import MaceError
from mace_tools.lab.prometheus import http_get
from mace_tools.model import Measurement


def families(registry: Registry) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(registry.render().decode())}


def test_histogram_as_prometheus_client_reads_it() -> None:
    r = Registry()
    h = r.histogram("mace_ping_rtt_seconds", "RTT", ("source", "target", "kind"))
    series = h.labels("container:web", "example.test", "raw")
    for v in (0.5e-6, 1e-6, 3e-6, 40e-6, 2.0, 100.0):
        series.observe(v)
    fam = families(r)["mace_ping_rtt_seconds"]
    assert fam.type == "histogram"
    buckets = {s.labels["le"]: s.value for s in fam.samples if s.name.endswith("_bucket")}
    assert buckets["1e-06"] == 2  # le is inclusive: 1 us counts in the 1 us bucket
    assert buckets["4e-06"] == 3
    assert buckets["6.4e-05"] == 4
    assert buckets["2.097152"] == 5
    assert buckets["+Inf"] == 6
    values = list(buckets.values())
    assert values == sorted(values)  # cumulative
    count = next(s.value for s in fam.samples if s.name.endswith("_count"))
    total = next(s.value for s in fam.samples if s.name.endswith("_sum"))
    assert count == 6 and math.isclose(total, 102.0000445)
    assert {s.labels["kind"] for s in fam.samples} == {"raw"}


def test_buckets_are_fine_enough_for_microseconds() -> None:
    assert SECONDS_BUCKETS[0] == 1e-6 and SECONDS_BUCKETS[1] == 2e-6
    assert SECONDS_BUCKETS[-1] > 5.0  # a slow Internet RTT still has a bucket
    with pytest.raises(ValueError):
        exponential_buckets(0, 2, 3)


def test_counters_gauges_and_label_escaping() -> None:
    r = Registry()
    c = r.counter("mace_ping_requests_total", "sent", ("source", "target"))
    hostile = 'a"b\\c\nd'
    c.labels(hostile, "t").inc(3)
    g = r.gauge("mace_probe_up", "up", ("source", "target"))
    g.labels("host", "t").set(1)
    r.gauge_callback("mace_agent_clients", "clients", lambda: 7)
    got = families(r)
    sample = got["mace_ping_requests"].samples[0]  # (the parser names the family so)
    assert sample.name == "mace_ping_requests_total" and sample.value == 3
    assert sample.labels["source"] == hostile  # escaped and read back intact
    assert got["mace_probe_up"].samples[0].value == 1
    assert got["mace_agent_clients"].samples[0].value == 7
    with pytest.raises(ValueError):
        c.labels("x", "y").inc(-1)
    with pytest.raises(ValueError):
        r.counter("mace_bad", "a counter without _total")
    with pytest.raises(ValueError):
        r.gauge("mace_probe_up", "twice")
    with pytest.raises(ValueError):
        g.labels("only one")


def test_a_scrape_never_sees_a_half_written_histogram() -> None:
    """Writers and the scrape share one lock: +Inf, _count and _sum always agree."""
    r = Registry()
    series = r.histogram("h_seconds", "h", ("a",)).labels("x")
    stop = threading.Event()

    def write() -> None:
        while not stop.is_set():
            series.observe(1.0)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        for _ in range(200):
            fam = families(r)["h_seconds"]
            inf = next(s.value for s in fam.samples if s.labels.get("le") == "+Inf")
            count = next(s.value for s in fam.samples if s.name == "h_seconds_count")
            total = next(s.value for s in fam.samples if s.name == "h_seconds_sum")
            assert inf == count == total
    finally:
        stop.set()
        writer.join()


def test_metrics_server_serves_and_refuses() -> None:
    r = Registry()
    r.gauge("g", "a gauge").labels().set(2)
    server = MetricsServer("127.0.0.1", 0, r)
    try:
        port = server.address[1]
        status, body, _ = http_get(port, "/metrics")
        assert status == 200 and b"\ng 2\n" in b"\n" + body
        assert http_get(port, "/nothing")[0] == 404
        with pytest.raises(MaceError, match=r"cannot serve metrics on 127\.0\.0\.1:\d+: "
                                            "Address already in use"):
            MetricsServer("127.0.0.1", port, r)
    finally:
        server.close()


@pytest.mark.parametrize(("text", "expected"), [
    ("9386", ("0.0.0.0", 9386)), (":9386", ("0.0.0.0", 9386)),
    ("127.0.0.1:1", ("127.0.0.1", 1)), ("[::1]:9386", ("::1", 9386)),
    ("localhost:80", ("localhost", 80)),
])
def test_listen_addresses(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["", "0", "65536", "x", "::1:9386", "1.2.3:80", "[::1]",
                                  "host.example:80", "9386 "])
def test_bad_listen_addresses(text: str) -> None:
    with pytest.raises(MaceError, match="--metrics"):
        parse_listen(text)


@pytest.mark.parametrize(("text", "source", "target"), [
    ("198.18.0.2", "host", "198.18.0.2"),
    ("=198.18.0.2", "host", "198.18.0.2"),
    ("netns:lab-c0=example.test", "netns:lab-c0", "example.test"),
    ("netns:/run/netns/x=2001:2::1", "netns:/run/netns/x", "2001:2::1"),
    ("pid:42=t.test", "pid:42", "t.test"),
    ("container:web=t.test", "container:web", "t.test"),
    ("container:a=b=t.test", "container:a=b", "t.test"),  # the last '=' splits
])
def test_probe_option(text: str, source: str, target: str) -> None:
    spec = parse_probe(text, 2.0)
    assert (spec.source, spec.target, spec.interval_s) == (source, target, 2.0)


@pytest.mark.parametrize("text", ["", "netns:=t", "ns:x=t", "pid:0=t", "pid:x=t",
                                  "pid:99999999=t", "container:web=", "container:web= t",
                                  "pid:-1=t"])
def test_bad_probe_option(text: str) -> None:
    with pytest.raises(MaceError, match="--probe"):
        parse_probe(text, 1.0)


def test_config_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('interval = 2\n[[probe]]\ntarget = "a.test"\n'
                    '[[probe]]\nsource = "container:web"\ntarget = "b.test"\ninterval = 0.5\n')
    assert load_config(path, 1.0) == [ProbeSpec(None, "", "a.test", 2.0),
                                      ProbeSpec("container", "web", "b.test", 0.5)]


@pytest.mark.parametrize(("text", "why"), [
    ("[[probe]]\n", "needs a target"),
    ('[[probe]]\ntarget = "a"\nport = 1\n', "unknown key 'port'"),
    ('[[probe]]\ntarget = "a"\ninterval = nan\n', "bad interval"),
    ('[[probe]]\ntarget = "a"\ninterval = inf\n', "bad interval"),
    ('[[probe]]\ntarget = "a"\ninterval = 0\n', "bad interval"),
    ('[[probe]]\ntarget = "a"\ninterval = "1"\n', "must be a number"),
    ('[[probe]]\ntarget = "a"\ninterval = true\n', "must be a number"),
    ('[[probe]]\ntarget = 5\n', "needs a target"),
    ('[[probe]]\ntarget = "a"\nsource = "vm:x"\n', "bad source"),
    ('probe = "a"\n', r"\[\[probe\]\] tables"),
    ('probes = []\n', "unknown key 'probes'"),
    ("[[probe]\n", "agent.toml: "),
])
def test_bad_config_file(tmp_path: Path, text: str, why: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    with pytest.raises(MaceError, match=why):
        load_config(path, 1.0)


def test_unreadable_config_file(tmp_path: Path) -> None:
    with pytest.raises(MaceError, match=r"cannot read .*No such file"):
        load_config(tmp_path / "none.toml", 1.0)
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(MaceError, match="not UTF-8"):
        load_config(binary, 1.0)


def test_probes_are_checked_together() -> None:
    twice = [parse_probe("container:web=t.test", 1.0), parse_probe("container:web=t.test", 2)]
    with pytest.raises(MaceError, match="given twice"):
        checked(twice)
    many = [parse_probe(f"t{i}.test", 1.0) for i in range(MAX_PROBES + 1)]
    with pytest.raises(MaceError, match="too many probes"):
        checked(many)


@pytest.mark.parametrize(("args", "why"), [
    (["--probe", "198.18.0.2"], "probes need --metrics"),
    (["--metrics", "x"], "--metrics 'x': bad port"),
    (["--metrics", "9386", "--probe", "pid:x=t.test"], "bad pid"),
    (["--metrics", "9386", "--probe", "t.test", "--probe-interval", "nan"],
     "--probe-interval: bad interval"),
    (["--metrics", "9386", "--config", "/nonexistent/agent.toml"], "cannot read"),
    (["--idle-detach", "nan"], "--idle-detach: bad value 'nan'"),
    (["--idle-detach", "-1"], "--idle-detach: bad value '-1'"),
    (["--idle-detach", "1e400"], "--idle-detach: bad value '1e400'"),
    (["--idle-detach", "soon"], "--idle-detach: bad value 'soon'"),
    (["--probe-rate", "-1"], "--probe-rate"),
    (["--probe-rate", "nan"], "--probe-rate"),
    (["--probe-rate", "1e9"], "--probe-rate"),  # (a whole number only)
    (["--probe-rate", "1000000001"], "--probe-rate"),
])
def test_agent_refuses_bad_options_in_one_line(args: list[str], why: str) -> None:
    """Checked before anything is loaded or bound: one line, exit status 2."""
    run = subprocess.run([sys.executable, "-m", "mace_tools.cli.agent", *args],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and why in lines[0], run.stderr
    assert "Traceback" not in run.stderr


def _sink() -> tuple[MetricsSink, Registry]:
    registry = Registry()
    sink = MetricsSink(PingMetrics(registry), parse_probe("netns:c0=t.test", 1.0))
    return sink, registry


def _counts(registry: Registry) -> dict[str, float]:
    """Every sample without an le label, by its name and the kind/stage it has."""
    out = {}
    for fam in text_string_to_metric_families(registry.render().decode()):
        for s in fam.samples:
            if "le" not in s.labels:
                out[s.name + "/" + s.labels.get("kind", s.labels.get("stage", ""))] = s.value
    return out


def test_sink_observes_a_corrected_rtt_only_with_complete_kernel_data() -> None:
    sink, registry = _sink()
    sink.start("198.18.1.10")
    sink.sent(1)
    sink.reply(Measurement(1, "198.18.0.2", 64, 64, rtt_raw_ns=50_000))  # no kernel data
    sink.sent(2)
    sink.reply(Measurement(2, "198.18.0.2", 64, 64, rtt_raw_ns=60_000,
                           rtt_corrected_ns=10_000, egress_ns=30_000, ingress_ns=20_000))
    sink.reply(Measurement(2, "198.18.0.2", 64, 64, rtt_raw_ns=61_000, dup=True,
                           rtt_corrected_ns=10_000))
    sink.reply(Measurement(3, "198.18.0.2", 64, 64, rtt_raw_ns=-5, corrupted=False))
    sink.reply(Measurement(4, "198.18.0.2", 64, 64, rtt_raw_ns=17_000, late_kernel_stamp=True))
    c = _counts(registry)
    assert c["mace_ping_requests_total/"] == 2
    assert c["mace_ping_responses_total/"] == 4  # the DUP is not a response
    assert c["mace_ping_responses_with_kernel_data_total/"] == 1
    assert c["mace_ping_responses_late_kernel_stamp_total/"] == 1
    assert c["mace_ping_rtt_seconds_count/raw"] == 3  # a negative raw (clock step) is not
    assert c["mace_ping_rtt_seconds_count/corrected"] == 1
    assert math.isclose(c["mace_ping_rtt_seconds_sum/corrected"], 10e-6)
    assert c["mace_ping_stage_seconds_count/egress"] == 1
    assert c["mace_ping_stage_seconds_count/ingress"] == 1
    assert c["mace_probe_up/"] == 1


def test_sink_counts_lost_records_across_runs_and_failed_sends() -> None:
    sink, registry = _sink()
    lost = [0]
    sink.new_run(lambda: lost[0])
    lost[0] = 3
    sink.sent(1)
    lost[0] = 5
    sink.count_lost()  # the run's end
    sink.new_run(lambda: 1)  # a new run's counter starts again from 0
    sink.sent(1)
    sink.send_error(2, "sendmsg: Network is unreachable")
    c = _counts(registry)
    assert c["mace_kernel_events_lost_total/"] == 6  # monotonic: 5, then 1 more
    assert c["mace_ping_requests_total/"] == 3  # attempts: a failed send is loss


def test_probe_idents_are_distinct_and_never_zero() -> None:
    idents = probe_idents(MAX_PROBES)
    assert len(set(idents)) == MAX_PROBES and 0 not in idents
    assert all(0 < i <= 0xFFFF for i in idents)


def test_hostile_probe_text_and_config_files(tmp_path: Path) -> None:
    with pytest.raises(MaceError, match="not UTF-8"):
        parse_probe("container:\udcff=t.test", 1.0)  # argv's undecodable byte
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    with pytest.raises(MaceError, match="not a regular file"):
        load_config(fifo, 1.0)  # never waits for a writer
    deep = tmp_path / "deep.toml"
    deep.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(MaceError, match=r"nested too deeply|unknown key"):
        load_config(deep, 1.0)
