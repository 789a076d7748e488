"""jc's and pingparsing's ping parsers read mace-ping's text as they read iputils ping's:
for runs of both tools in the same two namespaces (tests/pair.py), the parsers return the
same fields, but for the times (measured twice, they differ). Literal and name targets,
-q, -f, loss, total loss, duplicates; and without the lab, a duplicate in text made by
the output functions."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import jc
import pingparsing
import pytest
from pair import FAR, Pair, make_pair

from mace_tools.model import Measurement, RunResult
from mace_tools.output.live import TextSink

# what differs between two runs of the same command: the times
JC_TIMES = {"round_trip_ms_min", "round_trip_ms_avg", "round_trip_ms_max",
            "round_trip_ms_stddev", "time_ms"}
PINGPARSING_TIMES = {"rtt_min", "rtt_avg", "rtt_max", "rtt_mdev"}


def parsed_by_jc(text: str) -> dict[str, Any]:
    out = jc.parse("ping", text, quiet=True)
    fields = {k: v for k, v in out.items() if k not in JC_TIMES and k != "responses"}
    fields["responses"] = [{k: v for k, v in r.items() if k not in ("time_ms", "timestamp")}
                           for r in out.get("responses", [])]
    fields["timed"] = sorted(k for k in JC_TIMES if out.get(k) is not None)
    return fields


def parsed_by_pingparsing(text: str) -> dict[str, Any]:
    parser = pingparsing.PingParsing()
    stats = parser.parse(text)
    out = stats.as_dict()
    fields = {k: v for k, v in out.items() if k not in PINGPARSING_TIMES}
    fields["timed"] = sorted(k for k in PINGPARSING_TIMES if out.get(k) is not None)
    fields["parser"] = parser.parser_name
    fields["replies"] = [{k: v for k, v in r.items() if k not in ("time", "timestamp")}
                         for r in stats.icmp_replies]
    return fields


def assert_parsed_alike(iputils: str, mace: str) -> None:
    assert parsed_by_jc(mace) == parsed_by_jc(iputils)
    assert parsed_by_pingparsing(mace) == parsed_by_pingparsing(iputils)


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    yield from make_pair("mpq")


def _drop_every_other(pair: Pair) -> AbstractContextManager[None]:
    return pair.drop_replies(every=2)


RUNS = {
    "literal": (["-c", "3", "-i", "0.05", FAR], None),
    "name": (["-c", "3", "-i", "0.05", "far"], None),
    "quiet": (["-q", "-c", "3", "-i", "0.05", FAR], None),
    "flood": (["-f", "-c", "100", FAR], None),
    "flood quiet": (["-f", "-q", "-c", "100", FAR], None),
    "loss": (["-c", "4", "-i", "0.05", FAR], _drop_every_other),
    "total loss": (["-c", "2", "-i", "0.05", "-W", "0.3", FAR], lambda p: p.drop_replies()),
    "duplicates": (["-c", "3", "-i", "0.05", FAR], lambda p: p.duplicate_replies()),
}


@pytest.mark.lab
@pytest.mark.parametrize("case", sorted(RUNS))
def test_parsers_read_mace_ping_as_iputils_ping(pair: Pair, case: str) -> None:
    args, condition = RUNS[case]
    texts = []
    for tool in ("iputils", "mace"):  # (a rule's counters start afresh for each)
        with (condition or (lambda _: nullcontext()))(pair):
            texts.append(pair.ping(*args, tool=tool).stdout)
    iputils, mace = texts
    assert "mace " in mace or case == "total loss"  # the mace summary is there ...
    assert_parsed_alike(iputils, mace)  # ... and costs the parsers nothing
    jc_view = parsed_by_jc(mace)
    assert jc_view["packets_transmitted"] > 0 and jc_view["destination_ip"] == FAR
    if case != "total loss":
        assert jc_view["timed"] and parsed_by_pingparsing(mace)["timed"]


def test_a_duplicate_in_the_text_the_output_functions_make() -> None:
    """No lab: replies 1, 1 (DUP!) and 2 through the text sink; both parsers see two
    replies, one duplicate, and the rtt figures (which come after the mace lines)."""
    out = io.StringIO()
    sink = TextSink(dst_name=FAR, dst_addr=FAR, size=56, out=out, err=io.StringIO())
    result = RunResult(bytes(8), "198.18.97.1", transmitted=2, elapsed_ms=1001)
    sink.start("198.18.97.1")
    for seq, dup in ((1, False), (1, True), (2, False)):
        m = Measurement(seq=seq, src=FAR, ttl=64, icmp_bytes=64, rtt_raw_ns=61_000 + seq,
                        dup=dup, rtt_corrected_ns=3_000, egress_ns=40_000, ingress_ns=9_000)
        result.tally.add(m)
        sink.reply(m)
    sink.finish(result)
    text = out.getvalue()
    assert "mace corrected" in text
    by_jc = jc.parse("ping", text, quiet=True)
    assert (by_jc["packets_transmitted"], by_jc["packets_received"], by_jc["duplicates"]) == \
        (2, 2, 1)
    assert [r["duplicate"] for r in by_jc["responses"]] == [False, True, False]
    assert by_jc["round_trip_ms_avg"] == 0.061
    stats = pingparsing.PingParsing().parse(text)
    assert (stats.packet_transmit, stats.packet_receive, stats.packet_duplicate_count) == \
        (2, 2, 1)
    assert [r["duplicate"] for r in stats.icmp_replies] == [False, True, False]
    assert stats.rtt_avg == 0.061 and len(stats.icmp_replies) == 3
