"""A network the run trains: its wrapper, optimiser, lr schedule and its one update step."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from scoredistill.config import TrainConfig
from scoredistill.engine import Engine, Trainable
from scoredistill.errors import UserError
from scoredistill.guard import NonFiniteGuard
from scoredistill.precision import WeightCopies


@dataclass
class Trained:
    """A network the run trains: the wrapper its updates run in (DDP/FSDP or plain), its optimiser and lr schedule."""

    name: str
    wrapper: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Optional[torch.optim.lr_scheduler.LRScheduler]  # None: a constant lr
    params: list[nn.Parameter] = field(default_factory=list)
    copies: Optional[WeightCopies] = None  # its low-precision weight copies (runtime.cast_weights=per_update)
    engine: Optional[Engine] = None  # gradient checks and fp16 loss scaling
    guard: Optional[NonFiniteGuard] = None
    grad_clip: Optional[float] = None  # train.grad_clip

    def __call__(self, objective: Callable[[nn.Module], Any]) -> Any:
        """Run ``objective(network)`` as this network's forward (so DDP/FSDP see the whole update)."""
        if type(self.wrapper) is Trainable:  # one process: no DDP/FSDP around it, and no hooks on it to run
            return objective(self.wrapper.net)
        return self.wrapper(objective)

    def update(self, loss: Tensor, terms: dict[str, Tensor], where: str) -> None:
        """``backward -> unscale -> clip -> step`` of this network on ``loss``, watching for non-finite values.

        The one seam between the loop and the speed machinery: low-precision weight copies
        (``runtime.cast_weights``: their gradients reach the float32 weights before the unscale,
        and they are refreshed after the step), fp16 loss scaling, the gradient check and the fused
        optimiser's on-device skip (its private ``found_inf``). ``terms`` are the update's logged loss
        terms (detached), ``where`` names the update in a non-finite report.
        """
        opt, scaler, copies, net = self.optimizer, self.engine.scaler, self.copies, self
        scaling = scaler.is_enabled()  # fp16 only
        opt.zero_grad(set_to_none=True)
        if copies is not None:
            copies.zero_grad()
        (scaler.scale(loss) if scaling else loss).backward()
        if copies is not None:
            copies.gradients_to_masters()
        if scaling:
            scaler.unscale_(opt)
        gradients = self.engine.check_gradients(net.wrapper, net.params, self.grad_clip, self.guard.watch_gradients)
        skip = self.guard.observe(where, net.name, terms, gradients)
        if skip is not None:
            opt.found_inf = skip  # read by the fused optimiser: it skips the update on the device
        if scaling:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        if skip is not None and hasattr(opt, "found_inf"):
            del opt.found_inf
        if copies is not None:
            copies.refresh()


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Within: no gradient is accumulated into ``module``'s parameters (gradients still flow through it)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def make_optimizer(cfg: TrainConfig, name: str, wrapper: nn.Module, net: nn.Module, lr: float, fused: bool) -> torch.optim.Optimizer:
    """Adam(W) over ``wrapper``'s parameters; submodules named in ``train.module_lr`` get their own group."""
    params = [p for p in wrapper.parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = []
    taken: set[int] = set()
    for key, module_lr in cfg.module_lr.items():
        owner, _, sub = key.partition(".")
        if owner != name:
            continue
        try:
            module = net.get_submodule(sub)
        except AttributeError:
            children = ", ".join(n for n, _ in net.named_children()) or "(none)"
            raise UserError(f"train.module_lr: the {name} has no submodule '{sub}'; its submodules: {children}") from None
        ids = {id(p) for p in module.parameters()}
        groups.append({"params": [p for p in params if id(p) in ids], "lr": module_lr})
        taken |= ids
    rest = [p for p in params if id(p) not in taken]
    groups = ([{"params": rest}] if rest else []) + groups
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    kwargs: dict[str, Any] = {"lr": lr, "betas": cfg.adam_betas, "eps": cfg.adam_eps, "weight_decay": cfg.weight_decay}
    if fused:
        kwargs["fused"] = True
    return cls(groups if len(groups) > 1 else groups[0]["params"], **kwargs)


def lr_schedule(opt: torch.optim.Optimizer, kind: str, steps: int) -> Optional[torch.optim.lr_scheduler.LRScheduler]:
    """Cosine annealing over ``steps``, or None for a constant lr (nothing to step)."""
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    return None
