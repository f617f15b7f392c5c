"""``scoredistill export RUN OUT``: a trained one-step generator as a diffusers model folder.

Each generator component knows how to export itself (:meth:`scoredistill.roles.Generator.export`);
this module provides the pieces they use and the command's driver:

* :func:`save_diffusers_model`: a diffusers ``ModelMixin`` saved with ``save_pretrained``
  plus its defining module copied into the folder (``auto_map``), so that
  ``diffusers.AutoModel.from_pretrained(OUT, trust_remote_code=True)`` loads it
  without scoredistill (used by the MLP generator, :mod:`scoredistill.export_models`);
* :func:`save_unet_generator`: for a generator that is a copy of a teacher's denoiser
  evaluated once at the top noise level, ``G(z) = D(sigma_max z, sigma_max)``:
  the network (``unet/`` or ``transformer/``, ``save_pretrained``) and ``sigma_max`` with
  what the teacher says of its parameterisation in ``scoredistill_generator.json``;
* :func:`export_run`: checks, loads the run, lets the generator write into a
  temporary folder, adds ``scoredistill_export.json`` (provenance) and renames the
  folder into place (a failed export leaves nothing behind).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from scoredistill.errors import UserError

README = "README.md"
PROVENANCE = "scoredistill_export.json"
UNET_INFO = "scoredistill_generator.json"
MODEL_MODULE = "scoredistill_generator"


def save_diffusers_model(model: Any, folder: Path) -> None:
    """``model.save_pretrained(folder)`` plus its module file, named in ``config.json`` for ``AutoModel``."""
    import inspect

    folder = Path(folder)
    model.save_pretrained(str(folder), safe_serialization=True)
    source = Path(inspect.getsourcefile(type(model)))
    shutil.copyfile(source, folder / f"{MODEL_MODULE}.py")
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {"AutoModel": f"{MODEL_MODULE}.{type(model).__name__}"}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_unet_generator(folder: Path, denoiser: Any, *, sigma_max: float, preconditioning: dict[str, Any], how_to_sample: str) -> None:
    """A one-step generator that is a denoiser copy evaluated once, ``G(z) = D(sigma_max z, sigma_max)``: the
    network (``denoiser.save_network(folder)``: ``unet/`` or ``transformer/``) and its settings.

    ``preconditioning`` is what the teacher says of how the network's output becomes ``D`` (for example
    ``{"type": "edm", "sigma_data": 0.5, "prediction_type": "epsilon"}``); ``how_to_sample``
    is the Markdown (with code) that the README shows.
    """
    from scoredistill.lora import AdapterView

    folder = Path(folder)
    net = getattr(denoiser, "unet", denoiser)  # the network inside a denoiser copy (an adapter view under LoRA)
    info = {"generator": "G(z) = D(sigma_max * z, sigma_max), z ~ N(0, I)", "sigma_max": float(sigma_max),
            "preconditioning": preconditioning}
    if isinstance(net, AdapterView) and net.shared.adapters[net.name].export == "lora":  # train.lora.export=lora
        net.save_lora(folder / "lora")
        net.base.save_config(str(folder / "lora"))  # the teacher network's architecture, for reference
        info["network"] = "lora"
        info["lora"] = "lora/pytorch_lora_weights.safetensors: a LoRA of the teacher's network (diffusers' format)"
        how_to_sample += LORA_SAMPLING
    else:
        if isinstance(net, AdapterView):  # train.lora.export=merged: the adapter merged into a full network
            sub = getattr(getattr(denoiser, "backbone", None), "subfolder", "unet")
            net.merged().save_pretrained(str(folder / sub), safe_serialization=True)
        elif hasattr(denoiser, "save_network"):
            sub = denoiser.save_network(folder)
        else:  # a bare diffusers network
            sub = "unet"
            denoiser.save_pretrained(str(folder / sub), safe_serialization=True)
        info["network"] = sub
    (folder / UNET_INFO).write_text(json.dumps(info, indent=2) + "\n")
    (folder / README).write_text(how_to_sample)


LORA_SAMPLING = """
## This folder holds a LoRA, not a UNet

The generator was trained as a LoRA of the teacher's UNet and exported as the adapter alone
(`train.lora.export=lora`): `lora/pytorch_lora_weights.safetensors`, in diffusers' LoRA
format (`alpha / r` folded into `lora_B`). Put it on the teacher's UNet with diffusers' own
loader, and sample as above with that denoiser in place of `D`:

```python
from scoredistill.images.loading import load_denoiser

D = load_denoiser("PATH/TO/THE/TEACHER").denoiser.eval()   # the teacher's folder (guidance 1)
D.unet.load_lora_adapter("PATH/TO/THIS/FOLDER/lora", prefix="unet", weight_name="pytorch_lora_weights.safetensors")
```

A pipeline of the teacher takes the same file with `pipe.load_lora_weights("PATH/TO/THIS/FOLDER/lora")`.
"""


def readme(title: str, provenance: dict[str, Any], body: str) -> str:
    """The README of an export: what it is, where it came from, how to sample it."""
    lines = [f"# {title}", "", "A one-step generator distilled by scoredistill: `x = G(z)` with `z ~ N(0, I)`.", ""]
    lines += [f"- {k}: `{v}`" for k, v in provenance.items()]
    return "\n".join(lines) + "\n\n" + body.strip() + "\n"


def export_run(run_dir: Path, out: Path, hooks: Any, online: bool = False) -> dict[str, Any]:
    """Export run ``run_dir``'s sampling generator (or its online weights) into the new folder ``out``."""
    from scoredistill.trainer import load_run

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"export folder '{out}' already exists and is not empty; choose another OUT")
    run = load_run(run_dir, hooks, online=online)
    config = run.config
    weights = "online" if online or config.train.ema_decay is None or not config.train.eval_with_ema else "ema"
    provenance = {"run": str(Path(run_dir).resolve()), "method": config.method, "preset": config.preset,
                  "ablations": list(config.ablations), "generator": config.generator.component,
                  "weights": weights, "latent_shape": list(run.models.generator.latent_shape),
                  "data_space": getattr(run.models.teacher, "data_space", "flat")}  # latents are labelled as latents
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        run.models.generator.eval().export(tmp, provenance)
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
        _shareable(tmp)
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return provenance


def _shareable(folder: Path) -> None:
    """Folders 0777 and files 0666 less the umask (temporary folders and files start private)."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def mlp_sampling_readme(provenance: dict[str, Any], class_name: str) -> str:
    body = f"""## Sampling

Needs `torch` and `diffusers` (scoredistill itself is not needed):

```python
import torch
from diffusers import AutoModel

g = AutoModel.from_pretrained("PATH/TO/THIS/FOLDER", trust_remote_code=True)  # the class is in {MODEL_MODULE}.py
x = g.sample(1000, seed=0)            # (1000, {provenance['latent_shape'][0]}): the same samples as `scoredistill sample RUN --num 1000 --seed 0`
z = torch.randn(16, *g.latent_shape)  # or any noise z ~ N(0, I) of shape (N, *latent_shape)
with torch.no_grad():
    x = g(z)
```

With scoredistill installed, `from scoredistill.export_models import {class_name}` and
`{class_name}.from_pretrained("PATH/TO/THIS/FOLDER")` does the same without remote code.
"""
    return readme(f"{provenance['method']} one-step generator ({provenance['preset']})", provenance, body)


def export_check(folder: Path, reference: torch.Tensor, seed: int) -> Optional[float]:
    """Max |difference| between the exported model's ``sample(n, seed)`` and ``reference`` (for tests and scripts)."""
    from diffusers import AutoModel

    g = AutoModel.from_pretrained(str(folder), trust_remote_code=True)
    return float((g.sample(len(reference), seed) - reference).abs().max())
