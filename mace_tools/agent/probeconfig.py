"""What mace-agent probes: `--probe [FROM=]TARGET` and `--config FILE` (TOML).

FROM names the network namespace the probe is sent from: `netns:NAME` (ip netns, or a
path), `pid:N` (that process's), `container:NAME` (the container's, through its
runtime), or nothing (the agent's own, the host's). The config file holds the same as a
list, with per-probe intervals:

    interval = 1.0                  # optional: the default for its probes
    [[probe]]
    source = "container:web"        # optional: absent is the host
    target = "example.org"
    interval = 5                    # optional

Everything is checked at start-up, so a typo is one line on stderr, not a probe that
never runs.
"""

from __future__ import annotations

import math
import os
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mace_tools.errors import MaceError

SOURCE_KINDS = ("netns", "pid", "container")
HOST = "host"  # the source label of a probe sent from the agent's own netns
MIN_INTERVAL_S = 0.01  # iputils' floor for root (pacing.py)
MAX_INTERVAL_S = 3600.0
MAX_PROBES = 400  # each holds one of the program set's run slots (MAX_RUNS 512)
MAX_CONFIG_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class ProbeSpec:
    source_kind: str | None  # None: the host netns
    source_name: str  # the netns name or path, the pid, the container name; "" for host
    target: str
    interval_s: float

    @property
    def source(self) -> str:
        """The source as its metrics label shows it: as written, or "host"."""
        return HOST if self.source_kind is None else f"{self.source_kind}:{self.source_name}"


def interval(value: object, where: str) -> float:
    """A probe interval in seconds, finite and within bounds."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MaceError(f"{where}: the interval must be a number of seconds")
    seconds = float(value)
    if not math.isfinite(seconds) or not MIN_INTERVAL_S <= seconds <= MAX_INTERVAL_S:
        raise MaceError(f"{where}: bad interval {value!r} (from {MIN_INTERVAL_S} to "
                        f"{MAX_INTERVAL_S:g} seconds)")
    return seconds


def _utf8(text: str, where: str) -> None:
    """Labels are UTF-8 text: bytes that are not (argv's surrogates) are refused here, not
    at every scrape."""
    try:
        text.encode()
    except UnicodeEncodeError:
        raise MaceError(f"{where}: not UTF-8 text") from None


def source(text: str, where: str) -> tuple[str | None, str]:
    """(kind, name) of a FROM; ("", "") is never returned: the host is (None, "")."""
    _utf8(text, where)
    if text in ("", HOST):
        return None, ""
    kind, sep, name = text.partition(":")
    if not sep or kind not in SOURCE_KINDS or not name:
        raise MaceError(f"{where}: bad source {text!r} (netns:NAME, pid:N, container:NAME "
                        "or nothing for the host)")
    if kind == "pid" and not (name.isascii() and name.isdigit() and 0 < int(name) < 2**22):
        raise MaceError(f"{where}: bad pid {name!r}")
    if any(c in name for c in "\0\n"):
        raise MaceError(f"{where}: bad source {text!r}")
    return kind, name


def target(text: str, where: str) -> str:
    _utf8(text, where)
    if not text or len(text) > 253 or any(c.isspace() or c in "\0=" for c in text):
        raise MaceError(f"{where}: bad target {text!r}")
    return text


def parse_probe(text: str, interval_s: float) -> ProbeSpec:
    """One --probe [FROM=]TARGET (a target never holds '=': the last one splits)."""
    where = f"--probe {text!r}"
    from_text, _, target_text = text.rpartition("=")
    kind, name = source(from_text, where)
    return ProbeSpec(kind, name, target(target_text, where), interval_s)


def load_config(path: Path, default_interval_s: float) -> list[ProbeSpec]:
    """The probes of a TOML file (its own `interval` overrides default_interval_s)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would hang the start
            raise MaceError(f"{path}: not a regular file")
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise MaceError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes")
        data = tomllib.loads(raw.decode())
    except OSError as exc:
        raise MaceError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise MaceError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise MaceError(f"{path}: {exc}") from None
    except RecursionError:  # tomllib recurses per nesting level
        raise MaceError(f"{path}: nested too deeply") from None
    _only(data, {"interval", "probe"}, str(path))
    every = interval(data["interval"], f"{path}: interval") if "interval" in data \
        else default_interval_s
    entries = data.get("probe", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise MaceError(f"{path}: probes are [[probe]] tables")
    return [_entry(e, every, f"{path}: probe {i}") for i, e in enumerate(entries, 1)]


def _entry(entry: dict[str, Any], every: float, where: str) -> ProbeSpec:
    _only(entry, {"source", "target", "interval"}, where)
    if not isinstance(entry.get("target"), str):
        raise MaceError(f"{where}: needs a target (a string)")
    from_text = entry.get("source", "")
    if not isinstance(from_text, str):
        raise MaceError(f"{where}: the source must be a string")
    kind, name = source(from_text, where)
    seconds = interval(entry["interval"], where) if "interval" in entry else every
    return ProbeSpec(kind, name, target(entry["target"], where), seconds)


def _only(table: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise MaceError(f"{where}: unknown key {unknown[0]!r}")


def checked(specs: list[ProbeSpec]) -> list[ProbeSpec]:
    """All probes, each (source, target) once, within MAX_PROBES."""
    seen: set[tuple[str, str]] = set()
    for spec in specs:
        key = (spec.source, spec.target)
        if key in seen:
            raise MaceError(f"probe {spec.target} from {spec.source} is given twice")
        seen.add(key)
    if len(specs) > MAX_PROBES:
        raise MaceError(f"too many probes ({len(specs)}; at most {MAX_PROBES})")
    return specs
