"""The exponential moving average of the generator's weights (``train.ema_decay``)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from scoredistill.sharding import sharded, whole


class EMA(torch.optim.swa_utils.AveragedModel):
    """An exponential moving average of the generator's weights, ``ema <- ema + (1 - decay) (w - ema)``.

    :class:`~torch.optim.swa_utils.AveragedModel` (same state dict, so checkpoints are
    interchangeable) whose update never waits for the device: its ``n_averaged == 0``
    test is kept on the host, read from the device once (after a resume).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__(model, use_buffers=False)
        self.module.eval()  # never trained: it only samples
        self.decay = decay
        self._count: Optional[int] = None

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        if self._count is None:
            self._count = int(self.n_averaged)  # once: 0 for a new run, the checkpoint's count after a resume
        lists = self.__dict__.get("_lists")
        if lists is None or lists[0] is not model:  # built once (the Parameter objects)
            theirs = list(model.parameters())
            lists = self.__dict__["_lists"] = (model, list(self.module.parameters()), theirs, sharded(theirs))
        _, mine, theirs, shards = lists
        if shards:  # FSDP: the model's float32 shards, gathered (a collective; whatever the policy's dtype)
            theirs = [whole(p) for p in theirs]
        if self._count == 0:
            torch._foreach_copy_(mine, theirs)
        else:
            torch._foreach_lerp_(mine, theirs, 1.0 - self.decay)
        self.n_averaged += 1
        self._count += 1

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._count = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
