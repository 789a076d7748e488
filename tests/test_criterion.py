"""The accuracy criterion (tests/accuracy.py) fails a correction that is 3 µs off, and one
that prints 0, and passes a correct one: shown on the bench's own per-probe errors against
truth v2 (bench/results/results.json, `make bench`: 1,500 probes per load setting)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from accuracy import MEDIAN_HIGH_US, MEDIAN_LOW_US, SHIFT_US, verdict

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "results.json"
SETTINGS = [row for row in json.loads(RESULTS.read_text()).get("accuracy", [])
            if isinstance(row, dict) and row.get("mace_truth_us")]


def test_the_bench_has_truth_v2_errors_to_score() -> None:
    assert len(SETTINGS) >= 4, "bench/results/results.json has no truth v2 accuracy rows"


def test_the_median_band_is_narrower_than_the_shift_it_must_catch() -> None:
    assert MEDIAN_HIGH_US - MEDIAN_LOW_US < SHIFT_US


@pytest.mark.parametrize("row", SETTINGS, ids=[r["setting"] for r in SETTINGS])
def test_correct_passes_shifted_and_zero_fail(row: dict) -> None:
    errors = row["raw_errors"]["mace-ping corrected"]
    assert len(errors) == len(row["mace_truth_us"]) >= 1000
    assert verdict(errors) == []
    for shift in (SHIFT_US, -SHIFT_US, 8.0):
        assert verdict([e + shift for e in errors]), f"blind to a {shift:+} µs shift"
    # a tool that prints corrected=0 for every reply: its error is minus the truth
    assert verdict([-t for t in row["mace_truth_us"]])
    # and the raw RTT is no correction at all
    assert verdict(row["raw_errors"]["mace-ping raw"])
