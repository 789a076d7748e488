"""What a bench script outside `python -m bench` does around its measurement
(bench/hook_floor.py, bench/tcx_stamps.py): refuse without root, run it in a lab of its
own, and write results.json (with the machine and the command) and results.md."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.__main__ import machine
from bench.experiments import NotMeasured
from mace_tools.errors import MaceError
from mace_tools.lab.topology import Lab, LabError


def run(name: str, lab: Callable[[], Lab], measure: Callable[[Lab], list[dict]],
        markdown: Callable[[dict], str], out: Path, **fields: object) -> int:
    """Measure in a fresh lab (the rows go under "rows", beside `fields`); the exit code."""
    if os.geteuid() != 0:
        print(f"{name}: must run as root (BPF, network namespaces)", file=sys.stderr)
        return 2
    started = time.monotonic()
    res: dict = {**machine(), "command": " ".join([f"python -m {name}", *sys.argv[1:]]),
                 **fields}
    try:
        with lab() as up:
            up.warm_up()
            res["rows"] = measure(up)
    except (NotMeasured, MaceError, LabError) as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 1
    res["duration_s"] = time.monotonic() - started
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "results.md").write_text(markdown(res))
    print(markdown(res))
    return 0
