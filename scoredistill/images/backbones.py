"""How each diffusers model class is called: its data shape, its conditions, its timestep and output layout.

A :class:`Backbone` is the thin, model-specific half of an image teacher's adapter (the other
half, the parameterisation, lives in :mod:`scoredistill.images.denoisers`). Given the network
input ``x_in`` (already preconditioned), the scheduler's timestep ``t`` (diffusers' convention:
``0 .. num_train_timesteps``) and the conditions as keyword tensors, it returns the network's
prediction in the data's own layout ``(N, C, H, W)``:

* ``UNet2DModel`` / ``UNet2DConditionModel``: ``class_labels`` / ``encoder_hidden_states``;
  a learned (table) time embedding gets the nearest integer timestep;
* ``DiTTransformer2DModel``: class labels (``num_embeds_ada_norm`` classes, that index is its
  "no class"); a learned-sigma network's first half of the channels;
* ``SD3Transformer2DModel``: ``encoder_hidden_states`` + ``pooled_projections``;
* ``FluxTransformer2DModel``: latents packed 2x2 into tokens, image / text position ids, the
  timestep as a fraction ``t / 1000`` and, for guidance-distilled models, the guidance embedding.

The model classes this family supports are the keys of :data:`BACKBONES` (this file owns them).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from scoredistill.errors import UserError


def _first(value: Any) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


class Backbone:
    """A diffusers network's call (see the module docstring); subclasses per model class."""

    #: "none", "class" or "text"
    conditioning: str = "none"
    #: where a pipeline folder keeps the network
    subfolder: str = "unet"

    def __init__(self, net: nn.Module, sample_size: Optional[int] = None) -> None:
        cfg = net.config
        size = sample_size or getattr(cfg, "sample_size", None)
        if size is None:
            raise UserError(f"the teacher's {type(net).__name__} config has no sample_size: set teacher.sample_size "
                            "(the height and width of its images or latents, e.g. 128 for 1024-pixel latents)")
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        self.data_shape = (self.channels(net), int(h), int(w))
        self.out_channels = int(getattr(cfg, "out_channels", None) or cfg.in_channels)

    def channels(self, net: nn.Module) -> int:
        return int(net.config.in_channels)

    # -- conditions
    @property
    def num_classes(self) -> Optional[int]:
        """Size of the class-label table (the null class among them), or ``None``."""
        return None

    default_null_class: Optional[int] = None
    text_dims: Optional[tuple[int, Optional[int]]] = None  # (token dim, pooled dim or None)

    # -- the call
    def timestep(self, t: Tensor) -> Tensor:
        return t

    def forward(self, net: nn.Module, x: Tensor, t: Tensor, kw: dict[str, Tensor]) -> Tensor:
        return net(x, self.timestep(t), return_dict=False, **kw)[0]

    def feature_module(self, net: nn.Module) -> nn.Module:
        """The block whose output, averaged over space or tokens, is the network's features (DMD2's GAN head)."""
        blocks = getattr(net, "transformer_blocks", None)
        if blocks is None or len(blocks) == 0:
            raise UserError(f"the {type(net).__name__} has no transformer blocks: its features are undefined")
        return blocks[len(blocks) // 2]


class UNetBackbone(Backbone):
    """``UNet2DModel`` (and ``UNet2DConditionModel`` through :class:`CrossAttentionUNetBackbone`)."""

    def __init__(self, net: nn.Module, sample_size: Optional[int] = None) -> None:
        super().__init__(net, sample_size)
        self.net_has_classes = getattr(net, "class_embedding", None) is not None
        self.count = getattr(net.config, "num_class_embeds", None)
        self.conditioning = "class" if self.net_has_classes else "none"
        #: a learned (table) time embedding takes integer timesteps: the nearest one
        self.integer_timesteps = getattr(net.config, "time_embedding_type", "positional") == "learned"

    @property
    def num_classes(self) -> Optional[int]:
        return int(self.count) if self.net_has_classes and self.count else None

    def timestep(self, t: Tensor) -> Tensor:
        return t.round().long() if self.integer_timesteps else t

    def feature_module(self, net: nn.Module) -> nn.Module:
        mid = getattr(net, "mid_block", None)
        if mid is None:
            raise UserError("the UNet has no mid block (mid_block_type=None): its features are undefined")
        return mid


class CrossAttentionUNetBackbone(UNetBackbone):
    """``UNet2DConditionModel``: prompt embeddings as ``encoder_hidden_states``. An SDXL-shaped UNet
    (``addition_embed_type="text_time"``) also takes the pooled text embedding and the six size conditions
    ``time_ids = (original H, W, crop top, left, target H, W)`` in pixels (SDXL, Podell et al. 2023, Sec. 2.2), by
    default the image's own size (latent size times ``vae_scale``) uncropped, as the SDXL pipeline's defaults give."""

    #: pixels per latent (2 ** (VAE blocks - 1); the teacher sets it from its VAE)
    vae_scale: int = 8
    #: ``time_ids`` given by the user (``teacher.sdxl_time_ids``), else the image's own size
    time_ids: Optional[tuple[float, ...]] = None

    def __init__(self, net: nn.Module, sample_size: Optional[int] = None) -> None:
        super().__init__(net, sample_size)
        if not self.net_has_classes:
            self.conditioning = "text"
        cfg = net.config
        self.text_time = getattr(cfg, "addition_embed_type", None) == "text_time"
        pooled = None
        if self.text_time:
            pooled = int(cfg.projection_class_embeddings_input_dim) - 6 * int(cfg.addition_time_embed_dim)
        elif getattr(cfg, "addition_embed_type", None) is not None:
            raise UserError(f"the teacher's UNet2DConditionModel has addition_embed_type='{cfg.addition_embed_type}'; "
                            "supported: none, or 'text_time' (SDXL)")
        self.text_dims = (_first(cfg.cross_attention_dim), pooled)

    def forward(self, net: nn.Module, x: Tensor, t: Tensor, kw: dict[str, Tensor]) -> Tensor:
        if not self.text_time:
            return super().forward(net, x, t, kw)
        kw = dict(kw)
        pooled = kw.pop("pooled_projections")
        h, w = (int(d) * self.vae_scale for d in x.shape[-2:])
        ids = self.time_ids or (h, w, 0, 0, h, w)
        time_ids = torch.tensor([ids], dtype=x.dtype, device=x.device).expand(x.shape[0], 6)
        return net(x, self.timestep(t), return_dict=False, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}, **kw)[0]


class DiTBackbone(Backbone):
    """``DiTTransformer2DModel``: class-conditional (labels ``0 .. num_embeds_ada_norm - 1``; that count is "no class")."""

    conditioning = "class"
    subfolder = "transformer"

    def __init__(self, net: nn.Module, sample_size: Optional[int] = None) -> None:
        super().__init__(net, sample_size)
        count = getattr(net.config, "num_embeds_ada_norm", None)
        if not count:
            raise UserError("the teacher's DiTTransformer2DModel has no num_embeds_ada_norm (class table): "
                            "only class-conditional DiT models are supported")
        self.classes = int(count)
        self.default_null_class = self.classes  # DiT's label table has one extra row for classifier-free guidance

    @property
    def num_classes(self) -> Optional[int]:
        return self.classes + 1


class SD3Backbone(Backbone):
    """``SD3Transformer2DModel``: text tokens (``joint_attention_dim``) and a pooled text embedding."""

    conditioning = "text"
    subfolder = "transformer"

    def __init__(self, net: nn.Module, sample_size: Optional[int] = None) -> None:
        super().__init__(net, sample_size)
        self.text_dims = (int(net.config.joint_attention_dim), int(net.config.pooled_projection_dim))

    def forward(self, net: nn.Module, x: Tensor, t: Tensor, kw: dict[str, Tensor]) -> Tensor:
        return net(x, timestep=t, return_dict=False, **kw)[0]  # (its second positional argument is the text)


class FluxBackbone(Backbone):
    """``FluxTransformer2DModel``: 2x2-packed latent tokens, position ids, ``t / 1000`` and the guidance embedding."""

    conditioning = "text"
    subfolder = "transformer"

    def __init__(self, net: nn.Module, sample_size: Optional[int] = None, guidance: float = 3.5) -> None:
        if int(net.config.in_channels) % 4:
            raise UserError(f"the FluxTransformer2DModel has in_channels={net.config.in_channels}: expected 4x the latent channels")
        super().__init__(net, sample_size)
        self.out_channels = self.data_shape[0]
        _, h, w = self.data_shape
        if h % 2 or w % 2:
            raise UserError(f"teacher.sample_size {h}x{w}: Flux latents are packed 2x2 and need an even size")
        self.text_dims = (int(net.config.joint_attention_dim), int(net.config.pooled_projection_dim))
        self.guidance = float(guidance) if getattr(net.config, "guidance_embeds", False) else None

    def channels(self, net: nn.Module) -> int:
        return int(net.config.in_channels) // 4

    @property
    def seq_len(self) -> int:
        return (self.data_shape[1] // 2) * (self.data_shape[2] // 2)

    @staticmethod
    def pack(x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        return x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), c * 4)

    @staticmethod
    def unpack(tokens: Tensor, c: int, h: int, w: int) -> Tensor:
        n = tokens.shape[0]
        return tokens.view(n, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)

    def forward(self, net: nn.Module, x: Tensor, t: Tensor, kw: dict[str, Tensor]) -> Tensor:
        n, c, h, w = x.shape
        img_ids = torch.zeros(h // 2, w // 2, 3, device=x.device, dtype=x.dtype)
        img_ids[..., 1] += torch.arange(h // 2, device=x.device, dtype=x.dtype)[:, None]
        img_ids[..., 2] += torch.arange(w // 2, device=x.device, dtype=x.dtype)[None, :]
        tokens = kw["encoder_hidden_states"]
        txt_ids = torch.zeros(tokens.shape[1], 3, device=x.device, dtype=x.dtype)
        extra = {}
        if self.guidance is not None:
            extra["guidance"] = torch.full((n,), self.guidance, device=x.device, dtype=x.dtype)
        out = net(self.pack(x), encoder_hidden_states=tokens, pooled_projections=kw["pooled_projections"], timestep=t / 1000,
                  img_ids=img_ids.reshape(-1, 3), txt_ids=txt_ids, return_dict=False, **extra)[0]
        return self.unpack(out, c, h, w)


#: the diffusers model classes this teacher family adapts, by ``_class_name``
BACKBONES: dict[str, type[Backbone]] = {
    "UNet2DModel": UNetBackbone,
    "UNet2DConditionModel": CrossAttentionUNetBackbone,
    "DiTTransformer2DModel": DiTBackbone,
    "SD3Transformer2DModel": SD3Backbone,
    "FluxTransformer2DModel": FluxBackbone,
}


def make_backbone(net: nn.Module, sample_size: Optional[int] = None, flux_guidance: float = 3.5) -> Backbone:
    cls = BACKBONES.get(type(net).__name__)
    if cls is None:
        raise UserError(f"teacher model class '{type(net).__name__}' is not supported; supported: {', '.join(BACKBONES)}")
    if cls is FluxBackbone:
        return cls(net, sample_size, flux_guidance)
    return cls(net, sample_size)
