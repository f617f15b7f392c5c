"""``scoredistill export`` of a few-step generator: the network, the teacher's scheduler config and how to sample.

The folder holds the trainable copy of the teacher's network (``unet/`` or ``transformer/``,
``save_pretrained``; a ``UNet2DConditionModel`` with LCM's guidance embedding records
``time_cond_proj_dim`` and takes ``timestep_cond``), ``scheduler/`` (the teacher's config, which
with ``preconditioning`` says how the network's output becomes the denoiser ``D``) and
``scoredistill_generator.json``: the chain's noise levels, the parameterisation of ``G`` on top of
``D`` (``denoiser``: ``G = D``; ``consistency``: Song et al. 2023's ``c_skip``/``c_out``) and the
guidance embedding's settings. A network whose diffusers class has no ``time_cond_proj_dim``
(``UNet2DModel``) gets its ``cond_proj`` weight in ``guidance_cond_proj.safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from scoredistill.errors import UserError
from scoredistill.io import save_tensors

INFO = "scoredistill_generator.json"
COND_PROJ = "guidance_cond_proj.safetensors"


def export_fewstep(generator: Any, folder: Path, provenance: dict[str, Any]) -> None:
    den, c = generator.denoiser, generator.config
    if not (hasattr(den, "describe") and hasattr(den, "save_network")):
        raise UserError("export: this few-step generator's network is an MLP of flat data, not a diffusers network; "
                        "sample it with 'scoredistill sample RUN --steps K'")
    folder = Path(folder)
    info: dict[str, Any] = {
        "generator": "K-step chain: x = s_0 z; for k: x0 = G(x, s_k); x = x0 + s_{k+1} eps_k; output x0 (z, eps_k ~ N(0, I))",
        "chain_sigmas": [float(s) for s in generator.chain], "network": den.save_network(folder),
        "preconditioning": den.describe(), "parameterization": c.parameterization,
        "sigma_min": generator.sigma_min, "sigma_data": generator.sigma_data, "guidance": None}
    if c.parameterization == "consistency":
        info["consistency"] = ("G = c_skip x + c_out F, F = (D - c_skip_edm x) / c_out_edm, c_skip = sd^2 / ((s - s_min)^2 + sd^2), "
                               "c_out = sd (s - s_min) / sqrt(sd^2 + s^2), c_skip_edm = sd^2 / (s^2 + sd^2), c_out_edm = s sd / sqrt(s^2 + sd^2)")
    if generator.guidance is not None:
        unet = den.unet
        native = "time_cond_proj_dim" in unet.config
        info["guidance"] = {
            "embedding_dim": generator.guidance.dim, "guidance_scale": c.guidance_scale, "guidance_range": list(c.guidance_range),
            "embedding": "LatentConsistencyModelPipeline.get_guidance_scale_embedding(g - 1, embedding_dim)",
            "input": "timestep_cond" if native else f"{COND_PROJ}: cond_proj(embedding) added to time_embedding's input"}
        if not native:
            save_tensors(folder / COND_PROJ, {"weight": unet.time_embedding.cond_proj.weight.detach().cpu().contiguous()})
    if generator.scheduler_config:
        (folder / "scheduler").mkdir()
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(generator.scheduler_config, indent=2) + "\n")
    (folder / INFO).write_text(json.dumps(info, indent=2) + "\n")
    k = len(generator.chain)
    head = [f"# {provenance['method']} {k}-step generator ({provenance['preset']})", "",
            f"A few-step generator distilled by scoredistill: a {k}-step chain of `G(x_s, s)` from `z ~ N(0, I)`.", ""]
    head += [f"- {key}: `{value}`" for key, value in provenance.items()]
    (folder / "README.md").write_text("\n".join(head) + "\n\n" + SAMPLING.format(k=k))


SAMPLING = """## Sampling

`scoredistill_generator.json` holds the {k}-step chain (`chain_sigmas`), how `G(x, s)` is read
from the network (`preconditioning`, `parameterization`) and, for a generator conditioned on
the guidance scale `g`, its embedding (`guidance`). The network is a diffusers model
(`network`); with scoredistill installed, `load_denoiser("PATH/TO/THIS/FOLDER").denoiser`
(from `scoredistill.images.loading`) is its denoiser `D(x, s, cond)`. The run itself samples
with `scoredistill sample RUN --steps K [--guidance-scale G]`.
"""
