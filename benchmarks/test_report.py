"""The report's arithmetic and its gate, on a hand-made benchmark JSON file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import report

US = 1e-6


def _bench(case: str, impl: str, slot: int, median_us: float, **info: Any) -> dict[str, Any]:
    extra = {"suite": "overhead", "model": "mlp12", "description": "test model", "case": case}
    extra.update(impl=impl, slot=slot, n_layers=12, n_hooked=0 if impl == "bare" else 12)
    extra.update(info)
    return {"extra_info": extra, "stats": {"median": median_us * US, "min": median_us * US}}


def _paired(diff_us: float, se_us: float = 1.0) -> dict[str, float]:
    return {"rounds": 100, "diff_median": diff_us * US, "diff_se": se_us * US, "base_median": 1e-4}


def _results(hookfn_layer_us: float, fixed_us: float) -> dict[str, Any]:
    # Raw hooks cost 10 µs per layer (120 µs for 12 layers) over a 100 µs forward pass.
    return {
        "benchmarks": [
            _bench("bare", "bare", 0, 100.0),
            _bench("capture_blocks", "raw", 0, 220.0, paired=_paired(120.0)),
            _bench(
                "capture_blocks",
                "hookfn",
                0,
                100.0 + 12 * hookfn_layer_us,
                paired=_paired(12 * hookfn_layer_us),
                paired_raw=_paired(120.0),
            ),
            _bench("bare", "bare", 1, 100.0),
            _bench("fixed", "hookfn", 1, 100.0 + fixed_us, paired=_paired(fixed_us)),
            _bench("bare", "bare", 2, 100.0),
        ],
        "machine_info": {},
    }


@pytest.mark.quick
@pytest.mark.parametrize(
    ("hookfn_layer_us", "fixed_us", "status", "ratio"),
    [
        (10.5, 15.0, 0, "1.05x"),  # within the goals
        (14.0, 40.0, 0, "1.40x"),  # slower than the goals, within the gate's limits
        (18.0, 15.0, 1, "1.80x"),  # over the gate's 1.6x raw hooks per layer: it fails
        (12.0, 500.0, 1, "1.20x"),  # a fixed cost of 50 raw-hook layers: the gate fails
    ],
)
def test_gate(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    hookfn_layer_us: float,
    fixed_us: float,
    status: int,
    ratio: str,
) -> None:
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_results(hookfn_layer_us, fixed_us)))
    assert report.main([str(path), "--gate"]) == status
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| mlp12 | capture"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[4] == "10.0 ± 0.1"  # raw µs per hook: 120 µs / 12 layers
    assert cells[5] == f"{hookfn_layer_us:.1f} ± 0.1"
    assert cells[6] == ratio
    fixed = next(line for line in out.splitlines() if line.startswith("| mlp12 | 100.0 µs"))
    assert f"| {fixed_us:.1f} |" in fixed


@pytest.mark.quick
def test_gate_passes_a_ratio_over_the_limit_by_less_than_its_noise(tmp_path: Path) -> None:
    results = _results(18.0, 15.0)  # 1.8x raw hooks: over the 1.6x limit ...
    for bench in results["benchmarks"]:
        info = bench["extra_info"]
        if info["case"] == "capture_blocks":  # ... but the raw side's noise is a third of it
            if info["impl"] == "raw":
                info["paired"] = _paired(120.0, se_us=40.0)
            else:
                info["paired_raw"] = _paired(120.0, se_us=40.0)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    assert report.main([str(path), "--gate"]) == 0


@pytest.mark.quick
def test_write_doc_replaces_only_the_report_section(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(f"intro\n{report.DOC_START}\nold table\n{report.DOC_END}\noutro\n")
    report.write_doc(page, "| new | table |")
    assert page.read_text() == (
        f"intro\n{report.DOC_START}\n\n| new | table |\n\n{report.DOC_END}\noutro\n"
    )


@pytest.mark.quick
@pytest.mark.parametrize(
    ("hookfn_layer_us", "se_us", "measured", "status"),
    [
        (10.5, 1.0, "1.05x ± 0.01", "met"),  # 1.05 clear of 1.1 by far more than 2 se
        (12.0, 1.0, "1.20x ± 0.01", "**missed**"),
        (10.5, 30.0, "1.05x ± 0.25", "n/a (within the noise of the goal)"),
    ],
)
def test_the_layer_goal_is_judged_with_its_uncertainty(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    hookfn_layer_us: float,
    se_us: float,
    measured: str,
    status: str,
) -> None:
    results = _results(hookfn_layer_us, 15.0)
    results["benchmarks"][2]["extra_info"]["paired"]["diff_se"] = se_us * US
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    report.main([str(path)])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| per hooked layer"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1:] == [measured, status]
    # By hand: ratio * sqrt((se / extra)^2 + (se_raw / extra_raw)^2), extra = 12 layers.
    ratio = hookfn_layer_us / 10.0
    se = ratio * ((se_us / (12 * hookfn_layer_us)) ** 2 + (1.0 / 120.0) ** 2) ** 0.5
    assert measured == f"{ratio:.2f}x ± {se:.2f}"


@pytest.mark.quick
@pytest.mark.parametrize(
    ("value", "sigma", "verdict"),
    [
        (10.0, 1.0, "met"),
        (30.0, 1.0, "**missed**"),
        (19.0, 1.0, "n/a (within the noise of the goal)"),
        (13000.0, 5000.0, "n/a (the noise exceeds the goal)"),  # a noisy huge model
    ],
)
def test_verdicts(value: float, sigma: float, verdict: str) -> None:
    assert report._verdict(value, sigma, 20.0) == verdict
