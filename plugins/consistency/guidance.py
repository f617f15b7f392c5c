"""LCM's guidance-scale embedding: a consistency model conditioned on the guidance scale (Luo et al. 2023, Sec. 4.2).

LCM (arXiv 2310.04378, Algorithm 1) distils a guided teacher with ``w`` drawn per sample from
``[w_min, w_max]`` and conditions the student on ``w``: a sinusoidal embedding of ``w`` (VDM's
timestep embedding of ``1000 w``) enters the network beside its time embedding. In diffusers'
``UNet2DConditionModel`` this is ``time_cond_proj_dim``: ``TimestepEmbedding`` adds
``cond_proj(embedding)`` to its input, and ``LatentConsistencyModelPipeline`` embeds
``w = guidance_scale - 1`` (its teacher's guidance being ``D_c + w (D_c - D_u) = D_u + g (D_c - D_u)`` with
``g = 1 + w``). Here the guidance scale is ``g`` throughout, and the network sees the embedding of ``g - 1``.

Where the embedding enters (the new weights start at zero, so the student starts as the teacher):

* a diffusers UNet (``UNet2DModel``, ``UNet2DConditionModel``): its ``time_embedding``'s own
  ``cond_proj`` (diffusers' layer; a ``UNet2DConditionModel`` records ``time_cond_proj_dim`` in its
  config, so that a saved network loads in diffusers and takes ``timestep_cond``);
* an MLP denoiser (flat data): a learned projection added to its first layer's output, beside the
  Fourier features of the noise level;
* any other network: nowhere (:meth:`GuidanceEmbedding.attach` returns ``False``).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch
from torch import Tensor, nn


def guidance_scale_embedding(w: Tensor, dim: int) -> Tensor:
    """``(N, dim)``: ``[sin(1000 w f_k), cos(1000 w f_k)]`` with ``f_k = 10000^(-k / (dim/2 - 1))``, ``k < dim/2``,
    zero-padded to an odd ``dim`` (LCM, Luo et al. 2023, Sec. 4.2; the embedding of diffusers' ``time_cond_proj_dim``)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * (-math.log(10000.0) / (half - 1)))
    arg = 1000.0 * w.float()[:, None] * freqs[None, :]
    emb = torch.cat([arg.sin(), arg.cos()], dim=1)
    return nn.functional.pad(emb, (0, dim % 2))


class GuidanceEmbedding(nn.Module):
    """Feeds ``guidance_scale_embedding(g - 1)`` into a network while :meth:`scale` is active (see the module docstring).

    The hooks are this module's bound methods, so a deep copy of a generator that holds both the network and this
    module (an EMA target, the EMA sampler) feeds its own copy's ``g``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.proj: Optional[nn.Linear] = None
        self._embedding: Optional[Tensor] = None

    def attach(self, network: nn.Module) -> bool:
        """Give ``network`` (a denoiser) a place for the embedding; ``False`` when it has none."""
        unet = getattr(network, "unet", None)
        time_embedding = getattr(unet, "time_embedding", None)
        if time_embedding is not None and isinstance(getattr(time_embedding, "linear_1", None), nn.Linear):
            if getattr(time_embedding, "cond_proj", None) is None:
                layer = nn.Linear(self.dim, time_embedding.linear_1.in_features, bias=False)
                nn.init.zeros_(layer.weight)
                time_embedding.cond_proj = layer.to(time_embedding.linear_1.weight.device)
            if "time_cond_proj_dim" in unet.config:  # UNet2DConditionModel: save_pretrained records it
                unet.register_to_config(time_cond_proj_dim=self.dim)
            time_embedding.register_forward_pre_hook(self._condition, with_kwargs=True)
            return True
        first = getattr(network, "net", None)
        if isinstance(first, nn.Sequential) and isinstance(first[0], nn.Linear):  # MLPDenoiserNet
            self.proj = nn.Linear(self.dim, first[0].out_features, bias=False)
            nn.init.zeros_(self.proj.weight)
            first[0].register_forward_hook(self._add)
            return True
        return False

    @contextlib.contextmanager
    def scale(self, g: Tensor) -> Iterator[None]:
        """Within: the network is conditioned on the guidance scales ``g`` ``(N,)``."""
        self._embedding = guidance_scale_embedding(g - 1.0, self.dim)
        try:
            yield
        finally:
            self._embedding = None

    def _condition(self, module: nn.Module, args: tuple, kwargs: dict):
        """diffusers' ``TimestepEmbedding.forward(sample, condition)``: ``condition`` = the embedding."""
        if self._embedding is None:
            return None
        return (args[0],), {**kwargs, "condition": self._embedding.to(args[0].dtype)}

    def _add(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        if self._embedding is None:
            return output
        return output + self.proj(self._embedding.to(output.dtype))
