"""ping -j: the JSON lines current iputils prints (ping/ping_json.c, ping_output.c), one
object per line, with the mace fields added to each reply object.

    {"bytes": 64, "host": "198.18.0.2", "seq": 1, "ttl": 63, "time": "0.061",
     "rtt_corrected": 0.0034, "egress": 0.016, "ingress": 0.0041}
    {"host": "198.18.0.2", "transmitted": 3, "received": 3, "duplicates": 0,
     "corrupted": 0, "errors": 0, "loss": 0, "time": 2003,
     "rtt": {"min": "0.058", "avg": "0.059", "max": "0.061", "mdev": "0.001"},
     "mace": {...}}

As iputils: "host" is the sender as ping names it ("NAME (ADDR)" unless -n), "time" the
text of the reply line's time=, "seq" and the counts are numbers, rtt figures strings;
"ident" (-v) goes before "ttl"; a reply shorter than the probe has "info": "truncated"
and no time; a send error is {"error": ["sendmsg", "<strerror>"]}; "pipe", "ipg" and
"ewma" join the statistics object where the text shows them; and that object is printed
only when a reply came (iputils prints none otherwise: its JSON keeps no figures then).
The mace fields are named as in --json: rtt_corrected, egress, ingress (ms, null without
kernel data), and the statistics object gets --json's "mace" summary.
Where iputils' JSON mode prints plain text into its output (its " (DUP!)", " (BAD
CHECKSUM!)" and ICMP error words, the -p PATTERN line, -f's dots, -D stamps, -O lines),
which no JSON reader can take, this prints keys instead: "dup", "corrupted",
"different_address" and "wrong_data" (true) on a reply object; {"host", "seq", "error"}
for an ICMP error and {"host", "seq", "info"} for a redirect or source quench; and
nothing for the rest.
"""

from __future__ import annotations

import json
from typing import Any

from mace_tools.model import Measurement, RttStats, RunResult
from mace_tools.output import atlas, text
from mace_tools.output.live import _Sink


def _us3(value_ms: float) -> str:
    """An rtt figure as iputils' JSON prints it: whole µs, as ms with 3 decimals."""
    us = round(value_ms * 1_000_000) // 1000  # (via ns: 0.058 * 1000 is 57.99...)
    return f"{us // 1000}.{us % 1000:03d}"


def rtt_object(s: RttStats) -> dict[str, str]:
    return {"min": _us3(s.min), "avg": _us3(s.avg), "max": _us3(s.max), "mdev": _us3(s.mdev)}


class JsonLinesSink(_Sink):
    """ping -j: an object per reply as it comes, one statistics object at the end."""

    def _emit(self, obj: dict[str, Any]) -> None:
        self._write(json.dumps(obj))

    def reply(self, m: Measurement) -> None:
        if self.quiet:
            return
        obj: dict[str, Any] = {"bytes": m.icmp_bytes, "host": self.name_of(m.src),
                               "seq": m.seq}
        if self.verbose and self.ident is not None:
            obj["ident"] = self.ident
        obj["ttl"] = m.ttl
        if m.truncated:
            obj["info"] = "truncated"
            self._emit(obj)
            return
        obj["time"] = text.format_ms(m.rtt_raw_ns, self.precise)
        record = atlas.reply_record(m)
        for key in ("rtt_corrected", "egress", "ingress"):
            obj[key] = record[key]
        flags = {"dup": m.dup and (self.show_dup or self.verbose), "corrupted": m.corrupted,
                 "different_address": m.other_source, "wrong_data": m.wrong_data is not None}
        obj.update({key: True for key, on in flags.items() if on})
        self._emit(obj)

    def icmp_error(self, seq: int, src: str, text_: str) -> None:
        if not self.quiet:
            self._emit({"host": self.name_of(src), "seq": seq, "error": text_})

    def icmp_notice(self, seq: int, src: str, text_: str) -> None:
        if not self.quiet and not self.flood:
            self._emit({"host": self.name_of(src), "seq": seq, "info": text_})

    def send_error(self, seq: int, text_: str) -> None:
        """As iputils' construct_json_error: the call and the system's words."""
        if not self.quiet:
            call, _, why = text_.partition(": ")
            self._emit({"error": [call, why] if why else text_})

    def finish(self, result: RunResult) -> None:
        s = self._summary(result)
        if s.rtt_raw is None:
            return  # as iputils: no reply, no statistics object
        loss = int((s.transmitted - s.received) * 100.0 / s.transmitted) if s.transmitted \
            else 0
        obj: dict[str, Any] = {
            "host": self.dst_name, "transmitted": s.transmitted, "received": s.received,
            "duplicates": s.duplicates, "corrupted": s.corrupted, "errors": s.errors,
            "loss": loss, "time": s.elapsed_ms, "rtt": rtt_object(s.rtt_raw)}
        if s.pipe > 1:
            obj["pipe"] = s.pipe
        if s.ipg_ewma_us is not None and s.transmitted > 1:
            ipg, ewma8 = s.ipg_ewma_us
            obj["ipg"] = f"{ipg // 1000}.{ipg % 1000:03d}"
            obj["ewma"] = f"{ewma8 // 8000}.{(ewma8 // 8) % 1000:03d}"
        obj["mace"] = atlas.mace_summary(s, result.nonce, result.source)
        self._emit(obj)
