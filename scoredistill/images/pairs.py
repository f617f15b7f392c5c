"""ODE pairs for image teachers: safetensors shards, cached, resumable, with a progress bar.

The same pairs as the core's ``ode_pairs`` (DMD Sec. 3.3: ``y_ref`` is the teacher's
deterministic Heun solve from ``s_max * z_ref``; same settings, same seeded noise; a
class-conditional teacher's pairs are solved with seeded labels, ``c``), but written one
shard per solver batch::

    CACHE/pairs/ode-<key>/shard-00000.safetensors   {"z": ..., "y": ...}
    CACHE/pairs/ode-<key>/shard-00001.safetensors
    ...

``key`` hashes the teacher's fingerprint and every solver setting (count, steps, rho,
seed, batch size). Each shard is written atomically, so an interrupted solve resumes at
the first missing shard. Processes that need the same pairs at once (the ranks of a run,
two runs) share the work: each solves the shards whose lock no other holds
(:func:`scoredistill.io.fill_lock`), then reads the others'. The images plugin builds
this source, through the ``scoredistill_make_pair_source`` hook, whenever ``pairs.component`` is ``ode_pairs`` and
the teacher is an image teacher.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from scoredistill.io import fill_lock, load_tensors, save_tensors
from scoredistill.progress import progress
from scoredistill.pairs import ODEPairs
from scoredistill.roles import BuildContext, PairSource, seeded_conditions, stable_hash


class ShardedODEPairs(PairSource):
    """Pairs (z, ODE(z)) of an image teacher, solved batch by batch into resumable shards."""

    def __init__(self, config: ODEPairs.Config, ctx: BuildContext) -> None:
        self.config = c = config
        teacher = ctx.teacher
        cond = seeded_conditions(teacher, c.num_pairs, c.seed)  # class labels of a class-conditional teacher, else None
        key = stable_hash(teacher.fingerprint(), c.num_pairs, c.steps, c.rho, c.seed, c.batch_size,
                          *(["conditions", cond] if cond is not None else []))
        self.folder = Path(ctx.cache_dir) / "pairs" / f"ode-{key}"
        z = torch.randn((c.num_pairs, *teacher.data_shape), generator=torch.Generator().manual_seed(c.seed))
        grid = teacher.sampling_sigmas(c.steps, c.rho)  # the teacher's own grid (EDM eq. 5, or its flow scheduler's)
        starts = list(range(0, c.num_pairs, c.batch_size))
        device = teacher.sigmas.device

        def solve(i: int) -> torch.Tensor:
            part = slice(starts[i], starts[i] + c.batch_size)
            cb = cond[part].to(device) if cond is not None else None
            y = teacher.solve(z[part].to(device), grid, cb).cpu()
            if c.cache:
                save_tensors(self.shard_path(i), {"z": z[part], "y": y}, {"teacher": teacher.fingerprint()})
            return y

        def cached(i: int) -> Optional[torch.Tensor]:
            return self._load_shard(i, z[starts[i] : starts[i] + c.batch_size])

        def cached_or_solved(i: int) -> torch.Tensor:
            y = cached(i)
            return y if y is not None else solve(i)

        ys: list[torch.Tensor] = [torch.empty(0)] * len(starts)
        held_elsewhere: list[int] = []  # shards another process (a rank, a run) is solving: read at the end
        with progress(ctx.extra.get("progress", True), transient=True) as bar:
            task = bar.add_task(f"ODE pairs (Heun {c.steps} steps)", total=c.num_pairs)
            for i in range(len(starts)):
                y = cached(i) if c.cache else solve(i)
                if y is None:
                    with fill_lock(self.shard_path(i), wait=False) as held:
                        y = cached_or_solved(i) if held else None
                    if y is None:
                        held_elsewhere.append(i)
                        continue
                ys[i] = y
                bar.advance(task, len(y))
            for i in held_elsewhere:
                with fill_lock(self.shard_path(i)):
                    ys[i] = cached_or_solved(i)
                bar.advance(task, len(ys[i]))
        self.z, self.y = z.to(device), torch.cat(ys).to(device)
        self.c = cond.to(device) if cond is not None else None

    def shard_path(self, i: int) -> Path:
        return self.folder / f"shard-{i:05d}.safetensors"

    def _load_shard(self, i: int, zb: torch.Tensor):
        path = self.shard_path(i)
        if not path.is_file():
            return None
        try:
            data = load_tensors(path)
        except Exception:  # a damaged shard is solved again
            return None
        if data["z"].shape != zb.shape or not torch.equal(data["z"], zb):
            return None
        return data["y"]
