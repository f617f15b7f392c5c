"""A one-step generator distilled from a text-to-image pipeline, exported as a complete diffusers pipeline folder.

The folder holds the teacher pipeline's own parts (VAE, tokenizers, text encoders, copied as they
are), the distilled network (``unet/`` or ``transformer/``) and a scheduler set up so that one
step of the pipeline is the generator ``G(z, c) = D(sigma_max z, sigma_max, c)``:

* VP UNets (SD 1.x / 2.x, SDXL): ``EulerDiscreteScheduler`` with ``timestep_spacing="trailing"``:
  its one step starts at the top timestep, ``init_noise_sigma = sigma_max`` scales the noise to
  ``x = sigma_max z``, ``scale_model_input`` divides by ``sqrt(1 + sigma^2)`` (the VP network's
  input), and the Euler step to ``sigma = 0`` lands on the network's ``x_0`` estimate, ``D``;
* flow transformers (SD3, Flux): ``FlowMatchEulerDiscreteScheduler``: one step from ``t = 1`` (the
  noise itself) to 0 is ``z - v_hat``, the flow ``D`` at the top level (Flux's dynamic shift leaves
  ``t = 1`` where it is).

The pipeline is called with ``guidance_scale=1`` (the generator distils the guided teacher: it
needs no guidance of its own); a guidance-distilled Flux transformer is called with the guidance
embedding it was distilled with (``teacher.flux_guidance``), which FluxPipeline takes as its
``guidance_scale``. Flux takes its latents packed 2x2 into tokens and gives them back packed (its
README shows both).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

from scoredistill.errors import UserError

PIPELINE_README = """## Sampling with diffusers alone

This folder is a complete diffusers pipeline ({pipeline}): the teacher's VAE, tokenizers and text
encoders, the distilled `{network}/`, and a `{scheduler}` set up for one step.

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("PATH/TO/THIS/FOLDER")
images = pipe("a photo of a cat", num_inference_steps=1, guidance_scale=1.0).images
```

`latents` of shape `(N, {shape})` (the VAE's latents, not pixels) fix the noise:
`scoredistill sample RUN --num N --seed S` draws `z = torch.randn((N, {shape}), generator=torch.Generator().manual_seed(S))`
and writes the prompt index of each sample to `OUT_labels.npy`; with those prompts,

```python
z = torch.randn((N, {shape}), generator=torch.Generator().manual_seed(S))
latents = pipe(prompts, latents=z, num_inference_steps=1, guidance_scale=1.0, output_type="latent").images
```

gives `scoredistill sample`'s latents (its `.npy`), and `output_type="pil"` their decoded images. A run that set
`teacher.max_sequence_length` (SD3, Flux) encoded its prompts with that many T5 tokens: pass the same
`max_sequence_length=` to the pipeline.
"""


FLUX_README = """## Sampling with diffusers alone

This folder is a complete diffusers pipeline (FluxPipeline): the teacher's VAE, tokenizers and text
encoders, the distilled `transformer/`, and a `FlowMatchEulerDiscreteScheduler` for one step. The
generator was distilled with the guidance embedding at {guidance}: FluxPipeline's `guidance_scale`.

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("PATH/TO/THIS/FOLDER")
images = pipe("a photo of a cat", num_inference_steps=1, guidance_scale={guidance}, height={height}, width={width}{msl}).images
```

Flux takes its latents packed 2x2 into tokens. `scoredistill sample RUN --num N --seed S` draws
`z = torch.randn((N, {shape}), generator=torch.Generator().manual_seed(S))` (the VAE's latents, not
pixels) and writes the prompt index of each sample to `OUT_labels.npy`; with those prompts,

```python
z = torch.randn((N, {shape}), generator=torch.Generator().manual_seed(S))
n, c, h, w = z.shape
packed = z.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), c * 4)
out = pipe(prompts, latents=packed, num_inference_steps=1, guidance_scale={guidance}, height={height}, width={width},
           output_type="latent"{msl}).images
latents = out.view(n, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)
```

gives `scoredistill sample`'s latents (its `.npy`), and `output_type="pil"` their decoded images.{msl_note}
"""


def pipeline_folder(teacher: Any) -> Optional[Path]:
    """The teacher's pipeline folder where one step of a diffusers pipeline can reproduce its generator, else ``None``."""
    vae_dir = getattr(teacher, "vae_dir", None)
    if vae_dir is None or not (vae_dir.parent / "model_index.json").is_file():
        return None
    kind = getattr(teacher, "parameterisation", None)
    if kind == "vp" and not getattr(teacher, "terminal", False) and (vae_dir.parent / "unet").is_dir():
        return vae_dir.parent
    if kind == "flow" and (vae_dir.parent / "transformer").is_dir():
        return vae_dir.parent
    return None


def one_step_scheduler(kind: str, scheduler_config: dict) -> Any:
    import diffusers

    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    if kind == "vp":
        return diffusers.EulerDiscreteScheduler.from_config({**config, "timestep_spacing": "trailing", "final_sigmas_type": "zero",
                                                             "use_karras_sigmas": False, "interpolation_type": "linear"})
    return diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)


def export_pipeline(folder: Path, generator: Any, source: Path, kind: str, scheduler_config: dict, readme_head: str) -> None:
    """Write the pipeline folder (see the module docstring) into ``folder``."""
    folder = Path(folder)
    den = generator.denoiser
    network = den.save_network(folder)
    index = json.loads((source / "model_index.json").read_text())
    for part, entry in index.items():
        if part.startswith("_") or part in (network, "scheduler") or not (isinstance(entry, list) and entry and entry[0]):
            continue
        if not (source / part).is_dir():
            raise UserError(f"the teacher pipeline '{source}' no longer holds {part}/: the export needs it")
        shutil.copytree(source / part, folder / part)
    scheduler = one_step_scheduler(kind, scheduler_config)
    scheduler.save_pretrained(str(folder / "scheduler"))
    index["scheduler"] = ["diffusers", type(scheduler).__name__]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    shape = ", ".join(map(str, generator.latent_shape))
    if hasattr(den.backbone, "pack"):  # Flux: packed latents, the guidance embedding, no default image size of ours
        vae = json.loads((source / "vae" / "config.json").read_text())
        scale = 2 ** (len(vae.get("block_out_channels") or [0] * 4) - 1)
        _, h, w = generator.latent_shape
        guidance = getattr(den.backbone, "guidance", None)
        msl = getattr(generator, "max_sequence_length", None)  # the T5 tokens the run's prompts were encoded with
        body = FLUX_README.format(guidance=1.0 if guidance is None else guidance, height=h * scale, width=w * scale, shape=shape,
                                  msl=f", max_sequence_length={msl}" if msl else "",
                                  msl_note="" if msl else " (The prompts were encoded with the pipeline's default T5 length.)")
    else:
        body = PIPELINE_README.format(pipeline=index.get("_class_name", "DiffusionPipeline"), network=network,
                                      scheduler=type(scheduler).__name__, shape=shape)
    (folder / "README.md").write_text(readme_head.rstrip() + "\n\n" + body)
