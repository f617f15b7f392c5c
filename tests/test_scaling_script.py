"""benchmarks/scaling.py runs end to end at its smallest setting and writes sane JSON (no timing assertions)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scaling.py"


@pytest.mark.slow
def test_scaling_script_runs(tmp_path):
    out = tmp_path / "scaling.json"
    env = dict(os.environ, SCOREDISTILL_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--sizes", "8", "--batches", "2", "--big-batches", "--iters", "1",
                           "--threads", "1", "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "UNet2DModel" in proc.stdout and "block_out_channels" in proc.stdout  # the architecture is printed
    result = json.loads(out.read_text())
    assert result["threads"] == 1 and result["teacher"]["block_out_channels"] == [32, 64, 64]
    (point,) = result["points"]
    assert (point["size"], point["batch"]) == (8, 2)
    for key in ("seconds_per_iteration", "images_per_s", "peak_rss_mib", "baseline_rss_mib", "params", "params_trained"):
        assert math.isfinite(point[key]) and point[key] > 0, (key, point[key])
    assert math.isfinite(point["delta_rss_mib"]) and point["delta_rss_mib"] >= 0
    assert point["peak_rss_mib"] >= point["baseline_rss_mib"]
    assert point["params_trained"] == 2 * point["params"]  # generator and fake score: copies of the teacher
    assert all(math.isfinite(v) for v in point["losses"].values())
