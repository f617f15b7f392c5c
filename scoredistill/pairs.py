"""Regression pairs from the teacher's deterministic ODE, cached on disk.

DMD (Yin et al. 2024, Sec. 3.3 and Appendix): a dataset of ``(z_ref, y_ref)``
with ``y_ref`` the teacher's probability-flow ODE solution from ``s_max * z_ref``
(the paper uses EDM's Heun sampler, 18 steps on CIFAR-10). The cache key holds
the teacher's fingerprint and every solver setting, so any change recomputes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import torch
from pydantic import BaseModel, ConfigDict, Field

from scoredistill.io import load_tensors, save_tensors
from scoredistill.progress import progress as progress_display
from scoredistill.registry import component
from scoredistill.roles import BuildContext, PairSource, Teacher, seeded_conditions, stable_hash
from scoredistill.sampling import heun_sample, karras_sigmas


@component("ode_pairs", role="pair_source", paper="Yin et al. 2024 (DMD), Sec. 3.3; Karras et al. 2022, Algorithm 1")
class ODEPairs(PairSource):
    """Pairs (z, ODE(z)) from a deterministic Heun solve of the teacher's probability-flow ODE."""

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        num_pairs: int = Field(5000, ge=1, description="number of (z, ODE(z)) pairs stored")
        steps: int = Field(18, ge=2, description="Heun steps (EDM grid); 2*steps-1 teacher evaluations")
        rho: float = Field(7.0, gt=0, description="EDM grid spacing exponent (eq. 5)")
        seed: int = Field(2024, description="seed of the stored noise z_ref")
        batch_size: int = Field(1024, ge=1, description="pairs solved at once")
        cache: bool = Field(True, description="reuse pairs cached on disk under the cache folder, keyed by teacher and settings")

    def __init__(self, config: "ODEPairs.Config", ctx: BuildContext) -> None:
        self.config = config
        teacher = ctx.teacher
        cond = seeded_conditions(teacher, config.num_pairs, config.seed)  # None for an unconditional teacher
        key = stable_hash(teacher.fingerprint(), config.num_pairs, config.steps, config.rho, config.seed,
                          *(["conditions", cond] if cond is not None else []))
        self.path = Path(ctx.cache_dir) / "pairs" / f"ode-{key}.safetensors"
        data = self._cached() if config.cache else None
        if data is not None:
            self.z, self.y = data["z"], data["y"]
        else:
            self.z, self.y = self.solve(teacher, cond, progress=ctx.extra.get("progress", True))
            if config.cache:
                save_tensors(self.path, {"z": self.z, "y": self.y}, {"teacher": teacher.fingerprint()})
        self.z, self.y = self.z.to(ctx.device), self.y.to(ctx.device)
        self.c = cond.to(ctx.device) if cond is not None else None

    def _cached(self) -> Optional[dict[str, torch.Tensor]]:
        """The cached pairs, or None: none yet, or a damaged file (a run killed while another wrote it), which is
        deleted and solved again."""
        if not self.path.exists():
            return None
        try:
            data = load_tensors(self.path)
            if data["z"].shape != (self.config.num_pairs, *data["z"].shape[1:]) or data["y"].shape != data["z"].shape:
                raise ValueError("wrong shapes")
            return data
        except Exception as exc:  # safetensors' own errors, a missing key, wrong shapes
            sys.stderr.write(f"scoredistill: warning: discarding the damaged ODE-pair cache {self.path} "
                             f"({(str(exc).splitlines() or [type(exc).__name__])[0]}); solving the pairs again\n")
            self.path.unlink(missing_ok=True)
            return None

    def solve(self, teacher: Teacher, cond: Optional[torch.Tensor] = None, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, ODE(z))`` for the seeded noise; the ``i``-th pair is solved with ``cond[i]`` when given."""
        c = self.config
        g = torch.Generator().manual_seed(c.seed)
        z = torch.randn((c.num_pairs, *teacher.data_shape), generator=g)
        sigmas = karras_sigmas(c.steps, teacher.sigma_min, teacher.sigma_max, c.rho)
        device = teacher.sigmas.device
        ys = []
        with progress_display(progress, transient=True) as bar:
            task = bar.add_task("ODE pairs (Heun)", total=c.num_pairs)
            for start in range(0, c.num_pairs, c.batch_size):
                zb = z[start : start + c.batch_size].to(device)
                cb = cond[start : start + c.batch_size].to(device) if cond is not None else None
                ys.append(heun_sample(teacher, zb * teacher.sigma_max, sigmas, cb).cpu())
                bar.advance(task, len(zb))
        return z, torch.cat(ys)
