"""The digits FID table: any methods or ablations (default: full DMD and its three ablations), one step each.

    python benchmarks/digits_fid.py [--out runs/digits-fid] [--preset digits] [--specs dmd dmd:regression ...]
        [--seeds 3] [--set key=value ...]

Each spec runs as ``scoredistill run METHOD --preset PRESET [--ablate A] --set ...`` (same
teacher, same cached ODE pairs, same evaluation noise); then one Markdown table is
written to ``OUT/table.md`` (and printed) with, per row: FID against the held-out test
split (the documented protocol: 1,500 samples, digits-classifier features), FID
against the whole train split, the ratio to the teacher's FID, class coverage and
training time; plus the teacher (Heun, 35 NFE) and the real train split (the floor).
With ``--seeds N`` each spec trains with seeds 0 .. N-1 (folders ``SPEC``, ``SPEC-seed1``, ...) and
each cell is the mean ± standard deviation over them. A finished run folder is reused, so an
interrupted table resumes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_SPECS = ["dmd", "dmd:regression", "dmd:distribution_matching", "dmd:fake_score"]
LABELS = {"": "full DMD", "regression": "w/o regression", "distribution_matching": "w/o distribution matching",
          "fake_score": "w/o fake score (SDS-like)"}


def run_spec(spec: str, out: Path, overrides: list[str], preset: str = "digits", seed: int = 0) -> dict:
    method, _, ablations = spec.partition(":")
    folder = out / (spec.replace(":", "-no-").replace(",", "-") + (f"-seed{seed}" if seed else ""))
    metrics = folder / "metrics.json"
    if not metrics.is_file():
        cmd = [sys.executable, "-m", "scoredistill.cli", "run", method, "--preset", preset, "--out", str(folder), "--quiet"]
        if seed:
            cmd += ["--set", f"seed={seed}"]
        for a in filter(None, ablations.split(",")):
            cmd += ["--ablate", a]
        for o in overrides:
            cmd += ["--set", o]
        if folder.is_dir():  # an interrupted run: finish it
            cmd = [sys.executable, "-m", "scoredistill.cli", "run", "--resume", str(folder), "--quiet"]
        print("+", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        if subprocess.run(cmd).returncode != 0:
            print(f"  {spec}: failed (its row is left empty)", flush=True)
            return {}
        print(f"  {spec}: {time.perf_counter() - t0:.0f} s wall", flush=True)
    return json.loads(metrics.read_text())


def fmt(v) -> str:
    """One value to three decimals; several (one per seed) as mean ± standard deviation."""
    if isinstance(v, list):
        v = [x for x in v if isinstance(x, (int, float))]
        if len(v) > 1:
            return f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}"
        v = v[0] if v else None
    return f"{v:.3f}" if isinstance(v, (int, float)) else "-"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/digits-fid"))
    p.add_argument("--preset", default="digits", help="a preset of the digits FID protocol (digits, digits_flow)")
    p.add_argument("--specs", nargs="+", default=DEFAULT_SPECS)
    p.add_argument("--seeds", type=int, default=1, help="training seeds 0 .. N-1 per spec; cells are mean ± std")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows, first = [], {}
    for spec in args.specs:
        runs = [run_spec(spec, args.out, args.overrides, args.preset, seed) for seed in range(args.seeds)]
        first = first or next((m for m in runs if m), {})
        col = lambda key: [m.get(key) for m in runs]  # noqa: E731
        method, _, ablation = spec.partition(":")
        label = LABELS[ablation] if method == "dmd" and ablation in LABELS else spec
        rows.append(f"| {label} (1 NFE) | {fmt(col('fid'))} | {fmt(col('fid_train'))} | {fmt(col('fid_ratio_to_teacher'))} "
                    f"| {'/'.join(str(c) for c in col('classes_present'))} / {fmt(col('class_coverage'))} "
                    f"| {fmt(col('train_seconds'))} |")
    t, r = first.get("teacher", {}), first.get("target", {})
    rows.append(f"| teacher ({t.get('sampler')}, {t.get('nfe')} NFE) | {fmt(t.get('fid'))} | {fmt(t.get('fid_train'))} | 1.000 "
                f"| {t.get('classes_present', '-')} / {fmt(t.get('class_coverage'))} | - |")
    rows.append(f"| {r.get('sampler')} (floor) | {fmt(r.get('fid'))} | - | - | {r.get('classes_present', '-')} / "
                f"{fmt(r.get('class_coverage'))} | - |")
    table = "\n".join([
        f"FID with the digits classifier's features ({first.get('num_samples')} samples; reference: held-out test split); "
        f"classifier held-out accuracy {first.get('classifier', {}).get('test_accuracy')}",
        "",
        "| generator | FID (test) | FID (train) | FID / teacher FID | classes present / coverage | train s |",
        "|---|---|---|---|---|---|",
        *rows,
    ]) + "\n"
    (args.out / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
