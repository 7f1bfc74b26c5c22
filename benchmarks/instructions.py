"""Instruction counts of the overhead cases, under valgrind's callgrind: the timed suite's
ratios without its noise.

    python benchmarks/instructions.py [--model mlp12] [--calls 50]

Timings on a shared machine move by several percent between runs; the number of
instructions a call executes repeats exactly for a given checkout (an unrelated change, such
as a function moved to another module, still moves the edit ratio by up to 0.05: memory
allocation costs more or fewer instructions as the heap lies). This script runs the
cases of `test_bench_overhead.py` (the same models, inputs and implementations, from
`bench_common`) under callgrind, counting only the calls themselves: a small helper
compiled on the spot switches callgrind's instrumentation on around each case, so neither
the import of torch nor the model's construction is counted. It prints the instructions per
call of each case and the ratios the goals are stated in:

- per captured layer: (hookfn - bare) / (raw hooks - bare), capturing every block;
- per edited layer: the same for ``add(delta)`` on every block;
- fixed cost: ``run_with_hooks(model, x, {})`` - bare, in instructions.

An instruction count is not a time: a cache miss or a mispredicted branch costs more than
an add, and Python's interpreter executes fewer instructions per cycle than torch's C++.
So the timed ratios stay the measure of record (docs/benchmarks.md), and this one tells
whether a change made a call do less work. Needs valgrind and a C compiler (``cc``); takes
about a minute, most of it importing torch under valgrind.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_HELPER = """
#include <valgrind/callgrind.h>
void start(void) { CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; }
void stop(void) { CALLGRIND_STOP_INSTRUMENTATION; }
void dump(const char *label) { CALLGRIND_DUMP_STATS_AT(label); }
"""

CASES = ("bare", "capture_raw", "capture_hookfn", "edit_raw", "edit_hookfn", "fixed")


def _child(helper: str, model: str, calls: int, dynamo: bool) -> None:
    """Run each case under callgrind, with the instrumentation on only around its calls."""
    import torch

    if dynamo:
        import torch._dynamo

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_common import get_bench, implementations

    torch.set_num_threads(1)
    lib = ctypes.CDLL(helper)
    bench = get_bench(model)
    capture = implementations(bench, "capture_blocks")
    edit = implementations(bench, "edit_blocks")
    fns = {
        "bare": capture["bare"],
        "capture_raw": capture["raw"],
        "capture_hookfn": capture["hookfn"],
        "edit_raw": edit["raw"],
        "edit_hookfn": edit["hookfn"],
        "fixed": implementations(bench, "fixed")["hookfn"],
    }
    with torch.no_grad():
        for label, fn in fns.items():
            for _ in range(20):  # warm: kept resolutions, caches of the allocator
                fn()
            lib.start()
            for _ in range(calls):
                fn()
            lib.stop()
            lib.dump(label.encode())


def _counts(folder: Path, calls: int) -> dict[str, float]:
    counts = {}
    for path in folder.glob("cg.out*"):
        text = path.read_text()
        label = re.search(r"Client Request: (\w+)", text)
        total = re.search(r"^totals: (\d+)", text, re.MULTILINE)  # ("summary" reads 0)
        if label and total and label.group(1) in CASES:
            counts[label.group(1)] = int(total.group(1)) / calls
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp12", help="a model of bench_common (mlp12, tiny)")
    parser.add_argument("--calls", type=int, default=50, help="calls counted per case")
    parser.add_argument(
        "--dynamo",
        action="store_true",
        help="import torch._dynamo first, as transformers does: runs then check for compiled code",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child, args.model, args.calls, args.dynamo)
        return 0
    missing = [tool for tool in ("valgrind", "cc") if shutil.which(tool) is None]
    if missing:
        print(f"needs {' and '.join(missing)} on the PATH", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        source, helper = folder / "helper.c", folder / "helper.so"
        source.write_text(_HELPER)
        subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", helper, source], check=True)
        command = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={folder / 'cg.out'}",
            sys.executable,
            __file__,
            f"--child={helper}",
            f"--model={args.model}",
            f"--calls={args.calls}",
            *(["--dynamo"] if args.dynamo else []),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stdout[-2000:], done.stderr[-2000:], file=sys.stderr)
            return 1
        counts = _counts(folder, args.calls)
    if set(counts) != set(CASES):
        print(f"callgrind recorded {sorted(counts)}, expected {list(CASES)}", file=sys.stderr)
        return 1
    bare = counts["bare"]
    loaded = ", torch._dynamo loaded" if args.dynamo else ""
    print(f"instructions per call, {args.model}{loaded} ({args.calls} calls each):")
    for label in CASES:
        print(f"  {label:16} {counts[label] / 1000:10.1f} k")
    capture = (counts["capture_hookfn"] - bare) / (counts["capture_raw"] - bare)
    edit = (counts["edit_hookfn"] - bare) / (counts["edit_raw"] - bare)
    print(f"per captured layer: {capture:.3f}x raw hooks (goal 1.1)")
    print(f"per edited layer:   {edit:.3f}x raw hooks (goal 1.3)")
    print(f"fixed per call:     {(counts['fixed'] - bare) / 1000:.1f} k instructions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
