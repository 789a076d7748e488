"""Text output exactly as iputils prints it (plus mace fields); JSON in the Atlas shape."""

from __future__ import annotations

import io
import json

import pytest

from mace_tools.model import Measurement, Packet, RunSummary, Stage
from mace_tools.output import atlas, text
from mace_tools.output.live import JsonSink, NdjsonSink, TextSink
from mace_tools.pinger import RunResult


@pytest.mark.parametrize(("ns", "expected"), [
    (58_000, "0.058"), (999_499, "0.999"), (1_000_000, "1.00"), (9_994_000, "9.99"),
    (9_995_000, "10.0"), (12_345_000, "12.3"), (99_949_000, "99.9"), (99_950_000, "100"),
    (123_456_789, "123"), (499, "0.000"), (500, "0.001"),
])
def test_iputils_time_tiers(ns: int, expected: str) -> None:
    assert text.format_ms(ns) == expected


def measurement(seq: int = 1, corrected: bool = True, dup: bool = False) -> Measurement:
    m = Measurement(seq=seq, src="198.18.0.2", ttl=63, icmp_bytes=64, rtt_raw_ns=61_200, dup=dup,
                    recv_real_ns=1_700_000_000_123_456_789)
    if corrected:
        m.rtt_corrected_ns, m.egress_ns, m.ingress_ns = 3_400, 16_000, 4_100
        m.outer_dev = "out0@4026532177"
        m.path = [Stage(Packet.REQUEST, "eth0", 2, 11, True, 5_000, "198.18.1.10", "198.18.0.2")]
    return m


def test_reply_line() -> None:
    assert text.reply_line(measurement()) == (
        "64 bytes from 198.18.0.2: icmp_seq=1 ttl=63 time=0.061 ms "
        "corrected=0.003 ms egress=0.016 ms ingress=0.004 ms")


def test_reply_line_without_kernel_data_and_duplicate() -> None:
    assert text.reply_line(measurement(corrected=False, dup=True)) == (
        "64 bytes from 198.18.0.2: icmp_seq=1 ttl=63 time=0.061 ms (DUP!) corrected=none")


def test_reply_line_with_timestamp() -> None:
    assert text.reply_line(measurement(), timestamps=True).startswith(
        "[1700000000.123456] 64 bytes from")


def test_header() -> None:
    assert text.header("t", "198.18.0.2", 56) == "PING t (198.18.0.2) 56(84) bytes of data."
    assert text.header("t", "198.18.0.2", 100, "198.18.1.10", "eth0") == \
        "PING t (198.18.0.2) from 198.18.1.10 eth0: 100(128) bytes of data."


def summary(**kw: object) -> RunSummary:
    base = dict(transmitted=3, received=3, duplicates=0, errors=0, elapsed_ms=2003,
                rtt_raw_ms=[0.041, 0.05, 0.061], rtt_corrected_ms=[0.003, 0.004, 0.005],
                egress_ms=[0.016, 0.016, 0.016], ingress_ms=[0.004, 0.004, 0.004],
                kernel_events_lost=0)
    base.update(kw)
    return RunSummary(**base)  # type: ignore[arg-type]


def test_summary_lines() -> None:
    assert text.summary("h", summary()).splitlines() == [
        "",
        "--- h ping statistics ---",
        "3 packets transmitted, 3 received, 0% packet loss, time 2003ms",
        "rtt min/avg/max/mdev = 0.041/0.051/0.061/0.008 ms",
        "mace corrected min/avg/max/mdev = 0.003/0.004/0.005/0.001 ms",
        "mace overhead egress/ingress avg = 0.016/0.004 ms, "
        "kernel data 3/3 replies (100%), 0 events lost",
    ]


def test_summary_loss_duplicates_errors_and_partial_coverage() -> None:
    s = summary(transmitted=3, received=2, duplicates=1, errors=1, rtt_raw_ms=[0.1, 0.2],
                rtt_corrected_ms=[0.01], egress_ms=[0.02], ingress_ms=[0.03])
    lines = text.summary("h", s).splitlines()
    assert lines[2] == ("3 packets transmitted, 2 received, +1 duplicates, +1 errors, "
                        "33.3333% packet loss, time 2003ms")
    assert lines[5].endswith("kernel data 1/2 replies (50%), 0 events lost")


def test_summary_nothing_received() -> None:
    s = summary(received=0, rtt_raw_ms=[], rtt_corrected_ms=[], egress_ms=[], ingress_ms=[])
    # iputils ends with a blank line where the rtt line would be
    assert text.summary("h", s).endswith(
        "\n3 packets transmitted, 0 received, 100% packet loss, time 2003ms\n")


def test_summary_without_any_correction() -> None:
    s = summary(rtt_corrected_ms=[], egress_ms=[], ingress_ms=[], kernel_events_lost=5)
    assert text.summary("h", s).splitlines()[4] == \
        "mace corrected: none, kernel data 0/3 replies (0%), 5 events lost"


def run_result() -> RunResult:
    r = RunResult(nonce=bytes.fromhex("0102030405060708"), source_addr="198.18.1.10",
                  transmitted=3, elapsed_ms=2003, start_real_ns=1_700_000_000_000_000_000)
    r.unanswered = [2]
    return r


REPLIES = [measurement(1), measurement(3, corrected=False)]


def sink_output(cls: type, result: RunResult) -> str:
    """Feed a sink the way the Pinger does: start, each reply (tallied), finish."""
    out = io.StringIO()
    sink = cls(dst_name="target", dst_addr="198.18.0.2", size=56, out=out)
    sink.start(result.source_addr)
    for m in REPLIES:
        result.tally.add(m)
        sink.reply(m)
    sink.finish(result)
    return out.getvalue()


def test_json_document() -> None:
    doc = json.loads(sink_output(JsonSink, run_result()))
    assert {k: doc[k] for k in ("fw", "af", "proto", "dst_addr", "dst_name", "src_addr", "size",
                                "sent", "rcvd", "dup", "ttl", "timestamp")} == {
        "fw": 5020, "af": 4, "proto": "ICMP", "dst_addr": "198.18.0.2", "dst_name": "target",
        "src_addr": "198.18.1.10", "size": 56, "sent": 3, "rcvd": 2, "dup": 0, "ttl": 63,
        "timestamp": 1_700_000_000}
    assert (doc["min"], doc["avg"], doc["max"]) == (0.061, 0.061, 0.061)
    first, lost, third = doc["result"]
    assert first["rtt"] == 0.0612 and first["rtt_corrected"] == 0.0034
    assert first["egress"] == 0.016 and first["ingress"] == 0.0041
    assert first["path"] == [{"pkt": "request", "dev": "eth0", "ifindex": 2, "netns": 11,
                              "dir": "tx", "t": 5.0, "src": "198.18.1.10",
                              "dst": "198.18.0.2"}]
    assert lost == {"x": "*", "seq": 2}
    assert third["rtt_corrected"] is None and third["path"] == []
    mace = doc["mace"]
    assert mace["nonce"] == "0102030405060708"
    assert mace["coverage"] == 0.5 and mace["replies_with_kernel_data"] == 1
    assert (mace["min"], mace["max"]) == (0.003, 0.003)


def test_ndjson_records() -> None:
    lines = [json.loads(ln) for ln in sink_output(NdjsonSink, run_result()).splitlines()]
    assert [r["type"] for r in lines] == ["reply", "reply", "timeout", "summary"]
    assert lines[0]["seq"] == 1 and lines[0]["rtt"] == 0.0612
    assert lines[1]["rtt_corrected"] is None
    assert lines[3]["mace"]["nonce"] == "0102030405060708" and "result" not in lines[3]


def test_text_sink_quiet_prints_header_and_summary_only() -> None:
    lines = sink_output(lambda **kw: TextSink(quiet=True, **kw), run_result()).splitlines()
    assert lines[0].startswith("PING target") and lines[1] == ""
    assert lines[2].startswith("---")


def test_atlas_empty_run_uses_minus_one() -> None:
    s = summary(received=0, rtt_raw_ms=[], rtt_corrected_ms=[], egress_ms=[], ingress_ms=[])
    doc = atlas.document(dst_name="t", dst_addr="a", src_addr="b", size=56, start_real_ns=0,
                         summary=s, nonce=bytes(8), results=[], first_ttl=None)
    assert (doc["min"], doc["avg"], doc["max"], doc["ttl"]) == (-1, -1, -1, -1)
    assert (doc["mace"]["min"], doc["mace"]["coverage"]) == (-1, 1.0)
