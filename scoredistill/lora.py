"""LoRA (Hu et al., ICLR 2022) for the trained roles, on ONE frozen base shared with the teacher (``train.lora``).

A LoRA layer computes ``h = W0 x + (alpha / r) B A x`` (Hu et al. 2022, eq. 3) with the
frozen ``W0`` and trained ``A`` (``r x in``) and ``B`` (``out x r``, zero at the start,
so that each role starts as the teacher, as DMD's copies do). The adapters are peft's,
injected into the teacher's own network: the generator's adapter ``"generator"`` and the
fake score's ``"fake_score"`` live side by side in each targeted layer, and one copy of
the base weights serves the three roles. Each role holds an :class:`AdapterView`: a module
that switches its adapter on around each call; outside every view the adapters are off,
so the teacher's calls see the plain base. A view's parameters (and so its optimiser,
checkpoints, DDP's all-reduce and the EMA) are its adapter's alone.

Adapters train in float32 whatever the base's dtype (``teacher.dtype`` bf16/fp16 halves
the base). :func:`enable_checkpointing` turns on the networks' gradient checkpointing
(``runtime.gradient_checkpointing``); on a shared base the recomputation in the backward
runs with the adapter that was active in the forward.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from scoredistill.errors import UserError

#: the default ``target_modules``: diffusers UNets (attention, feed-forward, resnet convolutions, time embedding)
#: and diffusion transformers (the same attention and feed-forward names, their joint-attention projections)
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                   "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "conv_shortcut",
                   "time_emb_proj", "linear_1", "linear_2", "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_KEY = "_scoredistill_lora"


class LoraSettings(BaseModel):
    """``train.lora``: LoRA adapters on one shared frozen base instead of full copies of the teacher."""

    model_config = ConfigDict(extra="forbid")
    rank: int = Field(8, ge=1, description="r, the rank of each adapter (A: r x in, B: out x r)")
    alpha: Optional[float] = Field(None, gt=0, description="the adapters' output is scaled by alpha / r; default alpha = r")
    target_modules: Optional[list[str]] = Field(
        None, description="names (or dotted name endings) of the linear and convolution layers that get adapters; "
        "default: attention projections, feed-forward, resnet convolutions and time-embedding linears (diffusers "
        "UNets and transformers)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on each adapter's input while training")
    export: Literal["merged", "lora"] = Field("merged", description="scoredistill export: 'merged' (the adapter "
                        "merged into a full UNet) or 'lora' (the adapter alone, in diffusers' LoRA format)")

    def peft_config(self, targets: list[str]) -> Any:
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha or self.rank, lora_dropout=self.dropout,
                          target_modules=targets, init_lora_weights=True)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _layer_width(layer: nn.Module) -> int:
    """The largest rank a LoRA of ``layer`` can have: ``min(fan_in, fan_out)``."""
    if isinstance(layer, nn.Linear):
        return min(layer.in_features, layer.out_features)
    k = 1
    for s in layer.kernel_size:
        k *= s
    return min(layer.in_channels // layer.groups * k, layer.out_channels)


def target_layers(net: nn.Module, settings: LoraSettings, what: str) -> list[str]:
    """The full names of the layers of ``net`` that get adapters; bad settings are one-line errors."""
    layers = {n: m for n, m in net.named_modules() if isinstance(m, LAYERS) and n}
    if not layers:
        raise UserError(f"train.lora: the {what} ({type(net).__name__}) has no linear or convolution layer to adapt; "
                        "LoRA needs nn.Linear or nn.Conv layers (drop train.lora)")
    targets = settings.target_modules if settings.target_modules is not None else list(DEFAULT_TARGETS)
    chosen = [n for n in layers if any(_matches(n, t) for t in targets)]
    missing = [t for t in targets if not any(_matches(n, t) for n in layers)] if settings.target_modules is not None else []
    if missing or not chosen:
        names = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in layers})[:12])
        raise UserError(f"train.lora.target_modules: {', '.join(missing or targets)} match(es) no linear or convolution "
                        f"layer of the {what}; its layer names end in e.g. {names}")
    narrow = [n for n in chosen if _layer_width(layers[n]) < settings.rank]
    if narrow:
        width = min(_layer_width(layers[n]) for n in narrow)
        raise UserError(f"train.lora.rank={settings.rank} is larger than layer '{narrow[0]}' of the {what} allows "
                        f"(min(fan_in, fan_out) = {_layer_width(layers[narrow[0]])}); use rank <= {width} or leave "
                        "such layers out of target_modules")
    return chosen


class SharedBase:
    """The teacher's network with the roles' adapters in it, and which adapter is on (``None``: none, the teacher)."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net
        self.adapters: dict[str, LoraSettings] = {}
        self.targets: list[str] = []
        self.layers: list[nn.Module] = []
        self.active: Optional[str] = None
        self.dropouts: dict[str, list[nn.Module]] = {}

    @staticmethod
    def of(net: nn.Module) -> "SharedBase":
        """The shared base living in ``net`` (made on first use)."""
        shared = net.__dict__.get(_KEY)
        if shared is None:
            shared = net.__dict__[_KEY] = SharedBase(net)
        return shared

    def add(self, name: str, settings: LoraSettings, what: str) -> None:
        """Inject adapter ``name`` (float32, ``B = 0``) into the base; every adapter stays off."""
        from peft import inject_adapter_in_model
        from peft.tuners.tuners_utils import BaseTunerLayer

        if name in self.adapters:
            raise ValueError(f"adapter '{name}' exists already")
        if not self.targets:
            self.targets = target_layers(self.net, settings, what)
        flags = [(p, p.requires_grad) for other in self.adapters for _, p in self.parameters(other)]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*peft_config.*")  # a second adapter is what we want
            inject_adapter_in_model(settings.peft_config(self.targets), self.net, adapter_name=name)
        for p, flag in flags:  # (peft may set the other adapters' requires_grad from its own active adapter)
            p.requires_grad_(flag)
        self.adapters[name] = settings
        self.layers = [m for m in self.net.modules() if isinstance(m, BaseTunerLayer)]
        for _, p in self.parameters(name):
            p.data = p.data.float()  # peft casts a new adapter to the base's dtype: adapters train in float32
            p.requires_grad_(True)
        self.dropouts[name] = [layer.lora_dropout[name] for layer in self.layers]
        self._set(None, False)

    def parameters(self, name: str) -> list[tuple[str, nn.Parameter]]:
        """Adapter ``name``'s parameters with their names in the base (``...to_q.lora_A.<name>.weight``)."""
        return [(n, p) for n, p in self.net.named_parameters() if f".lora_A.{name}." in n or f".lora_B.{name}." in n]

    def _set(self, name: Optional[str], training: bool) -> None:
        # peft's own set_adapter/enable_adapters also change requires_grad of every adapter: set the state alone
        for layer in self.layers:
            layer._disable_adapters = name is None
            if name is not None:
                layer._active_adapter = [name]
        if name is not None:
            for dropout in self.dropouts[name]:
                dropout.training = training
        self.active = name

    @contextlib.contextmanager
    def using(self, name: Optional[str], training: bool = False) -> Iterator[None]:
        """Within: adapter ``name`` is on (``None``: all off); the previous state is restored after."""
        before = self.active
        self._set(name, training)
        try:
            yield
        finally:
            self._set(before, False)

    def checkpoint(self, fn: Any, *args: Any) -> Any:
        """diffusers' gradient-checkpointing call, its recomputation run with the adapter that is on now."""
        active = self.active

        def run(*inputs: Any) -> Any:
            with self.using(active, training=False if active is None else self.dropouts[active][0].training):
                return fn(*inputs)

        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)


class AdapterView(nn.Module):
    """One role's network: the shared base with adapter ``name`` on around each call.

    Its parameters are that adapter's (a ``ParameterDict`` of the very tensors in the base:
    the optimiser, checkpoints, DDP and the EMA see the adapter alone); the base is not a
    submodule. Other attributes (``config``, ``dtype``, ``mid_block``, ...) are the base's.
    A deep copy (the EMA's) is a new adapter on the same base with this one's weights.
    """

    def __init__(self, base: nn.Module, name: str) -> None:
        super().__init__()
        self.__dict__["base"] = base  # not registered: its weights are the teacher's
        self.name = name
        self.shared = SharedBase.of(base)
        # keys without the adapter's name: a copy's (the EMA's) state dict is the same as its source's
        self.adapter = nn.ParameterDict({n.replace(f".{name}.", ".").replace(".", "/"): p for n, p in self.shared.parameters(name)})

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.shared.using(self.name, self.training):
            return self.base(*args, **kwargs)

    def __getattr__(self, attr: str) -> Any:
        try:
            return super().__getattr__(attr)
        except AttributeError:
            return getattr(self.__dict__["base"], attr)

    def __deepcopy__(self, memo: dict) -> "AdapterView":
        shared, k = self.shared, 1
        while f"{self.name}_copy{k}" in shared.adapters:
            k += 1
        name = f"{self.name}_copy{k}"
        shared.add(name, shared.adapters[self.name], "copy")
        twin = AdapterView(self.base, name)
        with torch.no_grad():
            for mine, theirs in zip(twin.adapter.values(), self.adapter.values()):
                mine.copy_(theirs)
        twin.train(self.training)
        memo[id(self)] = twin
        return twin

    def merged(self) -> nn.Module:
        """A float32 copy of the base with this adapter merged into its weights (``W0 + (alpha / r) B A``), peft-free."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        net = copy.deepcopy(self.base, {id(self.shared): None})
        net.__dict__.pop(_KEY, None)
        net.float()
        for layer in [m for m in net.modules() if isinstance(m, BaseTunerLayer)]:
            layer._disable_adapters = False
            layer.merge(adapter_names=[self.name])
        for full, module in list(net.named_modules()):
            if isinstance(module, BaseTunerLayer):
                parent, _, child = full.rpartition(".")
                setattr(net.get_submodule(parent) if parent else net, child, module.get_base_layer())
        return net.requires_grad_(False)

    def lora_state_dict(self, prefix: str = "unet") -> dict[str, torch.Tensor]:
        """This adapter in diffusers' LoRA format (``{prefix}.<layer>.lora_A.weight``, ``...lora_B.weight``), with
        ``alpha / r`` folded into ``B`` so that a loader's default ``alpha = r`` gives the same network."""
        settings = self.shared.adapters[self.name]
        scale = (settings.alpha or settings.rank) / settings.rank
        out = {}
        for n, p in self.shared.parameters(self.name):
            key = n.replace(f".{self.name}.", ".")
            out[f"{prefix}.{key}"] = (p.detach().float() * (scale if ".lora_B." in n else 1.0)).contiguous().cpu()
        return out

    def save_lora(self, folder: Path) -> Path:
        """Write ``pytorch_lora_weights.safetensors`` into ``folder`` (read by diffusers' ``load_lora_weights``)."""
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "pytorch_lora_weights.safetensors"
        save_file(self.lora_state_dict(), str(path))
        return path


def adapter_copy(module: nn.Module, attr: str, name: str, settings: LoraSettings) -> nn.Module:
    """A shallow copy of ``module`` whose network ``module.<attr>`` is a view with a new adapter ``name``.

    Buffers and everything but the network are shared with ``module`` (the frozen teacher's
    wrapper: its schedule, prompt table); the copy is in training mode.
    """
    base = getattr(module, attr)
    if settings.export == "lora" and not hasattr(base, "load_lora_adapter"):
        raise UserError(f"train.lora.export=lora: diffusers has no LoRA loader for {type(base).__name__}; "
                        "use train.lora.export=merged (a full network)")
    SharedBase.of(base).add(name, settings, f"{name.replace('_', ' ')}'s network")
    twin = copy.copy(module)  # a new __dict__; its containers (parameters, buffers, modules, hooks) copied below
    for key, value in module.__dict__.items():
        if key.startswith("_") and isinstance(value, (dict, set)):
            twin.__dict__[key] = copy.copy(value)
    twin._modules[attr] = AdapterView(base, name)
    return twin.train()


def enable_checkpointing(net: nn.Module, what: str) -> None:
    """Gradient checkpointing of ``net``'s diffusers/transformers models (``runtime.gradient_checkpointing``)."""
    found = False
    for module in list(net.modules()):
        base = module.base if isinstance(module, AdapterView) else module
        if getattr(base, "_supports_gradient_checkpointing", False) and hasattr(base, "enable_gradient_checkpointing"):
            shared = base.__dict__.get(_KEY)
            base.enable_gradient_checkpointing(shared.checkpoint if shared is not None else None)
            found = True
        elif getattr(base, "supports_gradient_checkpointing", False) and hasattr(base, "gradient_checkpointing_enable"):
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            found = True
    if not found:
        raise UserError(f"runtime.gradient_checkpointing: the {what} ({type(net).__name__}) holds no diffusers or "
                        "transformers model that supports gradient checkpointing; set runtime.gradient_checkpointing=false")
