"""``bench/distributed.py``'s arithmetic: what its table says follows from the blocks its runs timed.

The runs themselves (torchrun, gloo) are for an idle machine: ``python
bench/distributed.py --rounds 1 --blocks 1 --steps 3`` checks that they work.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "distributed.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_distributed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(processes: int, sync: list[float], no_sync: list[float] | None = None, alone: float | None = None) -> dict:
    seconds = {"sync": sync, **({"no_sync": no_sync} if no_sync else {})}
    return {"data": "t10k-images-idx3-ubyte.gz", "data_shape": [1, 28, 28], "train_examples": 8000,
            "precision": "fp32", "loss": "fused", "gradient_elements": 652824, "processes": processes,
            "seconds": seconds, "allreduce_alone_ms": alone}


def test_efficiency_and_the_all_reduce_share_follow_from_the_blocks(bench):
    # batch 128, blocks of 10 steps: 1 process 2.0 s a block (median of two runs' blocks), 2 processes 1.0 s with
    # the gradient sync and 0.75 s without it
    runs = {"one": [_run(1, [1.0, 3.0]), _run(1, [2.0])],
            "many": [_run(2, [1.0, 0.9], [0.75, 0.7], alone=3.0), _run(2, [1.1], [0.8], alone=5.0)]}
    entry = bench.compare(runs, {}, batch_size=128, steps=10)
    one, many = entry["one"], entry["many"]
    assert one["images_per_s_sync"] == pytest.approx(128 * 10 / 2.0) and one["ms_per_step_sync"] == pytest.approx(200)
    assert "allreduce_share" not in one and one["blocks"] == 3
    assert many["images_per_s_sync"] == pytest.approx(1280) and many["images_per_s_no_sync"] == pytest.approx(1280 / 0.75)
    assert many["allreduce_share"] == pytest.approx(0.25)  # 1 − 75 ms / 100 ms
    assert many["allreduce_alone_ms"] == pytest.approx(4.0)  # median over the runs
    assert entry["efficiency"] == pytest.approx(2.0)
    printed = bench.table({"processes": 2, "cores": 2, "batch_size": 128, "archs": {"mlp": entry}})
    assert "2.00×" in printed and "25.0%" in printed and "4.000 ms" in printed and "1 process × 2 threads" in printed


def test_a_setup_that_failed_is_said_and_no_efficiency_is_made_up(bench):
    runs = {"one": [_run(1, [2.0])], "many": []}
    entry = bench.compare(runs, {"many": "exit 1: port taken"}, batch_size=128, steps=10)
    assert "efficiency" not in entry and entry["many"] == {"error": "exit 1: port taken"}
    assert "error: exit 1: port taken" in bench.table({"processes": 2, "cores": 2, "batch_size": 128,
                                                      "archs": {"mlp": entry}})
