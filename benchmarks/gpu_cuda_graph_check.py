"""``runtime.cuda_graph`` against the eager iteration, on a CUDA machine: the same numbers, bit for bit.

    python benchmarks/gpu_cuda_graph_check.py [--out FILE]      # needs CUDA; about a minute on an H200

CUDA graphs cannot run on a CPU, so the test suite checks only the option's refusals; this
script is the check of the graphs themselves. Each case builds the same run twice, from the
same seed, once eager and once with ``runtime.cuda_graph=true``, and compares every logged
value of every iteration and every trained weight (and the EMA) at the end. A first eager run
against a second eager one shows that the comparison can be exact on this machine (cuDNN's
heuristic algorithm choice, deterministic kernels). The cases:

- every registered method on toy2d, in bf16 (the weight copies) and float32 (timm-style, over the registry);
- ``train.on_nonfinite=skip`` (the guard's count in the graph);
- the diffusers-UNet DMD (attention, EDM preconditioning) in bf16, with the EMA, gradient
  clipping and a cosine lr schedule (the captured step reads the lr from the device);
- a whole :func:`~scoredistill.trainer.train` with logging, periodic samples and checkpoints;
- a weight set to NaN by a plugin after step 6: the non-finite guard (``stop``) names the same update in both.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS: before CUDA starts

import torch

from scoredistill.hookspecs import hookimpl

STEPS = 8


def _resolve(method: str, preset: str, ablations: list[str], overrides: list[str], graph: bool):
    from scoredistill.config import resolve
    from scoredistill.plugins import Hooks

    hooks = Hooks()
    config = resolve(hooks.registry, method, preset, ablations, [
        *overrides, "runtime.device=cuda", "runtime.cudnn_benchmark=false", "runtime.progress=false",
        f"runtime.cuda_graph={str(graph).lower()}"])
    return config, hooks


def _state(run) -> dict[str, torch.Tensor]:
    out = {f"{name}.{k}": v.detach().clone() for name, net in run.trained.items() for k, v in net.wrapper.net.state_dict().items()}
    if run.ema is not None:
        out.update({f"ema.{k}": v.detach().clone() for k, v in run.ema.state_dict().items()})
    return out


def iterations(case: tuple, graph: bool, folder: Path) -> tuple[list[dict], dict]:
    """``STEPS`` iterations of a fresh run: every iteration's logs (copied) and the final weights."""
    from scoredistill.trainer import build, setup, train_iteration

    config, hooks = _resolve(*case, graph)
    run = build(config, hooks, Path(tempfile.mkdtemp(dir=folder)))
    setup(run)
    logs = [{k: v.detach().clone() for k, v in train_iteration(run).items()} for _ in range(STEPS)]
    torch.cuda.synchronize()
    if graph:
        assert run.iteration_graph is not None and run.iteration_graph.graph is not None, "no graph was captured"
    return logs, _state(run)


def _difference(a: tuple[list[dict], dict], b: tuple[list[dict], dict]) -> dict:
    (la, sa), (lb, sb) = a, b
    logs = max((float((x[k].float() - y[k].float()).abs().max()) for x, y in zip(la, lb) for k in x), default=0.0)
    weights = max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)
    equal = all(torch.equal(x[k], y[k]) for x, y in zip(la, lb) for k in x) and all(torch.equal(sa[k], sb[k]) for k in sa)
    return {"equal": equal, "max_log_difference": logs, "max_weight_difference": weights}


def compare(name: str, case: tuple, folder: Path, eager_twice: bool = False) -> dict:
    t0 = time.perf_counter()
    try:
        eager = iterations(case, False, folder)
        row = {"graph_vs_eager": _difference(eager, iterations(case, True, folder))}
        if eager_twice:
            row["eager_vs_eager"] = _difference(eager, iterations(case, False, folder))
    except Exception as exc:  # one case failing must not hide the others
        print(f"  {name:<40} ERROR {type(exc).__name__}: {exc}"[:1500], flush=True)
        return {"error": f"{type(exc).__name__}: {exc}"[:2000], "graph_vs_eager": {"equal": False}}
    row["seconds"] = time.perf_counter() - t0
    print(f"  {name:<40} " + "  ".join(f"{k}: {'EQUAL' if v['equal'] else 'differs'} (logs {v['max_log_difference']:.3g}, "
                                          f"weights {v['max_weight_difference']:.3g})" for k, v in row.items() if k != "seconds"),
          flush=True)
    return row


class Poison:
    """A plugin that sets one of the generator's weights to NaN in place at the end of step ``at`` (a replay reads it)."""

    def __init__(self, at: int) -> None:
        self.at = at

    @hookimpl
    def scoredistill_train_step_end(self, run, step: int, logs: dict) -> None:
        if step == self.at:
            next(run.models.generator.parameters()).data.view(-1)[0] = float("nan")


def whole_train(folder: Path, overrides: list[str], poison_at: Optional[int] = None) -> dict:
    """``train()`` eager and with graphs: the final weights, the history, and a non-finite stop's message."""
    from scoredistill.trainer import TrainingStopped, build, train

    out = {}
    for graph in (False, True):
        config, hooks = _resolve("dmd", "toy2d", [], overrides, graph)
        if poison_at is not None:
            hooks.pm.register(Poison(poison_at))
        run = build(config, hooks, Path(tempfile.mkdtemp(dir=folder)))
        try:
            train(run)
            out[graph] = (_state(run), [{k: v for k, v in r.items() if k != "time"} for r in run.history], None)
        except TrainingStopped as exc:  # its message names the run's own folder
            out[graph] = ({}, [], str(exc).replace(str(run.dir), "RUN"))
    (sa, ha, ea), (sb, hb, eb) = out[False], out[True]
    return {"weights_equal": sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa),
            "history_equal": ha == hb, "history_rows": len(ha), "stopped_eager": ea, "stopped_graph": eb}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/cuda_graph_vs_eager.json"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_cuda_graph_check: no CUDA device here (CUDA graphs need one)")
    torch.backends.cudnn.deterministic = True
    here = Path(__file__).parent
    sys.path.insert(0, str(here))
    from gpu_dmd import TINY_UNET, save_teacher

    from scoredistill.plugins import Hooks

    folder = Path(tempfile.mkdtemp(prefix="cuda_graph_check_"))
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "steps": STEPS, "cases": {}}
    cases = result["cases"]
    toy = ["train.batch_size=64", "pairs.num_pairs=128", "train.fake_score_warmup_steps=0"]
    for precision in ("bf16", "no"):
        for method in sorted(Hooks().registry.methods):
            cases[f"{method} toy2d {precision}"] = compare(
                f"{method} toy2d {precision}", (method, "toy2d", [], [*toy, f"runtime.mixed_precision={precision}"]), folder,
                eager_twice=method == "dmd")
    cases["dmd toy2d bf16 on_nonfinite=skip"] = compare(
        "dmd toy2d bf16 on_nonfinite=skip", ("dmd", "toy2d", [], [*toy, "runtime.mixed_precision=bf16", "train.on_nonfinite=skip"]),
        folder)
    teacher = save_teacher(folder / "teacher", TINY_UNET, 8)
    unet = ["teacher.component=diffusers_unet", f"teacher.path={teacher}", "generator.component=unet_generator",
            "fake_score.component=unet_denoiser", "train.batch_size=16", "train.ema_decay=0.9", "train.grad_clip=1.0",
            "train.lr_schedule=cosine", "train.steps=20", "train.fake_score_warmup_steps=0", "runtime.mixed_precision=bf16"]
    cases["dmd unet bf16 ema clip cosine"] = compare("dmd unet bf16 ema clip cosine", ("dmd", "digits", ["regression"], unet), folder,
                                                     eager_twice=True)
    run = ["train.steps=40", "train.log_every=10", "train.checkpoint_every=20", "train.sample_every=20", "train.lr_schedule=cosine",
           "train.fake_score_warmup_steps=5", *toy[:2]]
    for name, more, poison in (("train() toy2d dmd", [], None),
                               ("train() with a NaN weight after step 6", ["train.log_every=1"], 6)):  # stop: step 7 named
        try:
            row = cases[name] = whole_train(folder, [*run, *more], poison)
        except Exception as exc:
            row = cases[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000], "weights_equal": False}
        print(f"  {name:<40} {row}", flush=True)
    result["all_equal"] = all(r.get("graph_vs_eager", {}).get("equal", True) and r.get("weights_equal", True)
                              and r.get("history_equal", True) and r.get("stopped_eager") == r.get("stopped_graph")
                              for r in cases.values())
    print(f"all equal: {result['all_equal']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
