"""The benchmark scripts run (at a tiny size); their speed targets live in benchmarks/README.md, not here."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_overhead_script_runs(tmp_path):
    out = tmp_path / "overhead.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--presets", "toy2d", "--iters", "3", "--warmup", "1",
           "--sample-batch", "64", "--breakdown", "2", "--set", "pairs.num_pairs=256", "--set", "train.batch_size=64",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "SCOREDISTILL_CACHE": str(tmp_path / "cache")},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {"machine", "torch", "load_average_before", "malloc", "presets"} <= result.keys()
    toy = result["presets"]["toy2d"]
    for what in ("train", "sample", "generate"):
        m = toy[what]
        for key in ("framework_ms", "bare_ms", "ratio", "ratio_paired"):
            assert _positive_finite(m[key]), (what, key, m[key])
        assert m["iters"] == 3
    # the hand-written loop computes what the framework computes (one iteration from the same weights and seed)
    check = toy["check"]
    assert check["generator_loss_rel_diff"] < 1e-4 and check["fake_score_loss_rel_diff"] < 1e-4, check
    assert all(math.isfinite(v) for v in check.values()), check
    assert _positive_finite(toy["breakdown"]["train_iteration_us"]) and toy["breakdown"]["pieces_us"]
    assert "toy2d    train" in proc.stdout
