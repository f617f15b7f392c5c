"""`scoredistill compare`: same footing for every spec, tables over seeds, resumable."""

from __future__ import annotations

import csv
import statistics

import pytest

from scoredistill.cli import main
from scoredistill.compare import parse_spec
from scoredistill.errors import UserError

TINY = ["--preset", "toy2d", "--set", "train.steps=15", "--set", "train.fake_score_warmup_steps=5", "--set", "train.batch_size=64",
        "--set", "pairs.num_pairs=200", "--set", "eval.num_samples=300", "--quiet"]


def test_parse_spec():
    assert parse_spec("dmd").ablations == ()
    spec = parse_spec("dmd:fake_score,regression", extra_ablations=["regression"])
    assert spec.method == "dmd" and spec.ablations == ("fake_score", "regression")
    assert spec.slug == "dmd-no-fake_score-no-regression"
    with pytest.raises(UserError):
        parse_spec(":regression")


def test_compare_tabulates_seeds_and_resumes(tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", "dmd", "dmd:fake_score,regression", "--preset", "toy2d", "--seeds", "2", "--out", str(out), *TINY]
    assert main(args) == 0
    for name in ("comparison.md", "comparison.csv", "comparison.json", "comparison.png", "compare_request.json"):
        assert (out / name).is_file()
    rows = {r["method"]: r for r in csv.DictReader((out / "comparison.csv").open())}
    assert set(rows) == {"dmd", "dmd w/o fake_score, regression", "teacher (heun-18)", "target (exact)"}
    assert rows["dmd"]["seeds"] == "2"
    # the table's mean is the mean of the two runs' own metrics
    import json

    values = [json.loads((out / "dmd" / f"seed{k}" / "metrics.json").read_text())["energy_distance"] for k in range(2)]
    assert float(rows["dmd"]["energy_distance_mean"]) == pytest.approx(statistics.fmean(values), rel=1e-5)
    # same request again: nothing reruns (finished runs are kept as they are)
    stamp = (out / "dmd" / "seed1" / "generator.safetensors").stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "dmd" / "seed1" / "generator.safetensors").stat().st_mtime_ns == stamp
    # a different request into the same folder is refused
    assert main(["compare", "dmd", "--preset", "toy2d", "--seeds", "1", "--out", str(out), *TINY]) == 2
