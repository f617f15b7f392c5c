"""Helpers for tests of image components: tiny digits teachers and a tiny FID classifier (seconds, not minutes)."""

from __future__ import annotations

from pathlib import Path

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
