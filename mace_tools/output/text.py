"""iputils-compatible text, with the mace fields appended.

Parsers of ping output (jc, pingparsing, many scripts) find reply fields by token position,
so every iputils token stays where iputils puts it and the mace fields come right after
``time=X ms``, before iputils' flags ("(DUP!)" and the like), which so end the line as in
iputils (pingparsing only sees a duplicate whose line ends with "(DUP!)"):

    64 bytes from 198.18.0.2: icmp_seq=1 ttl=63 time=0.061 ms corrected=0.003 ms \
        egress=0.016 ms ingress=0.004 ms
    64 bytes from 198.18.0.2: icmp_seq=2 ttl=63 time=0.058 ms corrected=none
    64 bytes from 198.18.0.2: icmp_seq=2 ttl=63 time=0.059 ms corrected=none (DUP!)
(one line each; wrapped here). ``corrected=none``: the reply's kernel data was
incomplete, or refused (a late return stamp: correlate.returned_late, counted in the
summary); the raw time stands alone.

Where the mace summary goes. iputils' statistics block stays whole and last, as iputils
prints it: a blank line, ``--- HOST ping statistics ---``, the counts line, the ``rtt``
line (with ``pipe`` and ``ipg/ewma`` where iputils adds them). The two mace lines come just
before that block, after the replies:

    64 bytes from 198.18.0.2: icmp_seq=3 ttl=63 time=0.059 ms corrected=0.004 ms ...
    mace corrected min/avg/max/mdev = 0.003/0.004/0.005/0.001 ms
    mace overhead egress/ingress avg = 0.016/0.004 ms, kernel data 3/3 replies (100%), \
        0 events lost, 3 kernel records

    --- 198.18.0.2 ping statistics ---
    3 packets transmitted, 3 received, 0% packet loss, time 2003ms
    rtt min/avg/max/mdev = 0.058/0.059/0.061/0.001 ms

Why there: jc decides between its Linux and BSD ping parsers by looking for " time " in the
second or third line from the end, and reads the footer only after the ``---`` line; lines
after the ``rtt`` line pushed the counts line out of its reach (it then read the text as
BSD ping and returned nonsense). pingparsing reads the line right after the counts line as
the ``rtt`` line. Both skip lines before the footer that are not replies, and scripts that
take the last line (``tail -1``) for the rtt figures keep getting them. For a human the
corrected figures sit right above the raw ones they compare with.
"""

from __future__ import annotations

from mace_tools.model import Measurement, RttStats, RunSummary, WrongData
from mace_tools.stats import NS_PER_US, Tally


def format_ms(ns: int, precise: bool = False) -> str:
    """A duration in iputils' per-reply tiers: it rounds to microseconds, then prints
    0, 1, 2 or 3 decimals of milliseconds for >= 100, >= 10, >= 1 and < 1 ms; precise
    (ping -3): always 3 decimals, not rounded."""
    us = (ns + NS_PER_US // 2) // NS_PER_US if ns >= 0 else -((-ns + 500) // NS_PER_US)
    sign, us = ("-", -us) if us < 0 else ("", us)
    if precise:
        return f"{sign}{us // 1000}.{us % 1000:03d}"
    if us >= 100_000 - 50:
        return f"{sign}{(us + 500) // 1000}"
    if us >= 10_000 - 5:
        return f"{sign}{(us + 50) // 1000}.{((us + 50) % 1000) // 100:01d}"
    if us >= 1000:
        return f"{sign}{(us + 5) // 1000}.{((us + 5) % 1000) // 10:02d}"
    return f"{sign}{us // 1000}.{us % 1000:03d}"


def header(dst_name: str, dst_addr: str, size: int, source: str | None = None,
           device: str | None = None, bound: bool = False,
           flowlabel: int | None = None) -> str:
    """iputils' first line; with -I (a device, or an address: bound) or -B it names the
    source address and the device ("from 198.18.1.10 eth0:", "from 198.18.1.10 :").
    IPv6: as iputils 20221126's ping6 (Debian 12's), "PING NAME(ADDR) 56 data bytes",
    with no space before the parenthesis and only the payload counted: the form ping
    parsers (jc, pingparsing) read as IPv6; later iputils added the space."""
    via = f" from {source} {device or ''}:" if device or bound else ""
    if ":" in dst_addr:
        flow = f" , flow 0x{flowlabel:05x}," if flowlabel else ""  # (-F, as ping6 prints it)
        return f"PING {dst_name}({dst_addr}){flow}{via} {size} data bytes"
    return f"PING {dst_name} ({dst_addr}){via} {size}({size + 28}) bytes of data."


def pattern_line(pattern: bytes) -> str:
    """ping -p: iputils prints the pattern before the header (unless -q)."""
    return "PATTERN: 0x" + pattern.hex()


def mace_fields(m: Measurement, precise: bool = False) -> str:
    if m.rtt_corrected_ns is None or m.egress_ns is None:
        return "corrected=none"
    ingress = "none" if m.ingress_ns is None else f"{format_ms(m.ingress_ns, precise)} ms"
    return (f"corrected={format_ms(m.rtt_corrected_ns, precise)} ms "
            f"egress={format_ms(m.egress_ns, precise)} ms ingress={ingress}")


def stamp(real_ns: int) -> str:
    """-D: iputils' [seconds.micros] before a line."""
    return f"[{real_ns // 1000 / 1e6:.6f}] "


def reply_line(m: Measurement, timestamps: bool = False, src: str | None = None,
               ident: int | None = None, precise: bool = False,
               show_dup: bool = True) -> str:
    """iputils' reply line (gather_statistics), mace fields before its flags. src: the
    sender as ping names it ("NAME (ADDR)"; default its address); ident: -v's id;
    show_dup False: a broadcast run's duplicates unmarked, as iputils without -v."""
    line = f"{stamp(m.recv_real_ns) if timestamps else ''}{m.icmp_bytes} bytes from " \
        f"{src or m.src}: icmp_seq={m.seq}"
    if ident is not None:
        line += f" ident={ident}"
    line += f" ttl={m.ttl}"
    if m.truncated:
        return line + " (truncated)"  # iputils stops there: no time, no checks
    line += f" time={format_ms(m.rtt_raw_ns, precise)} ms {mace_fields(m, precise)}"
    line += " (DUP!)" if m.dup and show_dup else ""
    line += " (BAD CHECKSUM!)" if m.corrupted else ""
    line += " (DIFFERENT ADDRESS!)" if m.other_source else ""
    return line + (wrong_data_lines(m.wrong_data) if m.wrong_data else "")


def wrong_data_lines(w: WrongData) -> str:
    """iputils' report of a payload not echoed as sent: the first byte that differs,
    then the payload from the first byte checked, 32 to a row (a row starts where the
    offset modulo 32 is the first byte's)."""
    out = f"\nwrong data byte #{w.index} should be 0x{w.expected:x} but was 0x{w.got:x}"
    for i, byte in enumerate(w.dump, w.start):
        if i % 32 == w.start % 32:
            out += f"\n#{i}\t"
        out += f"{byte:x} "
    return out


def error_line(seq: int, src: str, text: str) -> str:
    return f"From {src} icmp_seq={seq} {text}"


def notice_line(seq: int, src: str, text: str) -> str:
    """A redirect or source quench about a probe (iputils' words: note the colon)."""
    return f"From {src}: icmp_seq={seq} {text}"


def no_answer_line(seq: int) -> str:
    return f"no answer yet for icmp_seq={seq}"


def _triple(s: RttStats) -> str:
    return f"{s.min:.3f}/{s.avg:.3f}/{s.max:.3f}/{s.mdev:.3f}"


def _statistics_tail(s: RunSummary) -> str:
    """iputils' last line: rtt (when any reply came), "pipe N", "ipg/ewma" as it adds
    them; "" when none applies."""
    parts = []
    raw = s.rtt_raw
    if raw is not None:
        parts.append(f"rtt min/avg/max/mdev = {_triple(raw)} ms")
    if s.pipe > 1:
        parts.append(f"pipe {s.pipe}")
    if s.ipg_ewma_us is not None and s.received and s.transmitted > 1:
        ipg, ewma8 = s.ipg_ewma_us
        parts.append(f"ipg/ewma {ipg // 1000}.{ipg % 1000:03d}/{ewma8 // 8000}."
                     f"{(ewma8 // 8) % 1000:03d} ms")
    return ", ".join(parts)


def summary(dst_name: str, s: RunSummary) -> str:
    """iputils' statistics block, from its leading blank line to its last line."""
    counts = f"{s.transmitted} packets transmitted, {s.received} received"
    if s.duplicates:
        counts += f", +{s.duplicates} duplicates"
    if s.corrupted:
        counts += f", +{s.corrupted} corrupted"
    if s.errors:
        counts += f", +{s.errors} errors"
    if s.transmitted:
        counts += f", {s.loss_percent:g}% packet loss, time {s.elapsed_ms}ms"
    # (nothing received: iputils ends with a blank line where the rtt line would be)
    return "\n".join(["", f"--- {dst_name} ping statistics ---", counts, _statistics_tail(s)])


def mace_summary(s: RunSummary, kernel: bool = True, source: str = "local") -> list[str]:
    """The mace lines, printed before iputils' statistics block (module docstring)."""
    raw = s.rtt_raw
    if raw is None:
        return []
    if not kernel:
        return ["mace corrected: none (probes smaller than 12 bytes cannot carry the "
                "nonce and the probe number)"]
    if source == "none":
        # (why: the line on stderr, or --corrections none)
        return ["mace corrected: none (no kernel data: measured raw)"]
    corrected = s.rtt_corrected
    n_ok, n = s.corrected_count, raw.n
    late = f"{s.late_kernel_stamps} refused as late, " if s.late_kernel_stamps else ""
    coverage = f"kernel data {n_ok}/{n} replies ({100 * n_ok / n:g}%), {late}" \
               f"{s.kernel_events_lost} events lost, {s.kernel_records} kernel records"
    if corrected is None or s.egress_avg_ms is None:
        return [f"mace corrected: none, {coverage}"]
    ingress = "none" if s.ingress_avg_ms is None else f"{s.ingress_avg_ms:.3f}"
    return [f"mace corrected min/avg/max/mdev = {_triple(corrected)} ms",
            f"mace overhead egress/ingress avg = {s.egress_avg_ms:.3f}/{ingress} ms, "
            f"{coverage}"]


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
