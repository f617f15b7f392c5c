"""Image metrics: FID through clean-fid (digits classifier features; Inception where cached) and class coverage.

Protocol on ``digits`` (fixed; numbers are comparable across runs and methods):

* samples: ``eval.num_samples`` generated images (the ``digits`` preset: 1,500) from the
  fixed seed ``eval.seed``; the teacher's multi-step samples (Heun, ``sampler_steps``
  steps) from the same noise; the real *train* split (1,500 images);
* every set is quantised to uint8 (clean-fid's image format) and embedded by the same
  extractor: the digits classifier's 64-d pre-logits (:mod:`scoredistill.images.classifier`)
  and, where its weights are cached, clean-fid's Inception (2048-d, ``clean`` resizing to 299);
* ``fid``: Frechet distance to the held-out *test* split (297 images, never trained on);
  ``target.fid`` is the real train split's, the floor of this protocol;
  ``fid_train``: distance to the whole train split (stricter, no floor);
* ``class_histogram``: the classifier's predicted classes; ``class_coverage`` the
  fraction of classes whose share is at least half the test split's share.

The Frechet distance itself is clean-fid's (``cleanfid.fid.frechet_distance``).

A latent teacher's samples (the generator's and the teacher's) are decoded by its VAE first; a
folder of real images (``teacher.data``) is the Inception FID's reference. A text teacher's
samples are also scored against their prompts by CLIP (:mod:`scoredistill.images.clip_score`,
where ``eval.clip_model`` names a CLIP folder): ``clip_score`` for the generator,
``teacher.clip_score`` for the teacher's multi-step samples on the same prompts and noise.
"""

from __future__ import annotations

import contextvars
import os
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor

from scoredistill.errors import UserError
from scoredistill.io import load_tensors, save_tensors
from scoredistill.roles import default_cache_dir, seeded_conditions, stable_hash

from scoredistill.images.clip_score import SKIPPED_NOTE, clip_score, load_clip
from scoredistill.images.data import DIGITS_SHAPE, digits, to_uint8

INCEPTION_FILE = "inception-2015-12-05.pt"
ENV_INCEPTION_DIR = "SCOREDISTILL_INCEPTION_DIR"
FID_PROTOCOL = ("reference: digits test split (297, held out); samples: eval.num_samples generated from eval.seed; "
                "features: digits classifier pre-logits (64-d); images quantised to uint8; FID: clean-fid frechet_distance")

#: the digits classifier used for FID features (tests swap in a smaller one)
CLASSIFIER_SETTINGS = None  # None: scoredistill.images.classifier.ClassifierSettings()

#: evaluation options for the current call (``scoredistill eval`` sets them; runs use the defaults)
EVAL_OPTIONS: contextvars.ContextVar[dict] = contextvars.ContextVar("scoredistill_images_eval", default={})


def option(name: str, default: Any) -> Any:
    return EVAL_OPTIONS.get().get(name, default)


# --------------------------------------------------------------------------- FID


def frechet(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """clean-fid's Frechet distance between the Gaussians fitted to two feature sets."""
    from cleanfid.fid import frechet_distance

    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    sig_a, sig_b = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    return float(frechet_distance(mu_a, sig_a, mu_b, sig_b))


def batch_features(images01: Tensor, extractor: Callable[[Tensor], Tensor], batch_size: int = 500,
                   resize: Optional[Callable[[np.ndarray], np.ndarray]] = None, device: Optional[torch.device] = None) -> np.ndarray:
    """Features of ``[-1, 1]`` images, quantised to uint8 then given to ``extractor`` as float [0, 255] (clean-fid)."""
    from cleanfid.fid import get_batch_features

    device = device or torch.device("cpu")
    imgs = to_uint8(images01).float()
    out = []
    for i in range(0, len(imgs), batch_size):
        b = imgs[i : i + batch_size]
        if resize is not None:
            b3 = b.expand(-1, 3, -1, -1) if b.shape[1] == 1 else b
            b = torch.stack([torch.from_numpy(resize(im.permute(1, 2, 0).numpy())).permute(2, 0, 1) for im in b3])
        out.append(get_batch_features(b, extractor, device))
    return np.concatenate(out).astype(np.float64)


def inception_dir() -> Optional[Path]:
    """The folder holding clean-fid's Inception weights (``$SCOREDISTILL_INCEPTION_DIR``, /tmp, torch hub), if any."""
    import torch.hub

    for d in (os.environ.get(ENV_INCEPTION_DIR), "/tmp", str(Path(torch.hub.get_dir()) / "checkpoints")):
        if d and (Path(d) / INCEPTION_FILE).is_file():
            return Path(d)
    return None


def inception_extractor(device: torch.device) -> Callable[[Tensor], Tensor]:
    """clean-fid's Inception (``clean`` mode) from cached weights; a one-line UserError when they are missing."""
    from cleanfid.inception_torchscript import InceptionV3W

    folder = inception_dir()
    if folder is None:
        raise UserError(f"Inception FID needs clean-fid's weights: place {INCEPTION_FILE} in /tmp or in "
                        f"${ENV_INCEPTION_DIR}, or evaluate with --inception off")
    model = InceptionV3W(str(folder), download=False, resize_inside=False).to(device).eval()
    return lambda x: model(x)


# --------------------------------------------------------------------------- teacher samples


def teacher_samples(teacher, n: int, seed: int, cache_dir: Optional[Path] = None, batch_size: int = 500) -> Tensor:
    """The teacher's multi-step samples from the evaluation noise (cached on disk by teacher, n, seed, steps);
    a conditional teacher's with :func:`~scoredistill.roles.seeded_conditions`, as ``samples.generate`` gives the generator."""
    cond = seeded_conditions(teacher, n, seed)
    key = stable_hash(teacher.fingerprint(), n, seed, teacher.sampler_steps, *(["conditions", cond] if cond is not None else []))
    path = Path(cache_dir or default_cache_dir()) / "teacher_samples" / f"{key}.safetensors"
    if path.is_file():
        try:
            return load_tensors(path)["x"]
        except Exception:
            pass
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn((n, *teacher.data_shape), generator=gen)
    device = teacher.sigmas.device
    x = torch.cat([teacher.sample(z[i : i + batch_size].to(device), cond=cond[i : i + batch_size] if cond is not None else None)
                   .float().cpu() for i in range(0, n, batch_size)])
    save_tensors(path, {"x": x}, {"teacher": teacher.fingerprint(), "sampler": f"heun-{teacher.sampler_steps}"})
    return x


# --------------------------------------------------------------------------- evaluation


def _histogram(pred: Tensor) -> list[float]:
    counts = torch.bincount(pred, minlength=10).double()
    return [round(float(c), 4) for c in counts / max(len(pred), 1)]


def class_metrics(pred: Tensor, reference_share: list[float]) -> dict[str, Any]:
    hist = _histogram(pred)
    covered = sum(h >= 0.5 * r for h, r in zip(hist, reference_share))
    return {"class_histogram": hist, "classes_present": int(sum(h > 0 for h in hist)),
            "class_coverage": covered / 10, "max_class_share": max(hist)}


def evaluate_images(teacher, samples: Tensor, *, seed: int, cache_dir: Optional[Path] = None,
                    inception: str = "auto", clip_model: Optional[str] = None, log=None) -> dict[str, Any]:
    """All image metrics for generator ``samples``, with the teacher's (its multi-step sampler on the same noise and
    conditions) and the real data's as references; a text teacher's CLIP score with ``clip_model``."""
    from scoredistill.images.classifier import ClassifierSettings, load_classifier

    samples = samples.float()
    finite = torch.isfinite(samples.flatten(1)).all(1)
    non_finite = int((~finite).sum())
    latents = getattr(teacher, "data_space", "pixels") == "latents"
    samples = torch.nan_to_num(samples) if latents else torch.nan_to_num(samples).clamp(-1, 1)  # latents: clamped decoded
    n = len(samples)
    out: dict[str, Any] = {"num_samples": n, "non_finite": non_finite}
    if tuple(samples.shape[1:]) != tuple(teacher.data_shape):
        raise UserError(f"samples have shape {tuple(samples.shape[1:])} but the teacher makes {tuple(teacher.data_shape)}")
    t_samples = teacher_samples(teacher, n, seed, cache_dir)
    if latents:  # metrics on the decoded images (the teacher's VAE)
        from scoredistill.images.plugin import decoded

        samples, t_samples = decoded(teacher, samples).clamp(-1, 1), decoded(teacher, t_samples).clamp(-1, 1)
    teacher_out: dict[str, Any] = {"sampler": f"heun-{teacher.sampler_steps}", "nfe": teacher.sampler_nfe}
    target_out: dict[str, Any] = {}
    is_digits = getattr(teacher, "data", None) == "digits" and tuple(teacher.data_shape) == DIGITS_SHAPE
    real_train = real_test = None
    if is_digits:
        (real_train, _), (real_test, y_test) = digits("train"), digits("test")
        clf, info = load_classifier(CLASSIFIER_SETTINGS or ClassifierSettings(), cache_dir=cache_dir, log=log)
        extractor = clf.features
        f_gen, f_teacher = batch_features(samples, extractor), batch_features(t_samples, extractor)
        f_train, f_test = batch_features(real_train, extractor), batch_features(real_test, extractor)
        share = _histogram(y_test)
        out.update({"fid": round(frechet(f_gen, f_test), 4), "fid_train": round(frechet(f_gen, f_train), 4)})
        teacher_out.update({"fid": round(frechet(f_teacher, f_test), 4), "fid_train": round(frechet(f_teacher, f_train), 4)})
        target_out.update({"sampler": f"real train split ({len(real_train)})", "fid": round(frechet(f_train, f_test), 4)})
        out["fid_ratio_to_teacher"] = round(out["fid"] / max(teacher_out["fid"], 1e-12), 4)
        to_uint = lambda x: to_uint8(x).float()  # noqa: E731
        pred_gen, pred_teacher = clf.predict(to_uint(samples)), clf.predict(to_uint(t_samples))
        out.update(class_metrics(pred_gen, share))
        teacher_out.update(class_metrics(pred_teacher, share))
        labels = seeded_conditions(teacher, n, seed)
        if labels is not None and teacher.num_classes is not None:  # class labels: does each sample show its class?
            labels = labels.cpu()
            out["label_accuracy"] = round(float((pred_gen == labels).double().mean()), 4)
            teacher_out["label_accuracy"] = round(float((pred_teacher == labels).double().mean()), 4)
        target_out.update(class_metrics(clf.predict(to_uint(real_train)), share))
        out["classifier"] = {"arch": info["arch"], "test_accuracy": info["test_accuracy"]}
        out["fid_protocol"] = FID_PROTOCOL
    elif getattr(teacher, "data", None) is not None:
        real_train = real_test = teacher.real_data("train")
    if inception != "off" and real_test is not None:
        if inception_dir() is None and inception == "auto":
            out["fid_inception"] = None
            out["fid_inception_note"] = f"skipped: {INCEPTION_FILE} not cached (place it in /tmp or ${ENV_INCEPTION_DIR})"
        else:
            from cleanfid.resize import build_resizer

            ext, resize = inception_extractor(torch.device("cpu")), build_resizer("clean")
            f_ref = batch_features(real_test, ext, 50, resize)
            out["fid_inception"] = round(frechet(batch_features(samples, ext, 50, resize), f_ref), 4)
            teacher_out["fid_inception"] = round(frechet(batch_features(t_samples, ext, 50, resize), f_ref), 4)
            if is_digits:
                target_out["fid_inception"] = round(frechet(batch_features(real_train, ext, 50, resize), f_ref), 4)
    prompts = getattr(teacher, "prompts", None)
    if prompts:
        texts = [prompts[int(i)] for i in seeded_conditions(teacher, n, seed)]
        if clip_model is None:
            out["clip_score"], out["clip_score_note"] = None, SKIPPED_NOTE
            if log is not None:
                log(f"CLIP score {SKIPPED_NOTE}")
        else:
            model, processor = load_clip(clip_model, teacher.sigmas.device)
            out["clip_score"] = round(clip_score(samples, texts, model, processor), 4)
            teacher_out["clip_score"] = round(clip_score(t_samples, texts, model, processor), 4)
            out["clip_model"] = str(clip_model)
    out["teacher"] = teacher_out
    if target_out:
        out["target"] = target_out
    return out
