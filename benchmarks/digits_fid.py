"""The digits FID table: any methods or ablations (default: full DMD and its three ablations), one step each.

    python benchmarks/digits_fid.py [--out runs/digits-fid] [--preset digits] [--specs dmd dmd:regression ...] [--set key=value ...]

Each spec runs as ``scoredistill run METHOD --preset PRESET [--ablate A] --set ...`` (same
teacher, same cached ODE pairs, same evaluation noise); then one Markdown table is
written to ``OUT/table.md`` (and printed) with, per row: FID against the held-out test
split (the documented protocol: 1,500 samples, digits-classifier features), FID
against the whole train split, the ratio to the teacher's FID, class coverage and
training time; plus the teacher (Heun, 35 NFE) and the real train split (the floor).
A finished run folder is reused, so an interrupted table resumes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_SPECS = ["dmd", "dmd:regression", "dmd:distribution_matching", "dmd:fake_score"]
LABELS = {"": "full DMD", "regression": "w/o regression", "distribution_matching": "w/o distribution matching",
          "fake_score": "w/o fake score (SDS-like)"}


def run_spec(spec: str, out: Path, overrides: list[str], preset: str = "digits") -> dict:
    method, _, ablations = spec.partition(":")
    folder = out / spec.replace(":", "-no-").replace(",", "-")
    metrics = folder / "metrics.json"
    if not metrics.is_file():
        cmd = [sys.executable, "-m", "scoredistill.cli", "run", method, "--preset", preset, "--out", str(folder), "--quiet"]
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
    return f"{v:.3f}" if isinstance(v, (int, float)) else "-"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/digits-fid"))
    p.add_argument("--preset", default="digits", help="a preset of the digits FID protocol (digits, digits_flow)")
    p.add_argument("--specs", nargs="+", default=DEFAULT_SPECS)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows, first = [], {}
    for spec in args.specs:
        m = run_spec(spec, args.out, args.overrides, args.preset)
        first = first or m
        method, _, ablation = spec.partition(":")
        label = LABELS[ablation] if method == "dmd" and ablation in LABELS else spec
        rows.append(f"| {label} (1 NFE) | {fmt(m.get('fid'))} | {fmt(m.get('fid_train'))} | {fmt(m.get('fid_ratio_to_teacher'))} "
                    f"| {m.get('classes_present', '-')} / {fmt(m.get('class_coverage'))} | {m.get('train_seconds', '-')} |")
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
