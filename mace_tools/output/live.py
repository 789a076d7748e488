"""Sinks that turn a run's events into output as they happen: text, JSON, NDJSON.

The Pinger calls start/sent/reply/icmp_error/no_answer_yet/send_error/timeout/status while
it runs and finish once; the sinks only format (output/text.py, output/atlas.py) and write.
Text and NDJSON keep nothing per reply or probe (a flood of hours stays small); --json's
one document holds every result by design.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import IO, Any

from mace_tools.model import Measurement, RunResult, RunSummary
from mace_tools.output import atlas, text
from mace_tools.output.writes import write
from mace_tools.stats import Tally

PROG = "mace-ping"


def _address(addr: str) -> str:
    return addr


class _Sink:
    def __init__(self, *, dst_name: str, dst_addr: str, size: int, quiet: bool = False,
                 timestamps: bool = False, flood: bool = False, device: str | None = None,
                 bound: bool = False, name_of: Callable[[str], str] = _address,
                 audible: bool = False, verbose: bool = False, precise: bool = False,
                 show_dup: bool = True, pattern: bytes | None = None,
                 flowlabel: int | None = None,
                 out: IO[str] | None = None, err: IO[str] | None = None) -> None:
        """name_of: how ping names a sender ("NAME (ADDR)", or the address: -n); the
        rest are ping's switches: -q -D -f, -I NAME (device) or ADDR / -B (bound),
        -a -v -3, show_dup (False: a broadcast run without -v), -p."""
        self.dst_name, self.dst_addr, self.size = dst_name, dst_addr, size
        self.quiet, self.timestamps, self.flood = quiet, timestamps, flood
        self.device, self.bound, self.name_of = device, bound, name_of
        self.audible, self.verbose, self.precise = audible, verbose, precise
        self.show_dup, self.pattern, self.flowlabel = show_dup, pattern, flowlabel
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.source = ""
        self.ident: int | None = None  # shown by -v (a raw socket's, or -e's)

    def _write(self, line: str) -> None:
        write(self.out, line + "\n")

    def start(self, source_addr: str, ident: int | None = None) -> None:
        self.source = source_addr
        self.ident = ident

    def sent(self, seq: int) -> None: ...
    def reply(self, m: Measurement) -> None: ...
    def icmp_error(self, seq: int, src: str, text_: str) -> None: ...
    def icmp_notice(self, seq: int, src: str, text_: str) -> None: ...
    def no_answer_yet(self, seq: int) -> None: ...
    def timeout(self, seq: int) -> None: ...

    def warning(self, text_: str) -> None:
        """What setting up warned about (a refused -m, a broadcast target), as ping."""
        self._error_line(f"{PROG}: {text_}")

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
        ipg = result.elapsed_us // (result.transmitted - 1) \
            if result.ipg_ewma and result.transmitted > 1 else None
        return result.tally.summary(result.transmitted, result.errors, result.elapsed_ms,
                                    result.kernel_events_lost, result.kernel_records,
                                    pipe=result.pipesize, ipg_us=ipg)

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

    def start(self, source_addr: str, ident: int | None = None) -> None:
        super().start(source_addr, ident)
        if self.pattern is not None and not self.quiet:
            self._write(text.pattern_line(self.pattern))
        self._write(text.header(self.dst_name, self.dst_addr, self.size, source_addr,
                                self.device, self.bound, self.flowlabel))

    def _dots(self, chars: str) -> None:
        write(self.out, chars)

    def sent(self, seq: int) -> None:
        if self.flood and not self.quiet:
            self._dots(".")

    def reply(self, m: Measurement) -> None:
        if self.quiet:
            return
        bell = "\a" if self.audible else ""
        if self.flood:  # (iputils: a corrupted reply turns its dot into a C)
            self._dots(("\bC" if m.corrupted else "\b \b") + bell)
            return
        self._write(text.reply_line(
            m, self.timestamps, self.name_of(m.src), self.ident if self.verbose else None,
            self.precise, self.show_dup or self.verbose) + bell)

    def _stamp(self) -> str:
        """-D before a line that is not a reply: iputils stamps it as it prints it."""
        return text.stamp(time.clock_gettime_ns(time.CLOCK_REALTIME)) if self.timestamps \
            else ""

    def icmp_error(self, seq: int, src: str, text_: str) -> None:
        if self.flood and not self.quiet:
            self._dots("\bE")
        elif not self.quiet:
            self._write(self._stamp() + text.error_line(seq, self.name_of(src), text_))

    def icmp_notice(self, seq: int, src: str, text_: str) -> None:
        if not self.quiet and not self.flood:
            self._write(self._stamp() + text.notice_line(seq, self.name_of(src), text_))

    def no_answer_yet(self, seq: int) -> None:
        """-O: as iputils, also with -q (it prints this line whatever else it keeps)."""
        if not self.flood:
            self._write(self._stamp() + text.no_answer_line(seq))

    def send_error(self, seq: int, text_: str) -> None:
        if self.flood and not self.quiet:
            self._dots("E")  # iputils -f: no dot was printed for it
        else:
            super().send_error(seq, text_)

    def finish(self, result: RunResult) -> None:
        summary = self._summary(result)
        mace = text.mace_summary(summary, result.kernel, result.source)
        if mace and self.flood and not self.quiet:
            write(self.out, "\n")  # ends the dots' line (else iputils' block does)
        for line in mace:
            self._write(line)
        self._write(text.summary(self.dst_name, summary))


class JsonSink(_Sink):
    """One RIPE Atlas style document at the end: the only sink that keeps every reply."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._records: list[tuple[int, dict[str, Any]]] = []

    def reply(self, m: Measurement) -> None:
        if not m.corrupted:  # (not a reply: iputils counts it apart; its probe times out)
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
        if not m.corrupted:  # (as JsonSink)
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


SINKS: dict[str, Callable[..., _Sink]] = {"text": TextSink, "json": JsonSink,
                                          "ndjson": NdjsonSink}


def make_sink(mode: str, **kwargs: Any) -> _Sink:
    if mode == "jsonlines":  # ping -j (output/jsonlines.py)
        from mace_tools.output.jsonlines import JsonLinesSink

        return JsonLinesSink(**kwargs)
    return SINKS[mode](**kwargs)
