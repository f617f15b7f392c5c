"""FSDP2 (torch's ``fully_shard``) for ``runtime.distributed: fsdp``: which modules become units, the
mixed-precision policy, the frozen teacher's shards, and the contexts the trainer needs.

Each process keeps ``1/N`` of every sharded parameter (a ``DTensor`` shard, dimension 0). A unit
(a module given to ``fully_shard``) gathers its parameters just before its ``forward`` and frees
them after it (``runtime.fsdp_sharding: full_shard``; ``shard_grad_op`` keeps them until the
backward), and its gradients are reduce-scattered: each process ends with the mean gradient of its
own shard, which its optimiser steps (Adam's moments are sharded the same way).

* **Units** (:func:`units`): the smallest submodules holding at least ``runtime.fsdp_min_params``
  parameters, none inside another (a container without a ``forward``, ``nn.ModuleList``, by its
  members). A process holds its shards plus about one gathered unit at a time; ``null``: none.
* **Trained networks**: the units, then the :class:`~scoredistill.engine.Trainable` as the root (its
  forward runs a whole update, so the parameters outside every unit are gathered for it).
  Another update reads a network outside its root's forward (the fake score inside the
  generator's objective): :func:`gathered` gathers the root's own parameters meanwhile, and
  its units gather theirs as they run, one at a time, as in its own updates.
* **The frozen teacher** (``runtime.fsdp_shard_teacher``): it is called through its own methods
  (``forward``, ``features``, a sampler), never through one root, so every parameter belongs to a
  unit that is its own root: the units above, and outside them each submodule owning parameters
  itself (a layer), with its children. Parameters registered on the teacher module itself stay
  whole. No gradient, no optimiser. The evaluation, on the main process alone, gets it whole
  (:func:`gather_for_good`).
* **Mixed precision**: ``MixedPrecisionPolicy(param_dtype, reduce_dtype=float32)`` with
  ``param_dtype`` from ``runtime.mixed_precision`` (bf16 or fp16, None for 'no'): the gathered
  weights are in that dtype, the sharded masters and the optimiser stay float32, gradients are
  reduced in float32; the EMA averages the float32 shards, gathered (:func:`whole`).
* **Checkpoints** (``Engine.model_state``, ``Engine.optimizer_state``): the full state, gathered by
  ``torch.distributed.checkpoint.state_dict`` (``full_state_dict``) and written by the main process
  into the run's one checkpoint file, as without FSDP; each process loads it back into its own
  shards. A resume is bitwise, and the file fits any number of processes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import nn


def available() -> bool:
    """torch has ``torch.distributed.fsdp.fully_shard`` (2.6 and later)."""
    import torch.distributed.fsdp as fsdp

    return hasattr(fsdp, "fully_shard")


@dataclass
class Settings:
    """What ``fully_shard`` is given, from the run's runtime settings."""

    mesh: Any  # a 1-D DeviceMesh over every process
    mp_policy: Any  # MixedPrecisionPolicy
    reshard_after_forward: bool
    min_params: Optional[int]

    @classmethod
    def of(cls, runtime: Any, device: torch.device, world_size: int) -> "Settings":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy

        param_dtype = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[runtime.mixed_precision]
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
        return cls(init_device_mesh(device.type, (world_size,)), policy, runtime.fsdp_sharding == "full_shard",
                   runtime.fsdp_min_params)


def units(net: nn.Module, min_params: Optional[int], cover: bool = False) -> list[nn.Module]:
    """The submodules of ``net`` that become FSDP units: the smallest holding at least ``min_params`` parameters,
    none inside another (none when ``min_params`` is None); with ``cover``, also each submodule outside those that
    owns parameters itself (a layer), with its children: every parameter but ``net``'s own is then in a unit (a
    module owning parameters around a unit keeps those whole). ``net`` itself never."""
    picked: list[nn.Module] = []
    holds: dict[int, bool] = {}  # a module seen (a shared one is visited once): does its subtree hold a unit

    def smallest(m: nn.Module) -> bool:
        if id(m) not in holds:
            inside = any([smallest(c) for c in m.children()])
            pick = m is not net and not inside and min_params is not None and sum(p.numel() for p in m.parameters()) >= min_params
            if pick:  # a container without a forward (ModuleList) cannot be a unit: its members with parameters are
                picked.extend([m] if runs(m) else [c for c in m.children() if any(True for _ in c.parameters())])
            holds[id(m)] = inside or pick
        return holds[id(m)]

    smallest(net)
    if cover:
        taken = {id(p) for u in picked for p in u.parameters()}

        def leftovers(m: nn.Module) -> None:  # the highest submodules owning parameters with no unit inside
            for c in m.children():
                inner = list(c.parameters())
                if not inner or any(c is u for u in picked):
                    continue
                if any(True for _ in c.parameters(recurse=False)) and not any(id(p) in taken for p in inner):
                    picked.append(c)
                    taken.update(id(p) for p in inner)
                else:
                    leftovers(c)  # a module owning parameters around a unit keeps its own whole

        leftovers(net)
    return picked


def runs(module: nn.Module) -> bool:
    """``module`` has a ``forward`` of its own (``fully_shard`` hooks it): not a bare container such as ``nn.ModuleList``."""
    return type(module).forward is not nn.Module.forward


def _shard(module: nn.Module, settings: Settings) -> None:
    from torch.distributed.fsdp import fully_shard

    fully_shard(module, mesh=settings.mesh, reshard_after_forward=settings.reshard_after_forward, mp_policy=settings.mp_policy)


def shard_trained(root: nn.Module, net: nn.Module, settings: Settings) -> nn.Module:
    """``root`` (the :class:`~scoredistill.engine.Trainable` holding ``net``) sharded: ``net``'s units, then the root.

    The root then runs one empty forward: FSDP2 takes the first module whose forward runs as the root of
    its units, and the losses may call ``net`` (another network's update reads it) before ``root`` ever runs.
    """
    for unit in units(net, settings.min_params):
        _shard(unit, settings)
    _shard(root, settings)
    root(lambda _net: None)
    root.reshard()  # (shard_grad_op keeps them after a forward): the optimiser is made over the shards
    return root


def shard_frozen(net: nn.Module, settings: Settings) -> None:
    """A frozen network sharded in place: every parameter but ``net``'s own in a unit of its own (no root)."""
    for unit in units(net, settings.min_params, cover=True):
        _shard(unit, settings)
        unit._scoredistill_forget = unit.register_forward_hook(_forget_forward)


def _forget_forward(module: nn.Module, args: Any, output: Any) -> None:
    """FSDP2 notes every forward of a unit for the backward's prefetch and forgets the notes at the backward; a
    teacher call whose output needs no gradient (``torch.no_grad``) has none, and the notes would pile up, one
    per call: forget them here (the unit's weights are already freed, and no collective is pending)."""
    if any(t.requires_grad for t in _tensors(output)):
        return
    reset = getattr(module, "reset_iter_state", None)
    if reset is not None:  # recent torch (2.14 has it)
        reset()
        return
    state = module._get_fsdp_state()  # older torch: the same two lists, by their private names
    state._comm_ctx.post_forward_order.clear()
    for group in state._fsdp_param_groups:
        group._post_forward_indices.clear()


def _tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (list, tuple)):
        return [t for o in output for t in _tensors(o)]
    if isinstance(output, dict):
        return [t for o in output.values() for t in _tensors(o)]
    return [t for t in vars(output).values() if isinstance(t, torch.Tensor)] if hasattr(output, "__dict__") else []


def _fsdp_modules(module: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(root: nn.Module) -> Iterator[None]:
    """Within: the network of ``root`` (a :class:`~scoredistill.engine.Trainable`) can be called and read outside
    ``root``'s forward: its own parameters (those outside every unit) are gathered. Each unit still gathers its
    own just before it runs and frees them after, so every process must make the same calls. Collective."""
    root.unshard()  # (not recursive: the root's own parameter group)
    try:
        yield
    finally:
        root.reshard()


def gather_for_good(module: nn.Module) -> None:
    """Gather every unit of ``module`` and keep it so: one process may then call it alone (the evaluation on
    the main process after training). Collective."""
    for m in _fsdp_modules(module):
        if hasattr(m, "_scoredistill_forget"):  # (its reset would free the weights again)
            m._scoredistill_forget.remove()
        m.set_reshard_after_forward(False, recurse=False)
        m.set_reshard_after_backward(False, recurse=False)
        m.unshard()


def whole(t: torch.Tensor) -> torch.Tensor:
    """A full tensor from a sharded one (an all-gather, collective); any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def sharded(params: list[torch.Tensor]) -> bool:
    """Some of ``params`` are FSDP shards."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in params)


def local_numel(net: nn.Module) -> int:
    """How many parameter elements this process holds of ``net`` (its shards, and the unsharded ones whole)."""
    from torch.distributed.tensor import DTensor

    return sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in net.parameters())


def clip_gradients(params: list[nn.Parameter], max_norm: Optional[float]) -> torch.Tensor:
    """The total norm of the sharded gradients of ``params`` (an all-reduce), and the gradients clipped to
    ``max_norm`` when given (``torch.nn.utils.clip_grad_norm_``'s arithmetic). Collective."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = whole(torch.nn.utils.get_total_norm(grads))
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, norm)
    return norm
