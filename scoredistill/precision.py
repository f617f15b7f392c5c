"""Low-precision copies of a network's weights, cast once per update instead of on every call.

Under autocast (bf16 or fp16) every convolution and linear layer casts its float32 weight and
bias to the low precision in every forward, and the backward casts their gradients back: two
aten ops per tensor and call. On a GPU whose host sets the pace each costs the host about a
kernel launch and more (an H200 profile: 28 µs per cast, 42 µs per cast's backward
node). In a bf16 DMD iteration on the CIFAR UNet they are 1,352 of its 6,885 aten ops
(``benchmarks/README.md``, "GPU throughput").

:class:`WeightCopies` keeps those casts as tensors of their own, and gives each layer's forward
the copies while autocast runs at their dtype. Gradients land on the copies and reach the
float32 weights in one foreach copy; one more refreshes the copies after each optimiser step.
The trainer gives the generator and the fake score copies, and the frozen teacher copies made
once (``runtime.cast_weights``). The numbers are the same bit for bit: autocast would compute
exactly these casts (round to nearest even), and the float32 gradient is the low-precision one
cast once, as autocast's backward casts it. This is the master-weights scheme of Micikevicius
et al., "Mixed Precision Training" (ICLR 2018), restricted to the tensors autocast casts.

The float32 weights stay the network's parameters, so the optimiser, checkpoints, the EMA and
sampling outside autocast (``samples.generate``) see the network as it was.

- Left alone (cast per call, as before): layers of other types, weights tied between layers,
  and deep copies of the network (they fall back to the layer's own forward).
- A layer called several times in one autocast region sums its gradients in the low precision,
  as autocast does (its cast cache gives every call the same cast tensor). Called in separate
  regions before one backward, autocast would sum the casts' gradients in float32; the trainer
  runs each update's forward in one region.
- A weight changed in place outside the trainer's updates must be followed by
  :meth:`WeightCopies.refresh` (the trainer refreshes after each step, after a resume and after
  the ``train_start`` hooks).
"""

from __future__ import annotations

import types
from collections import Counter
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: the layers whose forward is known (``F.linear``, ``_conv_forward``): subclasses may compute otherwise
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_KEY = "_scoredistill_weight_copies"


class _LayerCopies:
    """One layer's copies and the float32 weights they copy."""

    __slots__ = ("device_type", "dtype", "weight", "w", "bias", "b")

    def __init__(self, layer: nn.Module, device_type: str, dtype: torch.dtype, w: Tensor, b: Optional[Tensor]) -> None:
        self.device_type, self.dtype, self.weight, self.w, self.bias, self.b = device_type, dtype, layer.weight, w, layer.bias, b

    def __deepcopy__(self, memo: dict) -> None:
        return None  # a deep copy of the layer has weights of its own: no copies (and no memory for them)

    def serve(self, layer: nn.Module) -> bool:
        """Whether ``layer`` should use the copies now: on the same parameters, under autocast at their dtype."""
        params = layer._parameters
        return (params["weight"] is self.weight and params.get("bias") is self.bias
                and torch.is_autocast_enabled(self.device_type) and torch.get_autocast_dtype(self.device_type) == self.dtype)


def _forward_with_copies(self: nn.Module, x: Tensor) -> Tensor:
    """A layer's forward that uses its low-precision copies while autocast runs at their dtype."""
    c: Optional[_LayerCopies] = self.__dict__[_KEY]
    if c is None or not c.serve(self):  # a deep copy, new parameters, or no autocast at this dtype: the layer as it is
        return type(self).forward(self, x)
    w, b = c.w, c.b
    if w.requires_grad is not c.weight.requires_grad:  # follows the weight (frozen while another network updates)
        w.requires_grad_(c.weight.requires_grad)
    if b is not None and b.requires_grad is not c.bias.requires_grad:
        b.requires_grad_(c.bias.requires_grad)
    if type(self) is nn.Linear:
        return F.linear(x, w, b)
    return self._conv_forward(x, w, b)


class WeightCopies:
    """``dtype`` copies of the weights and biases of ``net``'s convolution and linear layers, used under autocast.

    ``device_type``: the autocast device (``"cuda"``, ``"cpu"``). Call :meth:`zero_grad` with the
    optimiser's, :meth:`gradients_to_masters` after the backward and :meth:`refresh` after the step.
    """

    def __init__(self, net: nn.Module, dtype: torch.dtype, device_type: str) -> None:
        owners = Counter(id(p) for m in net.modules() for p in m.parameters(recurse=False))
        self.masters, self.copies, self.layers = [], [], []
        for layer in net.modules():
            own = [p for p in (layer.weight, getattr(layer, "bias", None)) if p is not None] if type(layer) in LAYERS else []
            if not own or any(owners[id(p)] != 1 or p.dtype != torch.float32 for p in own):  # tied weights keep autocast
                continue
            copies = [torch.empty_like(p, dtype=dtype).requires_grad_(p.requires_grad) for p in own]  # same memory format
            layer.__dict__[_KEY] = _LayerCopies(layer, device_type, dtype, copies[0], copies[1] if len(copies) > 1 else None)
            layer.forward = types.MethodType(_forward_with_copies, layer)
            self.masters += own
            self.copies += copies
            self.layers.append(layer)
        self._grads: Optional[list[Tensor]] = None  # float32 gradient buffers, made at the first backward
        self.refresh()

    def __len__(self) -> int:
        return len(self.masters)

    @torch.no_grad()
    def refresh(self) -> None:
        """Copies <- the float32 weights, rounded (one foreach op)."""
        if self.copies:
            torch._foreach_copy_(self.copies, self.masters)

    def zero_grad(self) -> None:
        for c in self.copies:
            c.grad = None

    @torch.no_grad()
    def gradients_to_masters(self) -> None:
        """Each weight's ``.grad`` <- its copy's gradient in float32 (added, if the weight had one of its own); the
        copies' gradients are then dropped."""
        if self._grads is None:
            self._grads = [torch.empty_like(m) for m in self.masters]
        fresh, into, grads = [], [], []
        for m, c, buf in zip(self.masters, self.copies, self._grads):
            if c.grad is None:
                continue
            if m.grad is None:
                fresh.append(buf)
                grads.append(c.grad)
                m.grad = buf
            else:
                into.append((m.grad, c.grad))
        if fresh:
            torch._foreach_copy_(fresh, grads)
        for g, c in into:
            g.add_(c)
        self.zero_grad()  # their memory is free until the next backward

    def remove(self) -> None:
        """Give every layer its own forward back (then the copies are unused)."""
        for layer in self.layers:
            _restore(layer)
        self.layers = []


def _restore(layer: nn.Module) -> None:
    if _KEY in layer.__dict__:
        del layer.__dict__[_KEY]
        layer.__dict__.pop("forward", None)


def without_weight_copies(net: nn.Module) -> nn.Module:
    """``net`` with every layer's own forward (for a deep copy that is compiled or traced on its own); returns ``net``."""
    for layer in net.modules():
        _restore(layer)
    return net
