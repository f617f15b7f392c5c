"""Run several methods (or ablations of one) on the same preset and tabulate them.

Every spec runs with the same preset, overrides, teacher, cached ODE pairs and
evaluation seed; only ``seed`` varies (0..K-1). Writes, into the output folder:
one run folder per spec and seed, ``comparison.md`` / ``comparison.csv``
(mean and sample standard deviation over seeds of every scalar metric) and
``comparison.png`` (one panel per spec, first seed).
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from scoredistill.config import resolve
from scoredistill.errors import UserError
from scoredistill.io import write_json, write_text
from scoredistill.plugins import Hooks
from scoredistill.trainer import execute, prepare_run_dir

#: metrics shown first when present (the rest follow in the order reported)
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
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(mean: float, std: float, seeds: int) -> str:
    if math.isnan(mean):
        return "nan"
    return f"{mean:.4g}" + (f" ± {std:.2g}" if seeds > 1 else "")


def compare(hooks: Hooks, specs: Sequence[Spec], preset: str, seeds: int, overrides: Sequence[str], out: Path) -> str:
    """Run every spec for ``seeds`` seeds; write the table and figure; return the Markdown table."""
    configs = {(s, k): resolve(hooks.registry, s.method, preset, list(s.ablations), [*overrides, f"seed={k}"])
               for s in specs for k in range(seeds)}  # validate everything before the first run
    out = prepare_run_dir(out)
    rows: dict[str, list[dict]] = {}
    panels = []
    references: dict[str, list[dict]] = {}
    for (spec, k), config in configs.items():
        result = execute(config, hooks, out / spec.slug / f"seed{k}")
        rows.setdefault(spec.label, []).append(result.metrics)
        for ref in ("teacher", "target"):
            if isinstance(result.metrics.get(ref), dict):
                references.setdefault(f"{ref} ({result.metrics[ref].get('sampler', '')})", []).append(result.metrics[ref])
        if k == 0:
            panels.append((spec.label, result.samples, result.run))
    rows.update({name: runs for name, runs in references.items()})

    keys = [k for k in HEADLINE if any(k in _scalars(m) for r in rows.values() for m in r)]
    keys += sorted({k for r in rows.values() for m in r for k in _scalars(m)} - set(keys))
    table = ["| method | seeds | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 2)]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["method", "seeds", *[f"{k}_{s}" for k in keys for s in ("mean", "std")]])
    for name, runs in rows.items():
        stats = [_summary([_scalars(m).get(k, float("nan")) for m in runs]) for k in keys]
        table.append(f"| {name} | {len(runs)} | " + " | ".join(_fmt(m, s, len(runs)) for m, s in stats) + " |")
        writer.writerow([name, len(runs), *[f"{v:.6g}" for st in stats for v in st]])
    markdown = "\n".join(table) + "\n"
    write_text(out / "comparison.md", f"# {preset}: {', '.join(s.label for s in specs)} ({seeds} seed(s))\n\n" + markdown)
    write_text(out / "comparison.csv", buf.getvalue())
    write_json(out / "comparison.json", rows)
    _figure(panels, out / "comparison.png", preset)
    return markdown


def _figure(panels, path: Path, preset: str) -> None:
    from scoredistill import plots
    from scoredistill.gaussian_mixture import GaussianMixtureTeacher

    teacher = panels[0][2].models.teacher
    if isinstance(teacher, GaussianMixtureTeacher) and teacher.dim == 2:
        plots.scatter_panels(teacher, [(label, samples) for label, samples, _ in panels], path, title=preset)
