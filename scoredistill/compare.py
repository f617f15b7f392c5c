"""Run several methods (or ablations of one) on the same preset and tabulate them.

Every spec runs with the same preset, overrides, teacher, cached ODE pairs and
evaluation seed; only ``seed`` varies (0..K-1). Writes, into the output folder:
``compare_request.json`` (what was asked, so that the same command resumes),
one run folder per spec and seed, ``comparison.md`` / ``comparison.csv``
(mean and sample standard deviation over seeds of every scalar metric) and
``comparison.png`` (one panel per spec, first seed).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from scoredistill.config import resolve
from scoredistill.errors import UserError
from scoredistill.io import write_json, write_text
from scoredistill.plugins import Hooks
from scoredistill.run_dir import METRICS_FILE, load_run, prepare_run_dir
from scoredistill.runner import execute
from scoredistill.samples import generate

#: metrics shown first when present (the rest follow in the order reported)
REQUEST_FILE = "compare_request.json"
HEADLINE = ("mode_coverage", "max_mass_error", "within_3std", "energy_distance", "train_seconds")


@dataclass(frozen=True)
class Spec:
    method: str
    ablations: tuple[str, ...] = field(default_factory=tuple)

    @property
    def label(self) -> str:
        return self.method + ("" if not self.ablations else " w/o " + ", ".join(self.ablations))

    @property
    def slug(self) -> str:
        return self.method + "".join(f"-no-{a}" for a in self.ablations)


def parse_spec(text: str, extra_ablations: Sequence[str] = ()) -> Spec:
    """``dmd`` or ``dmd:fake_score,regression`` (plus ``--ablate`` applied to every spec)."""
    method, _, rest = text.partition(":")
    if not method:
        raise UserError(f"bad spec '{text}': expected METHOD or METHOD:ABLATION[,ABLATION...]")
    ablations = [a for a in rest.split(",") if a] + list(extra_ablations)
    return Spec(method, tuple(dict.fromkeys(ablations)))


def _scalars(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _summary(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values (NaN where a run lacks the metric)."""
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _fmt(mean: float, std: float, seeds: int) -> str:
    if math.isnan(mean):
        return "nan"
    return f"{mean:.4g}" + (f" ± {std:.2g}" if seeds > 1 else "")


def compare(hooks: Hooks, specs: Sequence[Spec], preset: str, seeds: int, overrides: Sequence[str], out: Path) -> str:
    """Run every spec for ``seeds`` seeds; write the table and figure; return the Markdown table.

    Rerunning the same comparison into the same folder resumes it: finished runs
    (those with ``metrics.json``) are kept, an unfinished one is set aside.
    """
    configs = {(s, k): resolve(hooks.registry, s.method, preset, list(s.ablations), [*overrides, f"seed={k}"])
               for s in specs for k in range(seeds)}  # validate everything before the first run
    request = {"preset": preset, "specs": [s.label for s in specs], "seeds": seeds, "overrides": list(overrides)}
    out = _prepare(Path(out), request)
    for (spec, k), config in configs.items():
        run_dir = out / spec.slug / f"seed{k}"
        if (run_dir / METRICS_FILE).is_file():
            continue
        if run_dir.exists():
            run_dir.rename(run_dir.with_name(f"{run_dir.name}.interrupted-{time.strftime('%Y%m%d-%H%M%S')}"))
        execute(config, hooks, run_dir)
    return summarise(hooks, out, specs, seeds, preset)


def _prepare(out: Path, request: dict) -> Path:
    marker = out / REQUEST_FILE
    if marker.is_file():
        if json.loads(marker.read_text()) != request:
            raise UserError(f"'{out}' holds a different comparison ({marker.name} differs); choose another --out")
        return out
    out = prepare_run_dir(out)
    write_json(marker, request)
    return out


def summarise(hooks: Hooks, out: Path, specs: Sequence[Spec], seeds: int, preset: str) -> str:
    """Tables (Markdown, CSV, JSON) and the side-by-side figure from the finished run folders."""
    rows: dict[str, list[dict]] = {}
    references: dict[str, list[dict]] = {}
    for spec in specs:
        for k in range(seeds):
            metrics = json.loads((out / spec.slug / f"seed{k}" / METRICS_FILE).read_text())
            rows.setdefault(spec.label, []).append(metrics)
            for ref in ("teacher", "target"):  # the same for every run (fixed evaluation seed): shown once
                if isinstance(metrics.get(ref), dict) and metrics[ref] not in references.setdefault(ref, []):
                    references[ref].append(metrics[ref])
    rows.update({f"{ref} ({runs[0].get('sampler', '')})": runs for ref, runs in references.items() if runs})

    keys = [k for k in HEADLINE if any(k in _scalars(m) for r in rows.values() for m in r)]
    keys += sorted({k for r in rows.values() for m in r for k in _scalars(m)} - set(keys))
    table = ["| method | seeds | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 2)]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["method", "seeds", *[f"{k}_{s}" for k in keys for s in ("mean", "std")]])
    for name, runs in rows.items():
        stats = [_summary([_scalars(m).get(k, math.nan) for m in runs]) for k in keys]
        table.append(f"| {name} | {len(runs)} | " + " | ".join(_fmt(m, s, len(runs)) for m, s in stats) + " |")
        writer.writerow([name, len(runs), *[f"{v:.6g}" for st in stats for v in st]])
    markdown = "\n".join(table) + "\n"
    write_text(out / "comparison.md", f"# {preset}: {', '.join(s.label for s in specs)} ({seeds} seed(s))\n\n" + markdown)
    write_text(out / "comparison.csv", buf.getvalue())
    write_json(out / "comparison.json", rows)
    panels = []
    for spec in specs:
        run = load_run(out / spec.slug / "seed0", hooks)
        panels.append((spec.label, generate(run, run.config.eval.num_samples, run.config.eval.seed), run))
    hooks.draw_samples(teacher=panels[0][2].models.teacher, panels=[(label, samples) for label, samples, _ in panels],
                       path=out / "comparison.png", title=preset)
    return markdown
