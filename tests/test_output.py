"""Text output exactly as iputils prints it (plus mace fields); JSON in the Atlas shape."""

from __future__ import annotations

import io
import json

import pytest

from mace_tools.model import Hook, Measurement, Packet, RunResult, RunSummary, Stage
from mace_tools.output import atlas, text
from mace_tools.output.live import JsonSink, NdjsonSink, TextSink
from mace_tools.stats import Series, Tally, rtt_stats


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
        m.path = [Stage(Packet.REQUEST, "eth0", 2, 11, True, 5_000, "198.18.1.10", "198.18.0.2",
                        Hook.XMIT)]
    return m


def test_reply_line() -> None:
    assert text.reply_line(measurement()) == (
        "64 bytes from 198.18.0.2: icmp_seq=1 ttl=63 time=0.061 ms "
        "corrected=0.003 ms egress=0.016 ms ingress=0.004 ms")


def test_reply_line_without_kernel_data_and_duplicate() -> None:
    assert text.reply_line(measurement(corrected=False, dup=True)) == (
        "64 bytes from 198.18.0.2: icmp_seq=1 ttl=63 time=0.061 ms corrected=none (DUP!)")


def test_reply_line_with_timestamp() -> None:
    assert text.reply_line(measurement(), timestamps=True).startswith(
        "[1700000000.123456] 64 bytes from")


def test_header() -> None:
    assert text.header("t", "198.18.0.2", 56) == "PING t (198.18.0.2) 56(84) bytes of data."
    assert text.header("t", "198.18.0.2", 100, "198.18.1.10", "eth0") == \
        "PING t (198.18.0.2) from 198.18.1.10 eth0: 100(128) bytes of data."


def summary(raw: list[float] | None = None, corrected: list[float] | None = None,
            egress: list[float] | None = None, ingress: list[float] | None = None,
            **kw: object) -> RunSummary:
    """A summary of these RTT lists (ms), built as a run builds it: from running sums."""
    series = {}
    lists = {"raw": [0.041, 0.05, 0.061] if raw is None else raw,
             "corrected": [0.003, 0.004, 0.005] if corrected is None else corrected,
             "egress": [0.016] * 3 if egress is None else egress,
             "ingress": [0.004] * 3 if ingress is None else ingress}
    for name, values in lists.items():
        series[name] = Series()
        for v in values:
            series[name].add(round(v * 1_000_000))
    base: dict[str, object] = dict(
        transmitted=3, received=3, duplicates=0, errors=0, elapsed_ms=2003,
        rtt_raw=series["raw"].stats(), rtt_corrected=series["corrected"].stats(),
        egress_avg_ms=series["egress"].mean_ms(), ingress_avg_ms=series["ingress"].mean_ms(),
        kernel_events_lost=0, kernel_records=3)
    base.update(kw)
    return RunSummary(**base)  # type: ignore[arg-type]


def test_running_sums_print_as_the_full_list() -> None:
    """The summary from running sums shows what the full list of values would."""
    raw = [0.041, 0.05, 0.061, 0.1234, 0.0456]
    s = summary(raw=raw)
    exact = rtt_stats(raw)
    assert s.rtt_raw is not None and exact is not None
    assert text.summary("h", s).splitlines()[3] == (
        f"rtt min/avg/max/mdev = {exact.min:.3f}/{exact.avg:.3f}/{exact.max:.3f}/"
        f"{exact.mdev:.3f} ms")


def test_summary_lines() -> None:
    """iputils' block as iputils prints it; the mace lines apart (printed before it)."""
    assert text.summary("h", summary()).splitlines() == [
        "",
        "--- h ping statistics ---",
        "3 packets transmitted, 3 received, 0% packet loss, time 2003ms",
        "rtt min/avg/max/mdev = 0.041/0.051/0.061/0.008 ms",
    ]
    assert text.mace_summary(summary()) == [
        "mace corrected min/avg/max/mdev = 0.003/0.004/0.005/0.001 ms",
        "mace overhead egress/ingress avg = 0.016/0.004 ms, "
        "kernel data 3/3 replies (100%), 0 events lost, 3 kernel records",
    ]


def test_summary_pipe_ipg_ewma_and_corrupted_as_iputils() -> None:
    s = summary(transmitted=100, received=99, corrupted=1, pipe=3,
                ipg_ewma_us=(16, 44))
    lines = text.summary("h", s).splitlines()
    assert lines[2] == ("100 packets transmitted, 99 received, +1 corrupted, 1% packet loss, "
                        "time 2003ms")
    assert lines[3] == "rtt min/avg/max/mdev = 0.041/0.051/0.061/0.008 ms, pipe 3, " \
        "ipg/ewma 0.016/0.005 ms"
    # no reply at all: nothing after the counts line, pipe or not (iputils: no ipg then)
    s = summary(received=0, raw=[], corrected=[], egress=[], ingress=[], pipe=2,
                ipg_ewma_us=(16, 44))
    assert text.summary("h", s).splitlines()[3] == "pipe 2"


def test_summary_loss_duplicates_errors_and_partial_coverage() -> None:
    s = summary(transmitted=3, received=2, duplicates=1, errors=1, raw=[0.1, 0.2],
                corrected=[0.01], egress=[0.02], ingress=[0.03])
    lines = text.summary("h", s).splitlines()
    assert lines[2] == ("3 packets transmitted, 2 received, +1 duplicates, +1 errors, "
                        "33.3333% packet loss, time 2003ms")
    assert text.mace_summary(s)[1].endswith(
        "kernel data 1/2 replies (50%), 0 events lost, 3 kernel records")


def test_summary_nothing_received() -> None:
    s = summary(received=0, raw=[], corrected=[], egress=[], ingress=[])
    # iputils ends with a blank line where the rtt line would be
    assert text.summary("h", s).endswith(
        "\n3 packets transmitted, 0 received, 100% packet loss, time 2003ms\n")


def test_summary_without_any_correction() -> None:
    s = summary(corrected=[], egress=[], ingress=[], kernel_events_lost=5, kernel_records=0)
    assert text.mace_summary(s) == \
        ["mace corrected: none, kernel data 0/3 replies (0%), 5 events lost, 0 kernel records"]


def run_result() -> RunResult:
    return RunResult(nonce=bytes.fromhex("0102030405060708"), source_addr="198.18.1.10",
                     transmitted=3, elapsed_ms=2003, start_real_ns=1_700_000_000_000_000_000)


REPLIES = [measurement(1), measurement(3, corrected=False)]


def sink_output(cls: type, result: RunResult, send_error: bool = False) -> str:
    """Feed a sink the way the Pinger does: start, each reply (tallied), probe 2 lost (or
    refused by sendto), finish."""
    out = io.StringIO()
    sink = cls(dst_name="target", dst_addr="198.18.0.2", size=56, out=out, err=io.StringIO())
    sink.start(result.source_addr)
    for m in REPLIES:
        result.tally.add(m)
        sink.reply(m)
    if send_error:
        result.errors += 1
        sink.send_error(2, "sendmsg: No route to host")
    else:
        sink.timeout(2)
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
    assert (mace["p50"], mace["p95"], mace["p99"]) == (0.003, 0.003, 0.003)


def test_ndjson_records() -> None:
    lines = [json.loads(ln) for ln in sink_output(NdjsonSink, run_result()).splitlines()]
    assert [r["type"] for r in lines] == ["reply", "reply", "timeout", "summary"]
    assert lines[0]["seq"] == 1 and lines[0]["rtt"] == 0.0612
    assert lines[1]["rtt_corrected"] is None
    assert lines[3]["mace"]["nonce"] == "0102030405060708" and "result" not in lines[3]


def test_text_sink_quiet_prints_header_and_summary_only() -> None:
    lines = sink_output(lambda **kw: TextSink(quiet=True, **kw), run_result()).splitlines()
    assert lines[0].startswith("PING target")
    assert lines[1].startswith("mace corrected ") and lines[2].startswith("mace overhead ")
    assert lines[3] == "" and lines[4].startswith("---")
    assert len(lines) == 7 and lines[-1].startswith("rtt min/avg/max/mdev = ")


def test_atlas_empty_run_uses_minus_one() -> None:
    s = summary(received=0, raw=[], corrected=[], egress=[], ingress=[])
    doc = atlas.document(dst_name="t", dst_addr="a", src_addr="b", size=56, start_real_ns=0,
                         summary=s, nonce=bytes(8), results=[], first_ttl=None)
    assert (doc["min"], doc["avg"], doc["max"], doc["ttl"]) == (-1, -1, -1, -1)
    assert (doc["mace"]["min"], doc["mace"]["coverage"]) == (-1, 1.0)
    assert (doc["mace"]["p99"], doc["mace"]["egress_avg"]) == (-1, None)


def test_json_percentiles_within_the_sketch_error() -> None:
    values = [0.020 + i * 0.0001 for i in range(1000)]  # 0.020 .. 0.1199 ms
    mace = atlas.mace_summary(summary(raw=values, corrected=values), bytes(8))
    for key, exact in (("p50", 0.0699), ("p95", 0.1149), ("p99", 0.1189)):
        assert abs(mace[key] - exact) <= 0.01 * exact + 0.0005, key  # 1% + rounding to µs


def test_send_error_records() -> None:
    """A probe sendto() refused: an error record in its place, in both JSON shapes."""
    doc = json.loads(sink_output(JsonSink, run_result(), send_error=True))
    assert doc["result"][1] == {"error": "sendmsg: No route to host", "seq": 2}
    lines = [json.loads(ln) for ln in
             sink_output(NdjsonSink, run_result(), send_error=True).splitlines()]
    assert [r["type"] for r in lines] == ["reply", "reply", "error", "summary"]
    assert lines[2]["error"] == "sendmsg: No route to host" and lines[2]["seq"] == 2


@pytest.mark.parametrize(("flood", "quiet", "stdout", "stderr"), [
    (False, False, "", "mace-ping: sendmsg: Network is unreachable\n"),
    (True, False, "E", ""),  # as iputils -f: an E where no dot was printed
    (False, True, "", ""),
])
def test_text_send_error(flood: bool, quiet: bool, stdout: str, stderr: str) -> None:
    out, err = io.StringIO(), io.StringIO()
    sink = TextSink(dst_name="t", dst_addr="a", size=56, flood=flood, quiet=quiet, out=out,
                    err=err)
    sink.send_error(7, "sendmsg: Network is unreachable")
    assert (out.getvalue(), err.getvalue()) == (stdout, stderr)


def test_status_line_as_iputils() -> None:
    """iputils' status(): received/transmitted, whole-percent loss, and min/avg/ewma/max
    from whole µs, truncated (not rounded) to 3 decimals of ms."""
    tally = Tally()
    assert text.status_line(0, tally) == "\r0/0 packets, 0% loss"
    for seq, ns in enumerate([61_999, 58_500, 1_234_567], start=1):
        tally.add(Measurement(seq=seq, src="x", ttl=64, icmp_bytes=64, rtt_raw_ns=ns))
    # ewma8 (µs): 61*8 = 488; 488 + 58 - 61 = 485; 485 + 1234 - 60 = 1659 -> 1659/8 = 207
    assert tally.ewma8_us == 1659
    assert text.status_line(7, tally) == (
        "\r3/7 packets, 57% loss, min/avg/ewma/max = 0.058/0.451/0.207/1.234 ms")


def test_status_goes_to_stderr_in_every_mode() -> None:
    for cls in (TextSink, JsonSink, NdjsonSink):
        out, err = io.StringIO(), io.StringIO()
        cls(dst_name="t", dst_addr="a", size=56, quiet=True, out=out, err=err).status(
            1, Tally())
        assert out.getvalue() == "" and err.getvalue() == "\r0/1 packets, 100% loss\n"
