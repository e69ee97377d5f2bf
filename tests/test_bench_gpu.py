"""``bench/gpu.py``, the single-GPU bench, on the CPU with its tiny setting: what a session with a GPU will run.

The figures themselves are for a GPU; here the bench must run end to end
and compare like with like: the hand-written loop with and without its
per-step ``.item()`` trains the same weights, and on the CPU the aevb row is
its own CPU reference.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def gpu_bench():
    sys.path.insert(0, str(BENCH))
    try:
        import gpu

        yield gpu
    finally:
        sys.path.remove(str(BENCH))


def test_the_gpu_bench_runs_on_the_cpu_and_compares_like_with_like(gpu_bench, tmp_path, capsys):
    out = tmp_path / "gpu.json"
    result = gpu_bench.main(["--device", "cpu", "--tiny", "--variants", "aevb,plain,plain no-item", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"aevb", "plain", "plain no-item"}
    for r in rows.values():
        assert "error" not in r, r
        assert r["steps"] == 6 and r["batch_size"] == 64
        assert math.isclose(r["images_per_s"] * r["ms_per_step"] / 1e3, 64)
        assert r["host_syncs_per_step"] is None  # counted on CUDA only
        assert math.isfinite(r["test_neg_elbo"]) and r["test_neg_elbo"] > 0
    # the per-step .item() reads the loss and changes nothing else
    assert rows["plain"]["test_neg_elbo"] == rows["plain no-item"]["test_neg_elbo"]
    assert result["cpu_reference"]["test_neg_elbo"] == rows["aevb"]["test_neg_elbo"]
    assert rows["aevb"]["loss"] == "fused" and rows["aevb"]["multiplies"] == "fp32"
    capsys.readouterr()
    gpu_bench.main(["--report", str(out)])
    printed = capsys.readouterr().out
    assert all(name in printed for name in rows) and "+0.00" in printed  # aevb against itself, the CPU reference


def test_the_gpu_bench_refuses_an_unknown_variant(gpu_bench, tmp_path):
    with pytest.raises(SystemExit):
        gpu_bench.main(["--device", "cpu", "--tiny", "--variants", "aevb,fastest", "--out", str(tmp_path / "x.json")])


def test_a_variant_that_fails_is_a_row_that_says_why_and_the_others_run(gpu_bench, tmp_path, monkeypatch):
    def refused(steps):
        raise RuntimeError("CUDA graphs refused this step\nsecond line")

    monkeypatch.setitem(gpu_bench.VARIANTS, "broken", lambda device, args: (refused, lambda: 0.0, {}))
    result = gpu_bench.main(["--device", "cpu", "--tiny", "--variants", "broken,plain no-item",
                             "--out", str(tmp_path / "gpu.json")])
    broken, plain = result["rows"]
    assert broken == {"variant": "broken", "device": "cpu", "error": "RuntimeError: CUDA graphs refused this step"}
    assert "error" not in plain and plain["images_per_s"] > 0
