"""The GPU check: the CUDA tests and the GPU benchmarks in one command, with a CPU wiring mode.

Usage, from the repository root (on a CUDA machine with its own ``python3``: no venv, no
install; the checkout is put on the path)::

    make gpu OUT=<dir>
    python3 benchmarks/gpu/gpu_check.py <dir>      # the same, where make is missing

With a CUDA device it runs, in about 5 minutes on an H200 (at most 8):

1. pytest on every test marked ``cuda`` (the test files that use the mark): among them the
   no-host-sync check on GPT-2-small (``tests/test_cuda_sync.py``), ``torch.compile`` on
   CUDA with ``mode="reduce-overhead"`` (``tests/test_cuda_compile.py``), the bf16 / fp16
   tests and accelerate's dispatch across the GPU and the CPU;
2. pytest on the vision, device/dtype and accelerate test files (their CPU tests, under the
   machine's own torch, torchvision and timm);
3. the figures of ``gpu_bench.py``: hook overhead against raw hooks, host syncs per run,
   the batched patching sweep against the hand loop, attribution against the exact sweep,
   and the peak memory of collecting activations, on GPT-2-small in bf16, batch 8 x seq 128.

It writes into ``<dir>``: ``gpu_check.log`` (everything, the pytest output too),
``gpu_check.json`` (the figures, the test counts, the goals), ``pytest-cuda.xml`` and
``pytest-cpu-side.xml`` (JUnit), and prints a short report. Exit status 1 when a test or a
figure's check against the raw hooks fails, else 0 (a goal not met is reported, not failed).

Without a CUDA device (CI) it checks its own wiring in well under 30 s: the ``cuda``
selection runs (every test in it skips), the second is left to ``make unit``, every
figure's function runs on a tiny float32 model on the CPU for a few rounds, and the JSON and
the report are written. It says that no CUDA device was found, and exits 0 unless the
wiring is broken.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the checkout's hookfn, without an install

# The test files whose CPU tests run too (their CUDA tests run in the ``cuda`` selection).
SIDE_FILES = (
    "tests/test_vision.py",
    "tests/test_devices.py",
    "tests/test_edits_precision.py",
    "tests/test_accelerate.py",
)
# Seconds each part may take on a CUDA machine; the whole stays under 8 minutes.
CUDA_TESTS_TIMEOUT_S = 270
SIDE_TESTS_TIMEOUT_S = 90
CPU_TESTS_TIMEOUT_S = 120
TOTAL_BUDGET_S = 450  # the figures take about 90 s in full, 40 s short
SHORT_FIGURES_BELOW_S = 150


class Log:
    """Lines to the terminal and to the log file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: TextIO = path.open("w", encoding="utf-8")

    def say(self, line: str = "") -> None:
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()

    def quiet(self, text: str) -> None:
        """To the log file only."""
        self.file.write(text if text.endswith("\n") else text + "\n")
        self.file.flush()


def cuda_test_files() -> list[str]:
    """The test files that mark a test ``cuda`` (relative to the repository root)."""
    files = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        if "mark.cuda" in path.read_text(encoding="utf-8"):
            files.append(str(path.relative_to(ROOT)))
    return files


def parse_junit(path: Path) -> dict[str, Any]:
    """Counts, and the ids of failed tests, from a pytest JUnit XML file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    failed, outcomes = [], {}
    for case in root.iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(test_id)
        for prop in case.iter("property"):
            if prop.get("name") == "outcome":  # tests/test_cuda_compile.py: hooked or refused
                outcomes[test_id] = prop.get("value", "")
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "passed": passed, "failed_ids": failed, "outcomes": outcomes}


def run_pytest(
    label: str, args: list[str], out: Path, log: Log, timeout_s: float
) -> dict[str, Any]:
    """One pytest run in a subprocess, its output into the log; counts from its JUnit file."""
    junit = out / f"pytest-{label}.xml"
    junit.unlink(missing_ok=True)
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:randomly",
        "-rfEs",
        f"--junitxml={junit}",
        *args,
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    log.quiet(f"\n$ {' '.join(command)}\n")
    start = time.perf_counter()
    result: dict[str, Any] = {"command": " ".join(command[1:])}
    try:
        done = subprocess.run(
            command,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        result["returncode"], output = done.returncode, done.stdout
    except subprocess.TimeoutExpired as expired:
        result["returncode"] = None
        result["timed_out_after_s"] = timeout_s
        partial = expired.stdout or ""
        output = partial.decode(errors="replace") if isinstance(partial, bytes) else partial
    log.quiet(output)
    result["duration_s"] = round(time.perf_counter() - start, 1)
    if junit.exists():
        try:
            result.update(parse_junit(junit))
        except ET.ParseError as error:
            result["junit_error"] = str(error)
    return result


def tests_failed(result: dict[str, Any]) -> bool:
    """A failed, erroring or timed-out run (5: nothing collected, counts as failed too)."""
    return result.get("returncode") != 0 or bool(result.get("failures") or result.get("errors"))


def run_figures(cuda: bool, log: Log, seconds_left: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """(machine, figures); a figure that raised holds ``{"error": ...}``.

    With less than ``SHORT_FIGURES_BELOW_S`` left of the whole run, the figures are timed in
    fewer rounds (``"short": true`` in the JSON).
    """
    try:
        import gpu_bench
    except Exception as error:  # an import error of hookfn itself shows here
        log.quiet(traceback.format_exc())
        return {}, {"import": {"error": f"{type(error).__name__}: {error}"}}
    sizes = gpu_bench.CUDA_SIZES if cuda else gpu_bench.CPU_SIZES
    machine = gpu_bench.machine(sizes)
    if cuda and seconds_left < SHORT_FIGURES_BELOW_S:
        sizes = dataclasses.replace(sizes, pair_time=1.0, min_rounds=10, sweep_rounds=1)
        machine["short"] = True
        log.say(f"  only {seconds_left:.0f} s left: the figures are timed in fewer rounds")
    figures: dict[str, Any] = {}
    try:
        bench = gpu_bench.build(sizes)
    except Exception as error:
        log.quiet(traceback.format_exc())
        return machine, {"build": {"error": f"{type(error).__name__}: {error}"}}
    for name, figure in gpu_bench.FIGURES.items():
        start = time.perf_counter()
        try:
            figures[name] = figure(bench, sizes)
        except Exception as error:
            log.quiet(f"figure {name}:\n{traceback.format_exc()}")
            figures[name] = {"error": f"{type(error).__name__}: {error}"}
        figures[name]["duration_s"] = round(time.perf_counter() - start, 2)
        log.quiet(f"figure {name}: {json.dumps(figures[name], default=str)}")
    return machine, figures


# -- goals and report --------------------------------------------------------------------


def _status(value: float | None, se: float | None, goal: float, *, at_most: bool) -> str:
    """Met, or not met, where the value stands two standard errors past the goal."""
    if value is None:
        return "n/a"
    margin = 2 * (se or 0.0)
    below, above = value + margin <= goal, value - margin >= goal
    if at_most:
        return "met" if below else "not met" if value - margin > goal else "within noise"
    return "met" if above else "not met" if value + margin < goal else "within noise"


def goals(figures: dict[str, Any], cuda: bool) -> list[dict[str, Any]]:
    """The issue's goals, each with what was measured and a status (n/a without CUDA)."""
    rows = []
    syncs = figures.get("host_syncs", {})
    extra = syncs.get("extra")
    rows.append(
        {
            "goal": "0 host synchronizations on the default hook path (beyond the model's own)",
            "measured": "n/a" if extra is None else f"{extra} extra per run",
            "status": "n/a" if extra is None else ("met" if extra == 0 else "not met"),
        }
    )
    for case in ("capture_blocks", "capture_all"):
        figure = figures.get(case, {})
        ratio, se = figure.get("hookfn_over_raw"), figure.get("hookfn_over_raw_se")
        rows.append(
            {
                "goal": f"per hooked module <= 1.05x raw hooks ({figure.get('case', case)})",
                "measured": "n/a" if ratio is None else f"{ratio:.2f}x ± {se:.2f}",
                "status": _status(ratio, se, 1.05, at_most=True),
            }
        )
    speedup = figures.get("patching", {}).get("batched_speedup")
    rows.append(
        {
            "goal": "batched patching sweep >= 2x the hand loop (the CPU goal)",
            "measured": "n/a" if speedup is None else f"{speedup:.1f}x",
            "status": _status(speedup, 0.0, 2.0, at_most=False),
        }
    )
    if not cuda:
        for row in rows:
            row["status"] = "n/a (CPU wiring mode)"
    return rows


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n:.2f} GiB"


def _figure_lines(figures: dict[str, Any]) -> list[str]:
    lines = []
    for name, figure in figures.items():
        if "error" in figure:
            lines.append(f"  {name}: ERROR {figure['error']}")
        elif "skipped" in figure:
            lines.append(f"  {name}: skipped ({figure['skipped']})")
        elif "hooks" in figure:
            ratio = figure["hookfn_over_raw"]
            ratio_text = (
                "n/a" if ratio is None else f"{ratio:.2f}x ± {figure['hookfn_over_raw_se']:.2f}"
            )
            lines.append(
                f"  {figure['case']} ({figure['hooks']} hooks): hookfn "
                f"{figure['hookfn_us_per_hook']:.1f} µs/hook, raw {figure['raw_us_per_hook']:.1f}"
                f" µs/hook: {ratio_text} (bare forward {figure['bare_ms']:.2f} ms, "
                f"{figure['rounds']} rounds)"
            )
        elif name == "host_syncs":
            counts = ", ".join(f"{k} {v}" for k, v in figure["counts"].items())
            lines.append(f"  host syncs per run: {counts}")
        elif name == "patching":
            lines.append(
                f"  patching, {figure['sweep']}: batched {figure['batched_s']:.3f} s, hand loop "
                f"{figure['hand_loop_s']:.3f} s: {figure['batched_speedup']:.1f}x; attribution "
                f"{figure['attribution_s']:.3f} s, "
                f"{figure['attribution_speedup_over_batched']:.1f}x faster than the batched sweep"
            )
        elif name == "memory":
            rows = figure["rows"]
            peaks = ", ".join(f"{impl} {_size(row['peak_bytes'])}" for impl, row in rows.items())
            lines.append(
                f"  memory, collecting {figure['tokens']} tokens of every block: peak {peaks}; "
                f"kept {_size(rows['hookfn']['kept_bytes'])} (theoretical "
                f"{_size(figure['theoretical_bytes'])}); hookfn peak - raw peak "
                f"{_size(figure['hookfn_peak_minus_raw_bytes'])}"
            )
    return lines


def report(results: dict[str, Any]) -> str:
    machine = results.get("machine", {})
    where = (
        f"CUDA: {machine.get('gpu')}"
        if results["cuda"]
        else "no CUDA device found: CPU wiring checks only (tiny float32 model; no GPU figures)"
    )
    lines = [
        f"hookfn GPU check: {where}",
        f"  torch {machine.get('torch')}, transformers {machine.get('transformers')}, "
        f"python {machine.get('python')}; {machine.get('model')}",
        "tests:",
    ]
    for label, run in results["tests"].items():
        if "skipped_run" in run:
            lines.append(f"  {label}: not run ({run['skipped_run']})")
            continue
        counts = (
            f"{run.get('passed', '?')} passed, {run.get('failures', '?')} failed, "
            f"{run.get('errors', '?')} errors, {run.get('skipped', '?')} skipped"
        )
        extra = (
            f"; TIMED OUT after {run['timed_out_after_s']} s" if "timed_out_after_s" in run else ""
        )
        lines.append(
            f"  {label}: {counts} in {run['duration_s']} s (rc {run['returncode']}){extra}"
        )
        lines.extend(f"    FAILED {test}" for test in run.get("failed_ids", [])[:10])
        outcomes = list(run.get("outcomes", {}).values())
        if outcomes:
            refused = sum(o.startswith("refused") for o in outcomes)
            lines.append(
                f"    torch.compile on CUDA: {len(outcomes) - refused} hooked runs right, "
                f"{refused} refused with CompileError"
            )
    lines.append("figures:")
    lines.extend(_figure_lines(results["figures"]))
    lines.append("goals:")
    lines.extend(f"  {g['status']:>13}  {g['goal']}: {g['measured']}" for g in results["goals"])
    lines.append("failures: " + ("; ".join(results["failures"]) if results["failures"] else "none"))
    lines.append(f"took {results['duration_s']:.0f} s; wrote {results['out']}")
    return "\n".join(lines)


def write_json(path: Path, data: dict[str, Any]) -> None:
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    partial.replace(path)


def _git() -> dict[str, Any]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"commit": commit, "dirty": bool(dirty)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for the log, the JSON and the JUnit files")
    parser.add_argument("--cpu", action="store_true", help="the CPU wiring mode, even with CUDA")
    parser.add_argument("--no-tests", action="store_true", help="skip the pytest runs")
    args = parser.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available() and not args.cpu
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "gpu_check.log")
    start = time.perf_counter()
    results: dict[str, Any] = {
        "schema": 1,
        "cuda": cuda,
        "mode": "cuda" if cuda else "cpu wiring",
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git": _git(),
        "out": str(out),
        "tests": {},
        "figures": {},
        "goals": [],
        "failures": [],
    }
    json_path = out / "gpu_check.json"
    if cuda:
        log.say(f"hookfn GPU check on {torch.cuda.get_device_name(0)}; log: {log.path}")
    else:
        log.say("No CUDA device found: running the CPU wiring checks only (exit 0 if they pass).")

    files = cuda_test_files()
    if args.no_tests:
        results["tests"] = {"cuda": {"skipped_run": "--no-tests"}}
    else:
        log.say(f"pytest -m cuda on {len(files)} files ...")
        results["tests"]["cuda"] = run_pytest(
            "cuda",
            [*files, "-m", "cuda"],
            out,
            log,
            CUDA_TESTS_TIMEOUT_S if cuda else CPU_TESTS_TIMEOUT_S,
        )
        write_json(json_path, results)
        if cuda:
            log.say("pytest on the vision, device/dtype and accelerate tests ...")
            results["tests"]["cpu-side"] = run_pytest(
                "cpu-side", [*SIDE_FILES, "-m", "not cuda"], out, log, SIDE_TESTS_TIMEOUT_S
            )
        else:
            missing = [name for name in SIDE_FILES if not (ROOT / name).is_file()]
            results["tests"]["cpu-side"] = {
                "skipped_run": "CPU wiring mode: `make unit` runs these tests"
                + (f"; MISSING {', '.join(missing)}" if missing else ""),
                "returncode": 1 if missing else 0,
            }
        write_json(json_path, results)
        for label, run in results["tests"].items():
            if tests_failed(run):
                results["failures"].append(f"pytest {label} (see the log)")

    log.say("figures ...")
    machine, figures = run_figures(cuda, log, TOTAL_BUDGET_S - (time.perf_counter() - start))
    results["machine"] = machine
    results["figures"] = figures
    results["failures"].extend(
        f"figure {name}: {figure['error']}" for name, figure in figures.items() if "error" in figure
    )
    results["goals"] = goals(figures, cuda)
    results["duration_s"] = round(time.perf_counter() - start, 1)
    write_json(json_path, results)
    log.say()
    log.say(report(results))
    if not cuda:
        log.say("No CUDA device found: the GPU tests and figures are still to be run on one.")
    return 1 if results["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
