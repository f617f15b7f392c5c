"""Helpers for tests of image components: tiny digits teachers and a tiny FID classifier (seconds, not minutes)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from scoredistill.images.classifier import ClassifierSettings
from scoredistill.images.training import DigitsTeacherSettings, train_digits_teacher

#: ``--set`` overrides that make the digits preset's teacher tiny (about 10k parameters)
TINY_TEACHER_OVERRIDES = ["teacher.block_out_channels=[8,16]", "teacher.norm_num_groups=4", "teacher.attention=false",
                          "teacher.train_steps=4", "teacher.train_batch_size=16", "teacher.sampler_steps=3"]


def tiny_teacher_settings(**kw) -> DigitsTeacherSettings:
    base = dict(block_out_channels=[8, 16], norm_num_groups=4, attention=False, train_steps=4, train_batch_size=16)
    return DigitsTeacherSettings(**{**base, **kw})


def tiny_teacher_folder(folder: Path, **kw) -> Path:
    """Train (a few steps) a tiny digits teacher into ``folder``."""
    return train_digits_teacher(tiny_teacher_settings(**kw), Path(folder), progress=False, log=lambda msg: None)


def tiny_classifier_settings() -> ClassifierSettings:
    return ClassifierSettings(channels=(8, 8, 8, 8), stem_width=8, input_size=16, epochs=1, batch_size=128)


def tiny_diffusers_teacher_folder(folder: Path, num_class_embeds: Optional[int] = None) -> Path:
    """A tiny random-weight 1x8x8 ``UNet2DModel`` with an EDM scheduler config, saved into ``folder`` as a user would;
    class-conditional with ``num_class_embeds`` labels."""
    import diffusers
    import torch

    torch.manual_seed(0)
    diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                          down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                          norm_num_groups=4, num_class_embeds=num_class_embeds).save_pretrained(folder / "unet")
    diffusers.EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5).save_pretrained(folder / "scheduler")
    return folder
