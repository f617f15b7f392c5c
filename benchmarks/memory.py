"""Memory per teacher parameter of a DMD iteration: full copies against LoRA on one shared base, with and without
gradient checkpointing, and full DMD sharded by FSDP2 over two processes, on an SD-shaped diffusers UNet scaled to a CPU.

    python benchmarks/memory.py [--channels 64 128 256 256] [--size 32] [--batch 2] [--rank auto]
                                [--threads 1] [--configs full full_ckpt lora lora_ckpt fsdp] [--out FILE]

The teacher is a random-weight ``UNet2DConditionModel`` with Stable Diffusion 1.x's layout
(four levels, cross-attention at the first three, two resnets per level, ``--channels`` a
fifth of SD's 320/640/1280/1280 by default: 35 M parameters) and SD's scheduler config
(DDPM, scaled-linear betas, epsilon), saved as a user would. Each configuration runs in a
fresh process through the public API (``dmd --ablate regression``, no EMA), one warm-up
iteration (it creates the gradients and Adam's states), then one measured iteration:

* **state** (exact): every distinct tensor storage the run holds after an iteration, by kind:
  the teacher's (or the shared base's) weights, the trained weights (full copies or
  adapters), their gradients, the optimisers' states; in bytes per teacher parameter;
* **activations** (approximate): the peak resident set during the measured iteration above
  the resident set before it, polled every millisecond from ``/proc/self/statm``, with
  glibc returning every block over 64 KiB to the system on free (``MALLOC_MMAP_THRESHOLD_``);
  per teacher parameter, and in MiB;
* **predicted** state: full float32 DMD with Adam ``3 x 4 + 2 x (4 + 8) = 36`` bytes per parameter;
  LoRA ``b + f x (4 + 4 + 8)`` with ``b`` the base's bytes per weight (2 in bf16) and ``f`` the
  adapters' share of the teacher's parameters (both roles together); FSDP over ``N`` processes
  ``36 / N`` per process (teacher, generator, fake score, gradients and Adam's moments all sharded).

``fsdp`` runs under ``torchrun --nproc_per_node 2`` (gloo; ``runtime.distributed=fsdp``, the teacher
sharded, ``runtime.fsdp_min_params`` = ``--fsdp-min-params``): ``--batch`` in all, half on each process;
its numbers are per process (state: the local shards; activations: the larger of the two peaks above
the resident set before the iteration, the units gathered one at a time included).

``--rank auto`` picks the largest rank whose two adapters hold at most 2% of the teacher.
Prints a table and writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULT_TAG = "MEMORY_RESULT "
PROMPTS = "prompts.safetensors"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "memory.json"
CONFIGS = {  # name: (LoRA, gradient checkpointing)
    "full": (False, False), "full_ckpt": (False, True), "lora": (True, False), "lora_ckpt": (True, True), "fsdp": (False, False)}
PROCESSES = {"fsdp": 2}  # configurations run under torchrun, with this many processes


def save_teacher(folder: Path, channels: list[int], size: int) -> int:
    """SD 1.x's UNet layout and scheduler, scaled: random weights saved in diffusers format. Returns its parameters."""
    import diffusers
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(sample_size=size, in_channels=4, out_channels=4, block_out_channels=tuple(channels),
                                          layers_per_block=2, cross_attention_dim=channels[-1], attention_head_dim=8,
                                          norm_num_groups=32)
    unet.save_pretrained(folder / "unet")
    diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                            num_train_timesteps=1000).save_pretrained(folder / "scheduler")
    # precomputed prompt embeddings (8 prompts of SD's 77 tokens): a text-conditional teacher needs its conditions
    save_file({"embeddings": torch.randn(8, 77, channels[-1]), "null": torch.zeros(77, channels[-1])}, str(folder / PROMPTS))
    return sum(p.numel() for p in unet.parameters())


def auto_rank(folder: Path, share: float = 0.02) -> int:
    """The largest rank whose adapters (generator + fake score) hold at most ``share`` of the teacher's parameters."""
    import diffusers

    from scoredistill.lora import LoraSettings, target_layers

    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")
    total = sum(p.numel() for p in unet.parameters())
    layers = dict(unet.named_modules())
    per_rank = 0
    for name in target_layers(unet, LoraSettings(rank=1), "teacher"):
        m = layers[name]
        if hasattr(m, "in_features"):
            per_rank += m.in_features + m.out_features
        else:
            per_rank += m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels
    return max(1, int(share * total / (2 * per_rank)))


class PeakRSS:
    """The peak resident set of this process while active, polled every millisecond."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self._stop = threading.Event()

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self) -> "PeakRSS":
        self.peak = self.rss()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def state_bytes(run) -> dict[str, int]:
    """Distinct storages of the run's persistent tensors, by kind (a tensor shared by two roles counts once)."""
    models, seen, out = run.models, set(), {"teacher_or_base": 0, "trained_weights": 0, "gradients": 0, "optimizer": 0}

    def add(kind, t):
        if t is None or t.numel() == 0:
            return
        if hasattr(t, "to_local"):  # an FSDP shard (DTensor): this process's part
            t = t.to_local()
        s = t.untyped_storage()
        if s.data_ptr() in seen:
            return
        seen.add(s.data_ptr())
        out[kind] += s.nbytes()

    trained = {id(p) for name in ("generator", "fake_score") for p in getattr(models, name).parameters()}
    for name in ("generator", "fake_score"):
        for p in getattr(models, name).parameters():
            add("trained_weights", p)
            add("gradients", p.grad)
    for p in models.teacher.parameters():
        add("trained_weights" if id(p) in trained else "teacher_or_base", p)
    for t in models.teacher.buffers():
        add("teacher_or_base", t)
    for net in run.trained.values():
        for st in net.optimizer.state.values():
            for v in st.values():
                if hasattr(v, "untyped_storage"):
                    add("optimizer", v)
    return out


def one(args: argparse.Namespace) -> dict:
    """One configuration, in this (fresh) process."""
    import torch

    from scoredistill.config import resolve
    from scoredistill.plugins import Hooks, make_plugin_manager
    from scoredistill.trainer import build, setup, train_iteration

    torch.set_num_threads(args.threads)
    lora, ckpt = CONFIGS[args.one]
    hooks = Hooks(make_plugin_manager())
    overrides = ["teacher.component=diffusers_unet", f"teacher.path={args.teacher}", f"teacher.embeddings={args.teacher / PROMPTS}", "generator.component=unet_generator",
                 "fake_score.component=unet_denoiser", f"train.batch_size={args.batch}", "train.ema_decay=null",
                 "train.fake_score_warmup_steps=0", "train.sample_every=null", "runtime.progress=false",
                 f"runtime.num_threads={args.threads}", f"runtime.gradient_checkpointing={str(ckpt).lower()}"]
    if lora:
        overrides += [f"train.lora.rank={args.rank}", f"teacher.dtype={args.base_dtype}"]
    processes = PROCESSES.get(args.one, 1)
    if processes > 1:
        overrides += ["runtime.distributed=fsdp", f"runtime.fsdp_min_params={args.fsdp_min_params}"]
    config = resolve(hooks.registry, "dmd", "digits", ["regression"], overrides)
    with tempfile.TemporaryDirectory() as tmp:
        run = build(config, hooks, Path(tmp) / "run")
        setup(run)
        teacher_params = sum(p.numel() for n, p in run.models.teacher.named_parameters() if "lora_" not in n)
        adapters = sum(p.numel() for name in ("generator", "fake_score") for p in getattr(run.models, name).parameters()) if lora else 0
        train_iteration(run)  # warm-up: gradients and Adam's states exist from here on
        gc.collect()
        state = state_bytes(run)
        t0 = time.perf_counter()
        with PeakRSS() as peak:
            before = peak.peak
            train_iteration(run)
        seconds = time.perf_counter() - t0
        peaks = run.engine.gather(peak.peak - before)  # per process (one with one process)
        ranks = run.engine.gather(state)
        if processes > 1:
            run.engine.close()
    state = max(ranks, key=lambda st: sum(st.values()))  # the process holding the most (rank 0: shards round up)
    total = sum(state.values())
    predicted = (2 if args.base_dtype in ("bf16", "fp16") else 4) + 16 * adapters / teacher_params if lora else 36.0 / processes
    return {"config": args.one, "lora": lora, "gradient_checkpointing": ckpt, "processes": processes,
            "teacher_params": teacher_params,
            "adapter_params": adapters, "adapter_share": adapters / teacher_params, "rank": args.rank if lora else None,
            "base_dtype": args.base_dtype if lora else "fp32",
            "state_bytes": state, "state_bytes_per_param": total / teacher_params,
            "state_bytes_per_param_by_kind": {k: v / teacher_params for k, v in state.items()},
            "predicted_state_bytes_per_param": predicted,
            "activation_bytes": max(peaks), "activation_bytes_per_param": max(peaks) / teacher_params,
            "activation_bytes_per_process": peaks, "state_bytes_per_process": [sum(st.values()) for st in ranks],
            "iteration_seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--channels", type=int, nargs="+", default=[64, 128, 256, 256])
    p.add_argument("--size", type=int, default=32, help="latent height and width")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rank", default="auto", help="LoRA rank, or 'auto' (adapters at most 2%% of the teacher)")
    p.add_argument("--base-dtype", default="bf16", choices=["fp32", "bf16", "fp16"], help="the shared base's dtype with LoRA")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fsdp-min-params", type=int, default=200_000,
                   help="fsdp: runtime.fsdp_min_params (the smallest submodules of this many parameters become units)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--one", choices=list(CONFIGS), help=argparse.SUPPRESS)
    p.add_argument("--teacher", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        row = one(args)
        if os.environ.get("RANK", "0") == "0":
            print(RESULT_TAG + json.dumps(row), flush=True)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        teacher = Path(tmp) / "teacher"
        params = save_teacher(teacher, args.channels, args.size)
        rank = auto_rank(teacher) if args.rank == "auto" else int(args.rank)
        print(f"teacher: UNet2DConditionModel, {params / 1e6:.1f} M parameters, latents 4x{args.size}x{args.size}, "
              f"batch {args.batch}; LoRA rank {rank} ({args.base_dtype} base)", file=sys.stderr)
        rows = []
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
        for name in args.configs:
            launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(PROCESSES[name])]
                        if name in PROCESSES else [sys.executable])
            cmd = [*launcher, __file__, "--one", name, "--teacher", str(teacher), "--rank", str(rank),
                   "--base-dtype", args.base_dtype, "--batch", str(args.batch), "--threads", str(args.threads),
                   "--fsdp-min-params", str(args.fsdp_min_params)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
            if proc.returncode != 0 or not lines:
                sys.stderr.write(proc.stderr[-3000:])
                return 1
            rows.append(json.loads(lines[0][len(RESULT_TAG):]))
    print("| config | processes | state B/param (predicted) | teacher/base | trained weights | gradients | Adam | activations B/param (MiB) | s/iter |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        k = r["state_bytes_per_param_by_kind"]
        print(f"| {r['config']} | {r.get('processes', 1)} | {r['state_bytes_per_param']:.2f} ({r['predicted_state_bytes_per_param']:.2f}) | "
              f"{k['teacher_or_base']:.2f} | {k['trained_weights']:.2f} | {k['gradients']:.2f} | {k['optimizer']:.2f} | "
              f"{r['activation_bytes_per_param']:.2f} ({r['activation_bytes'] / 2**20:.0f}) | {r['iteration_seconds']:.2f} |")
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d"),
              "torch": __import__("torch").__version__, "threads": args.threads, "channels": args.channels,
              "size": args.size, "batch": args.batch, "rank": rank, "fsdp_min_params": args.fsdp_min_params, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
