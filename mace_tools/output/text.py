"""iputils-compatible text, with the mace fields appended.

Parsers of ping output (jc, many scripts) find reply fields by token position, so every
iputils token stays where iputils puts it and the mace fields come after ``time=X ms``:

    64 bytes from 198.18.0.2: icmp_seq=1 ttl=63 time=0.061 ms corrected=0.003 ms \
        egress=0.016 ms ingress=0.004 ms
    64 bytes from 198.18.0.2: icmp_seq=2 ttl=63 time=0.058 ms corrected=none
(one line each; wrapped here).

``corrected=none``: the reply's kernel data was incomplete; the raw time stands alone.
After iputils' own summary lines come two mace lines, which no ping parser mistakes for
the ``rtt`` line:

    mace corrected min/avg/max/mdev = 0.003/0.004/0.005/0.001 ms
    mace overhead egress/ingress avg = 0.016/0.004 ms, kernel data 10/10 replies (100%), \
        0 events lost
"""

from __future__ import annotations

from mace_tools.model import Measurement, RttStats, RunSummary
from mace_tools.stats import NS_PER_US, Tally


def format_ms(ns: int) -> str:
    """A duration in iputils' per-reply tiers: it rounds to microseconds, then prints
    0, 1, 2 or 3 decimals of milliseconds for >= 100, >= 10, >= 1 and < 1 ms."""
    us = (ns + NS_PER_US // 2) // NS_PER_US if ns >= 0 else -((-ns + 500) // NS_PER_US)
    sign, us = ("-", -us) if us < 0 else ("", us)
    if us >= 100_000 - 50:
        return f"{sign}{(us + 500) // 1000}"
    if us >= 10_000 - 5:
        return f"{sign}{(us + 50) // 1000}.{((us + 50) % 1000) // 100:01d}"
    if us >= 1000:
        return f"{sign}{(us + 5) // 1000}.{((us + 5) % 1000) // 10:02d}"
    return f"{sign}{us // 1000}.{us % 1000:03d}"


def header(dst_name: str, dst_addr: str, size: int, source: str | None = None,
           interface: str | None = None) -> str:
    via = f" from {source} {interface}:" if interface else ""
    if ":" in dst_addr:  # IPv6: iputils counts only the payload
        return f"PING {dst_name} ({dst_addr}){via} {size} data bytes"
    return f"PING {dst_name} ({dst_addr}){via} {size}({size + 28}) bytes of data."


def mace_fields(m: Measurement) -> str:
    if m.rtt_corrected_ns is None or m.egress_ns is None:
        return "corrected=none"
    ingress = "none" if m.ingress_ns is None else f"{format_ms(m.ingress_ns)} ms"
    return (f"corrected={format_ms(m.rtt_corrected_ns)} ms egress={format_ms(m.egress_ns)} ms "
            f"ingress={ingress}")


def reply_line(m: Measurement, timestamps: bool = False) -> str:
    stamp = f"[{m.recv_real_ns // 1000 / 1e6:.6f}] " if timestamps else ""
    dup = " (DUP!)" if m.dup else ""
    return (f"{stamp}{m.icmp_bytes} bytes from {m.src}: icmp_seq={m.seq} ttl={m.ttl} "
            f"time={format_ms(m.rtt_raw_ns)} ms{dup} {mace_fields(m)}")


def error_line(seq: int, src: str, text: str) -> str:
    return f"From {src} icmp_seq={seq} {text}"


def no_answer_line(seq: int) -> str:
    return f"no answer yet for icmp_seq={seq}"


def _triple(s: RttStats) -> str:
    return f"{s.min:.3f}/{s.avg:.3f}/{s.max:.3f}/{s.mdev:.3f}"


def summary(dst_name: str, s: RunSummary, kernel: bool = True, source: str = "local") -> str:
    counts = f"{s.transmitted} packets transmitted, {s.received} received"
    if s.duplicates:
        counts += f", +{s.duplicates} duplicates"
    if s.errors:
        counts += f", +{s.errors} errors"
    if s.transmitted:
        counts += f", {s.loss_percent:g}% packet loss, time {s.elapsed_ms}ms"
    lines = ["", f"--- {dst_name} ping statistics ---", counts]
    raw = s.rtt_raw
    if raw is None:
        return "\n".join([*lines, ""])  # iputils ends with a blank line instead
    lines.append(f"rtt min/avg/max/mdev = {_triple(raw)} ms")
    if not kernel:
        lines.append("mace corrected: none (probes smaller than 12 bytes cannot carry the "
                     "nonce and the probe number)")
        return "\n".join(lines)
    if source == "none":
        lines.append("mace corrected: none (no kernel data: no mace-agent, no BPF privilege)")
        return "\n".join(lines)
    corrected = s.rtt_corrected
    n_ok, n = s.corrected_count, raw.n
    coverage = f"kernel data {n_ok}/{n} replies ({100 * n_ok / n:g}%), " \
               f"{s.kernel_events_lost} events lost, {s.kernel_records} kernel records"
    if corrected is None or s.egress_avg_ms is None:
        lines.append(f"mace corrected: none, {coverage}")
        return "\n".join(lines)
    ingress = "none" if s.ingress_avg_ms is None else f"{s.ingress_avg_ms:.3f}"
    lines.append(f"mace corrected min/avg/max/mdev = {_triple(corrected)} ms")
    lines.append(f"mace overhead egress/ingress avg = {s.egress_avg_ms:.3f}/"
                 f"{ingress} ms, {coverage}")
    return "\n".join(lines)


def _us3(us: int) -> str:
    """Whole µs as iputils' status line prints them: ms with 3 decimals, truncated."""
    sign, us = ("-", -us) if us < 0 else ("", us)  # a clock step can make a raw RTT < 0
    return f"{sign}{us // 1000}.{us % 1000:03d}"


def status_line(transmitted: int, tally: Tally) -> str:
    """iputils' SIGQUIT status (on stderr, the run goes on): whole-percent loss, and
    min/avg/ewma/max in truncated µs, ewma as iputils' 1/8-weighted moving average."""
    received = tally.received
    loss = (transmitted - received) * 100 // transmitted if transmitted else 0
    line = f"\r{received}/{transmitted} packets, {loss}% loss"
    raw = tally.raw
    if raw.count:
        avg_us = raw.total // raw.count // NS_PER_US
        line += (f", min/avg/ewma/max = {_us3(raw.min // NS_PER_US)}/{_us3(avg_us)}/"
                 f"{_us3(tally.ewma8_us // 8)}/{_us3(raw.max // NS_PER_US)} ms")
    return line
