"""Sinks that turn a run's events into output as they happen: text, JSON, NDJSON.

The Pinger calls start/sent/reply/icmp_error/no_answer_yet/send_error/timeout/status while
it runs and finish once; the sinks only format (output/text.py, output/atlas.py) and write.
Text and NDJSON keep nothing per reply or probe (a flood of hours stays small); --json's
one document holds every result by design.
"""

from __future__ import annotations

import json
import sys
from typing import IO, Any

from mace_tools.model import Measurement, RunResult, RunSummary
from mace_tools.output import atlas, text
from mace_tools.stats import Tally

PROG = "mace-ping"


class _Sink:
    def __init__(self, *, dst_name: str, dst_addr: str, size: int, quiet: bool = False,
                 timestamps: bool = False, flood: bool = False, interface: str | None = None,
                 out: IO[str] | None = None, err: IO[str] | None = None) -> None:
        self.dst_name, self.dst_addr, self.size = dst_name, dst_addr, size
        self.quiet, self.timestamps, self.flood, self.interface = quiet, timestamps, flood, \
            interface
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.source = ""

    def _write(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()

    def start(self, source_addr: str) -> None:
        self.source = source_addr

    def sent(self, seq: int) -> None: ...
    def reply(self, m: Measurement) -> None: ...
    def icmp_error(self, seq: int, src: str, text_: str) -> None: ...
    def no_answer_yet(self, seq: int) -> None: ...
    def timeout(self, seq: int) -> None: ...

    def _error_line(self, line: str) -> None:
        """A line on stderr, as iputils' error(): stdout first, so the two interleave
        in order on a terminal."""
        self.out.flush()
        self.err.write(line + "\n")
        self.err.flush()

    def send_error(self, seq: int, text_: str) -> None:
        """sendto() failed (no route, prohibited...): as iputils, `PROG: sendmsg: ...`
        on stderr unless -q; the run goes on."""
        if not self.quiet:
            self._error_line(f"{PROG}: {text_}")

    def status(self, transmitted: int, tally: Tally) -> None:
        """SIGQUIT: iputils' status line on stderr, whatever the output mode (and -q)."""
        self._error_line(text.status_line(transmitted, tally))

    def _summary(self, result: RunResult) -> RunSummary:
        return result.tally.summary(result.transmitted, result.errors, result.elapsed_ms,
                                    result.kernel_events_lost, result.kernel_records)

    def _document(self, result: RunResult, results: list[dict[str, Any]]) -> dict[str, Any]:
        return atlas.document(
            dst_name=self.dst_name, dst_addr=self.dst_addr, src_addr=self.source,
            size=self.size, start_real_ns=result.start_real_ns, summary=self._summary(result),
            nonce=result.nonce, results=results, first_ttl=result.tally.first_ttl,
            source=result.source)

    def finish(self, result: RunResult) -> None:
        raise NotImplementedError


class TextSink(_Sink):
    """iputils text; -q prints only header and summary; -f prints dots as iputils."""

    def start(self, source_addr: str) -> None:
        super().start(source_addr)
        self._write(text.header(self.dst_name, self.dst_addr, self.size, source_addr,
                                self.interface))

    def _dots(self, chars: str) -> None:
        self.out.write(chars)
        self.out.flush()

    def sent(self, seq: int) -> None:
        if self.flood and not self.quiet:
            self._dots(".")

    def reply(self, m: Measurement) -> None:
        if self.flood:
            if not self.quiet and not m.dup:
                self._dots("\b \b")
        elif not self.quiet:
            self._write(text.reply_line(m, self.timestamps))

    def icmp_error(self, seq: int, src: str, text_: str) -> None:
        if self.flood and not self.quiet:
            self._dots("\bE")
        elif not self.quiet:
            self._write(text.error_line(seq, src, text_))

    def no_answer_yet(self, seq: int) -> None:
        if not self.quiet and not self.flood:
            self._write(text.no_answer_line(seq))

    def send_error(self, seq: int, text_: str) -> None:
        if self.flood and not self.quiet:
            self._dots("E")  # iputils -f: no dot was printed for it
        else:
            super().send_error(seq, text_)

    def finish(self, result: RunResult) -> None:
        if self.flood and not self.quiet:
            self.out.write("\n")
        self._write(text.summary(self.dst_name, self._summary(result), result.kernel,
                                 result.source))


class JsonSink(_Sink):
    """One RIPE Atlas style document at the end: the only sink that keeps every reply."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._records: list[tuple[int, dict[str, Any]]] = []

    def reply(self, m: Measurement) -> None:
        self._records.append((m.seq, atlas.reply_record(m)))

    def send_error(self, seq: int, text_: str) -> None:
        super().send_error(seq, text_)
        self._records.append((seq, atlas.send_error_record(seq, text_)))

    def timeout(self, seq: int) -> None:
        self._records.append((seq, atlas.timeout_record(seq)))

    def finish(self, result: RunResult) -> None:
        results = [rec for _, rec in sorted(self._records, key=lambda r: r[0])]
        self._write(json.dumps(self._document(result, results)))


class NdjsonSink(_Sink):
    """A record per reply as it arrives, per send error as it happens, timeouts when known
    (at the end; in a run past 65536 probes also when a seq is reused), then a summary."""

    def reply(self, m: Measurement) -> None:
        self._write(json.dumps({"type": "reply", **atlas.reply_record(m)}))

    def send_error(self, seq: int, text_: str) -> None:
        super().send_error(seq, text_)
        self._write(json.dumps({"type": "error", **atlas.send_error_record(seq, text_)}))

    def timeout(self, seq: int) -> None:
        self._write(json.dumps({"type": "timeout", **atlas.timeout_record(seq)}))

    def finish(self, result: RunResult) -> None:
        doc = self._document(result, [])
        del doc["result"]
        doc["type"] = "summary"  # the Atlas document's "ping" type marks the full document
        self._write(json.dumps(doc))


SINKS = {"text": TextSink, "json": JsonSink, "ndjson": NdjsonSink}


def make_sink(mode: str, **kwargs: Any) -> _Sink:
    return SINKS[mode](**kwargs)
