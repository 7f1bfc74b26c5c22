"""Settings shared by the benchmark suites: one torch thread, machine facts in the JSON."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from bench_common import machine

torch.set_num_threads(1)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--bench-pair-time",
        type=float,
        default=2.0,
        help="seconds of interleaved (bare, raw, hooked) timing per overhead case (default 2)",
    )


@pytest.fixture
def pair_time(request: pytest.FixtureRequest) -> float:
    return float(request.config.getoption("--bench-pair-time"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "quick: the subset run by the short CI mode (-m quick)")


def pytest_benchmark_update_machine_info(
    config: pytest.Config, machine_info: dict[str, Any]
) -> None:
    machine_info["hookfn_bench"] = machine()
