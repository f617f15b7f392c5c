"""Where a run executes: one process or several (accelerate), wrapped networks, precision.

One process is the default. Under ``torchrun --nproc_per_node N -m scoredistill.cli run ...``
(or ``accelerate launch`` on GPUs) every process builds the same networks from the same
seed, then draws its own noise (each rank is seeded differently) on ``batch_size / N``
samples; the gradients of the generator and the fake score are averaged across the
processes (DDP), or those networks are sharded (FSDP2, ``runtime.distributed: fsdp``), and
then the frozen teacher is sharded too (``runtime.fsdp_shard_teacher``). (``accelerate launch --cpu
--num_processes 2`` silently runs one process; use torchrun on CPU.)

How a network is wrapped: DDP and FSDP act on what runs inside the wrapped module's
``forward``, so every update's whole objective runs there (:class:`Trainable`):
``wrapper(objective)`` calls ``objective(net)``. The losses keep calling the plain
networks, whose attributes (``latent_shape``, a GAN head, ``features``) stay visible,
and each wrapper sees exactly one forward and one backward per update.

FSDP is torch's ``fully_shard`` (FSDP2, :mod:`scoredistill.sharding`), applied here rather than by
accelerate (which maps several CPU processes to DDP whatever FSDP settings it is given), so the
same code runs, and is tested, on CPU with gloo.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from scoredistill import sharding
from scoredistill.config import RuntimeConfig
from scoredistill.errors import UserError
from scoredistill.roles import stable_hash

WRAPPED_PREFIX = "net."


class Trainable(nn.Module):
    """Holds one trained network; its ``forward`` runs an update's objective on that network."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, objective: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return objective(self.net, *args, **kwargs)


def launched_processes() -> int:
    """How many processes the launcher (torchrun, accelerate launch) started; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_seed(seed: int, rank: int) -> int:
    """The training seed of process ``rank``: ``seed`` itself on rank 0, a derived one elsewhere."""
    return seed if rank == 0 else int(stable_hash(seed, "rank", rank), 16) % (2**63)


def seed_all(seed: int) -> None:
    """Seed torch's, Python's (``random``) and NumPy's global generators from one seed (0 to 2**63-1): a plugin or
    library drawing from any of them gives the same numbers for the same seed (their states go into checkpoints)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed([seed & 0xFFFFFFFF, seed >> 32])  # NumPy's legacy seed takes 32-bit words


def _torch_at_least(major: int, minor: int) -> bool:
    return tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (major, minor)


class Engine:
    """accelerate's process state plus what the trainer needs from it (one object per run)."""

    def __init__(self, runtime: RuntimeConfig) -> None:
        device = torch.device(runtime.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"runtime.device={runtime.device} but this machine has no CUDA device; use runtime.device=cpu")
        if runtime.mixed_precision == "fp16" and device.type != "cuda":
            raise UserError("runtime.mixed_precision=fp16 needs a CUDA device (loss scaling); use bf16 on CPU")
        if runtime.tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if device.type == "cuda":  # fixed shapes: cuDNN's timed choice per shape (EDM's training loop does the same)
            torch.backends.cudnn.benchmark = runtime.cudnn_benchmark
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedDataParallelKwargs

        if launched_processes() == 1:  # one process may run several runs (tests, compare): start from a clean state
            AcceleratorState._reset_state(reset_partial_state=True)
        self.runtime = runtime
        self.accelerator = Accelerator(
            cpu=device.type == "cpu",
            mixed_precision=runtime.mixed_precision,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=runtime.find_unused_parameters)],
        )
        acc = self.accelerator
        self.rank, self.world_size, self.is_main = acc.process_index, acc.num_processes, acc.is_main_process
        self.distributed = self.world_size > 1
        self.fsdp = self.distributed and runtime.distributed == "fsdp"
        if self.fsdp and not sharding.available():
            raise UserError(f"runtime.distributed=fsdp needs torch >= 2.6 (torch.distributed.fsdp.fully_shard); this is torch "
                            f"{torch.__version__}: use runtime.distributed=ddp or a newer torch")
        self.device = (acc.device if acc.device.type != "cpu" else torch.device("cpu")) if self.distributed else device
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=runtime.mixed_precision == "fp16")
        self._one = torch.ones((), device=self.device)  # check_gradients' scale
        self._fsdp: Optional[sharding.Settings] = None  # made on first use (a device mesh)
        # fused Adam: one kernel per parameter tensor instead of about ten; on CPU (torch >= 2.4) a
        # step over the 0.7 M-parameter digits UNet takes 0.9 ms against 4.5 on one thread. Not for
        # several CPU processes: its vector loop rounds a tensor's tail differently, so FSDP's shards
        # would no longer give DDP's weights bit for bit.
        self.fused_adam = self.device.type == "cuda" or (self.device.type == "cpu" and not self.distributed
                                                         and _torch_at_least(2, 4))
        self.weight_copies_dtype = self._weight_copies_dtype(runtime)
        if runtime.cuda_graph:
            self._check_cuda_graph(runtime)

    def _check_cuda_graph(self, runtime: RuntimeConfig) -> None:
        """``runtime.cuda_graph`` captures one process's eager iteration (:mod:`scoredistill.cuda_graph`): refuse the rest."""
        why = ("runtime.compile is on (inductor makes its own graphs: runtime.compile_mode=reduce-overhead)" if runtime.compile else
               "runtime.mixed_precision is fp16 (its loss scaling decides on the host)" if runtime.mixed_precision == "fp16" else
               f"this run has {self.world_size} processes (one eager process only)" if self.distributed else
               f"runtime.device is {runtime.device}, and CUDA graphs need a CUDA device" if self.device.type != "cuda" else None)
        if why is not None:
            raise UserError(f"runtime.cuda_graph=true cannot be used: {why}; set runtime.cuda_graph=false")

    def _weight_copies_dtype(self, runtime: RuntimeConfig) -> Optional[torch.dtype]:
        """The dtype of the networks' weight copies (:mod:`scoredistill.precision`), or None: autocast casts per call.

        The copies live outside DDP's and FSDP's view (their gradients would not be reduced), and
        a compiled graph casts inside its own kernels: there inductor fuses a gradient's cast into
        the reduction that makes it (a bias gradient summed in float32), so copies, whose gradients
        are rounded to bf16 first, would not give the same numbers (seen on CPU with an MLP). They
        are for one eager process.
        """
        mode = runtime.cast_weights
        if mode == "per_call" or (mode == "auto" and runtime.mixed_precision == "no"):
            return None
        why = ("runtime.mixed_precision is 'no' (nothing is cast)" if runtime.mixed_precision == "no" else
               f"this run has {self.world_size} processes (DDP and FSDP reduce the weights' own gradients)" if self.distributed else
               "runtime.compile is on (the compiled graphs cast inside their kernels)" if runtime.compile else
               f"torch {torch.__version__} is older than 2.4" if not _torch_at_least(2, 4) else None)
        if why is not None:
            if mode == "auto":
                return None
            raise UserError(f"runtime.cast_weights=per_update cannot be used: {why}; use per_call or auto")
        return torch.bfloat16 if runtime.mixed_precision == "bf16" else torch.float16

    # -- lifecycle
    def close(self) -> None:
        """Forget accelerate's process state after a one-process run (so another run can choose other settings);
        with several processes, shut this process's group down and free it now.

        Left to interpreter exit, gloo's threads can be destroyed while still joinable (``terminate called
        without an active exception``, SIGABRT: 2 of 21 two-process runs on a loaded 2-core machine). The
        process group lives on in the DDP/FSDP wrappers, which sit in reference cycles, so destroying it
        is not enough: once the wrappers are unreachable, ``gc.collect`` frees them and it, here.
        """
        if not self.distributed:
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(reset_partial_state=True)
        elif torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # local: no process waits on another here
            gc.collect()

    def barrier(self) -> None:
        if self.distributed:
            self.accelerator.wait_for_everyone()

    # -- wrapping
    def wrap(self, net: nn.Module) -> nn.Module:
        """``net`` inside a :class:`Trainable`, wrapped for data parallelism (DDP or FSDP2) when there are several processes."""
        module = Trainable(net)
        if not self.distributed:
            return module  # nothing to synchronise (autocast is the trainer's; accelerate's prepare would add ~1 s of imports)
        if not self.fsdp:
            return self.accelerator.prepare_model(module)
        return sharding.shard_trained(module, net, self._fsdp_settings())

    def shard_frozen(self, net: nn.Module) -> None:
        """Shard a frozen network (the teacher) over the processes, in place, under FSDP with
        ``runtime.fsdp_shard_teacher``; otherwise leave it whole. Collective."""
        if self.fsdp and self.runtime.fsdp_shard_teacher:
            sharding.shard_frozen(net, self._fsdp_settings())

    def unshard_for_good(self, net: nn.Module) -> None:
        """Gather a network :meth:`shard_frozen` sharded and keep it whole, so that one process may run it alone
        (the evaluation after training). Collective."""
        if self.fsdp:
            sharding.gather_for_good(net)

    def _fsdp_settings(self) -> "sharding.Settings":
        if self._fsdp is None:
            self._fsdp = sharding.Settings.of(self.runtime, self.device, self.world_size)
        return self._fsdp

    @staticmethod
    def inner(wrapper: nn.Module) -> nn.Module:
        """The network inside a wrapper (as the losses see it)."""
        module = wrapper.module if isinstance(wrapper, torch.nn.parallel.DistributedDataParallel) else wrapper
        return module.net

    def full_parameters(self, wrapper: Optional[nn.Module]) -> contextlib.AbstractContextManager:
        """Within: the network may be called and read outside its wrapper (a no-op unless FSDP). Collective:
        under FSDP every process must make the same calls (each unit gathers its weights as it runs)."""
        if not self.fsdp or wrapper is None:
            return contextlib.nullcontext()
        return sharding.gathered(wrapper)

    def full_state(self, wrapper: nn.Module) -> dict[str, torch.Tensor]:
        """The network's full state dict on every process (its own key names). Collective under FSDP."""
        if not self.fsdp:
            return dict(self.inner(wrapper).state_dict())
        return {k: sharding.whole(v) for k, v in self.inner(wrapper).state_dict().items()}

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.runtime.mixed_precision == "no":
            return contextlib.nullcontext()  # accelerate would rebuild its state object on every call
        return self.accelerator.autocast()

    # -- gradients
    def check_gradients(self, wrapper: nn.Module, params: list[nn.Parameter], max_norm: Optional[float],
                        watch: bool = True) -> Optional[torch.Tensor]:
        """Clip the gradients of ``params`` (``wrapper``'s) to ``max_norm`` when given; with ``watch``, return a 0-d
        float on the device that is 1.0 when one of them is NaN or infinite and 0.0 otherwise (no host sync).

        The flag is ``found_inf`` of the check :class:`torch.amp.GradScaler` makes before an fp16
        step, here with a scale of one, which leaves every gradient as it is, bit for bit: one
        foreach op whatever the number of tensors, and no per-tensor output (the non-finite guard
        keeps one flag per update; a fused optimiser skips its step on it, ``found_inf``). Under
        FSDP each process holds a shard and all must agree: the flag comes from the total norm, a
        collective.
        """
        if self.fsdp:
            norm = sharding.clip_gradients(params, max_norm) if watch or max_norm is not None else None
            return (~torch.isfinite(norm)).float() if watch else None
        found = None
        if watch:
            grads = [p.grad for p in params if p.grad is not None]
            found = torch.zeros((), device=self.device)
            if grads:
                torch._amp_foreach_non_finite_check_and_unscale_(grads, found, self._one)
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        return found

    # -- state (collective under FSDP: every process must call these)
    def _options(self, **kw: Any):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        # cpu_offload only from GPUs: on CPU (gloo), torch 2.14 returns exp_avg and exp_avg_sq as one aliased tensor with it
        return StateDictOptions(full_state_dict=self.fsdp, cpu_offload=self.fsdp and self.device.type != "cpu", **kw)

    def model_state(self, wrapper: nn.Module) -> dict[str, torch.Tensor]:
        """The network's full state dict (its own key names); empty on other ranks than 0 under FSDP."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        if not self.fsdp:
            return dict(self.inner(wrapper).state_dict())
        state = get_model_state_dict(wrapper, options=self._options())
        return {k[len(WRAPPED_PREFIX):]: v for k, v in state.items()}

    def load_model_state(self, wrapper: nn.Module, state: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        if not self.fsdp:
            self.inner(wrapper).load_state_dict(state)
            return
        set_model_state_dict(wrapper, {WRAPPED_PREFIX + k: v for k, v in state.items()}, options=self._options())

    def optimizer_state(self, wrapper: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """``{"state": {param name: {...}}, "param_groups": [...]}``, keyed by parameter name, not position."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

            state = get_optimizer_state_dict(wrapper, optimizer, options=self._options())
            return _renamed(state, lambda n: n[len(WRAPPED_PREFIX):]) if state else state
        names = self._positions(wrapper, optimizer)
        return _renamed(optimizer.state_dict(), lambda i: names[i])

    def load_optimizer_state(self, wrapper: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

            set_optimizer_state_dict(wrapper, optimizer, _renamed(state, lambda n: WRAPPED_PREFIX + n), options=self._options())
            if not state["state"]:
                optimizer.state.clear()  # it had not stepped yet (DCP initialises the state with a step)
        else:
            index = {name: i for i, name in enumerate(self._positions(wrapper, optimizer))}
            optimizer.load_state_dict(_renamed(state, lambda n: index[n]))
        for group in optimizer.param_groups:  # JSON gives lists; torch's own state dicts hold tuples
            if isinstance(group.get("betas"), list):
                group["betas"] = tuple(group["betas"])

    def _positions(self, wrapper: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
        """The parameter names in the order of ``optimizer.state_dict()``'s indices."""
        names = {id(p): n for n, p in self.inner(wrapper).named_parameters()}
        return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]

    # -- across processes
    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean of ``values`` over the processes (itself with one process)."""
        if not self.distributed:
            return values
        return self.accelerator.reduce(values.detach().float().clone(), reduction="mean")

    def any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on some process. Collective; a host sync."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.accelerator.reduce(t, reduction="sum").item() > 0)

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every process, in rank order (a list of one with one process)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out


def _renamed(state: dict, rename: Callable[[Any], Any]) -> dict:
    """An optimiser state dict with its parameter keys mapped through ``rename`` (positions <-> names)."""
    return {"state": {rename(k): v for k, v in state["state"].items()},
            "param_groups": [{**g, "params": [rename(k) for k in g["params"]]} for g in state["param_groups"]]}
