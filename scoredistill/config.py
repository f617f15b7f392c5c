"""From method + preset + ablations + ``--set`` overrides to one validated run config.

Layers, later wins (merged with OmegaConf)::

    defaults <- preset (problem) <- method <- preset (loss retuning) <- ablations <- --set key=value

The preset describes the problem (teacher, networks, budget); the method's role
choices and training settings win over it (``dmd2``'s five fake-score updates, a
method's ``fake_score: sample_itself``). The preset then retunes the method's own
loss terms (for 2-D points, ``regression`` uses L2 instead of LPIPS) but never
adds a term. A section that names a different component replaces the old one.
An ablation drops config keys or replaces sections whole. The merged dict is then
validated by pydantic: the fixed sections by :class:`RunConfig`, each component
section (``{component: NAME, ...settings}``) by that component's own ``Config``.
Every failure is a :class:`~scoredistill.errors.UserError` with one line.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ConfigDict, Field, FieldSerializationInfo, ValidationError, field_serializer, field_validator, model_validator

from scoredistill.errors import UserError, one_of
from scoredistill.lora import LoraSettings
from scoredistill.registry import ROLE_TABLE, Registry
from scoredistill.strict import check_strict_numbers, format_validation_error

LOSS_SECTION, LOSS_ROLE = "losses", "generator_loss"
#: run-config sections that name one component, and the role of that component (the loss terms are under LOSS_SECTION)
COMPONENT_SECTIONS: dict[str, str] = {r.section: r.name for r in ROLE_TABLE if "." not in r.section}
#: chosen on the command line (METHOD, --preset, --ablate), never by --set
COMMAND_LINE_KEYS = {"method": "METHOD (scoredistill run METHOD)", "preset": "--preset", "ablations": "--ablate"}
#: bounds that keep a typo from running forever or asking for all the memory
MAX_STEPS, MAX_BATCH, MAX_SAMPLES, MAX_SEED = 10**9, 2**24, 10**8, 2**63 - 1


class ComponentSpec(BaseModel):
    """A validated component choice: its name, weight (loss terms) and typed settings."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)
    component: str
    role: str
    config: BaseModel
    weight: float = 1.0

    @field_serializer("config")
    def _settings(self, config: BaseModel, info: FieldSerializationInfo) -> dict[str, Any]:
        """``model_dump`` writes the component's own settings (pydantic would write ``{}`` for a ``BaseModel`` field)."""
        return config.model_dump(mode=info.mode)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"component": self.component}
        if self.role == LOSS_ROLE:
            out["weight"] = self.weight
        out.update(self.config.model_dump(mode="json"))
        return out


class TrainConfig(BaseModel):
    """Optimisation settings shared by every method."""

    model_config = ConfigDict(extra="forbid")
    steps: int = Field(1000, ge=0, le=MAX_STEPS, description="generator updates")
    batch_size: int = Field(256, ge=1, le=MAX_BATCH, description="generator samples per step (and per fake-score update)")
    generator_lr: float = Field(1e-3, gt=0, description="Adam learning rate of the generator")
    fake_score_lr: float = Field(1e-3, gt=0, description="Adam learning rate of the fake score")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="Adam (beta1, beta2) of both optimisers")
    fake_score_warmup_steps: int = Field(0, ge=0, le=MAX_STEPS, description="fake-score updates before the first generator update")
    fake_updates_per_step: int = Field(1, ge=1, description="fake-score updates per generator update (TTUR)")
    grad_clip: Optional[float] = Field(None, gt=0, description="clip each network's gradient norm to this; null for none")
    lr_schedule: Literal["constant", "cosine"] = Field("constant", description="generator and fake-score learning rates over the generator steps")
    ema_decay: Optional[float] = Field(None, ge=0, lt=1, description="EMA of the generator's weights, used for sampling and evaluation")
    pair_batch_size: Optional[int] = Field(None, ge=1, le=MAX_BATCH, description="regression batch; default: batch_size")
    log_every: int = Field(10, ge=1, description="record losses (history.json, metrics.csv, TensorBoard, progress bar, hooks) every N generator steps")
    optimizer: Literal["adam", "adamw"] = Field("adam", description="optimiser of every trained network (adamw: decoupled weight decay); "
                                                                 "torch's fused kernel on CUDA and in a single CPU process (torch >= 2.4)")
    adam_eps: float = Field(1e-8, gt=0, description="epsilon of both optimisers")
    weight_decay: float = Field(0.0, ge=0, description="weight decay of both optimisers")
    module_lr: dict[str, Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict,
        description="learning rates of trained submodules by dotted name, e.g. {fake_score.gan_head: 1.0e-4}; "
                    "the rest of each network uses generator_lr / fake_score_lr")
    lora: Optional[LoraSettings] = Field(
        None, description="LoRA adapters for the generator and the fake score on one frozen base shared with the teacher "
                          "(instead of full copies); null: full copies")
    eval_with_ema: bool = Field(True, description="with ema_decay set: sample and evaluate with the EMA weights (false: the online weights)")
    checkpoint_every: Optional[int] = Field(
        500, ge=1, description="save a checkpoint (checkpoints/step-N) every N generator steps, and always at the end; null: only at the end")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept in the run folder (the newest; older ones are deleted)")
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="a non-finite loss or gradient: 'stop' the run (keeping the last good checkpoint) or 'skip' that update (counted in the logs)")
    max_skipped_fraction: float = Field(0.1, ge=0, le=1, description="on_nonfinite=skip: a run that skipped more than this share of its "
                                        "updates ends with exit code 1 (its metrics still written) instead of 'done'")
    sample_every: Optional[int] = Field(1000, ge=1, description="write samples_step{N}.png every N generator steps (in the background); null: never")
    sample_count: int = Field(2000, ge=1, description="samples drawn for each periodic picture")

    @model_validator(mode="after")
    def _module_lrs(self):
        for name, lr in self.module_lr.items():
            if name.split(".", 1)[0] not in ("generator", "fake_score") or "." not in name:
                raise ValueError(f"module_lr key '{name}' must be generator.SUBMODULE or fake_score.SUBMODULE")
        return self


class EvalConfig(BaseModel):
    """Evaluation at the end of a run: how many one-step samples, from which noise seed."""

    model_config = ConfigDict(extra="forbid")
    num_samples: int = Field(5000, ge=1, le=MAX_SAMPLES, description="generator (and teacher) samples evaluated")
    seed: int = Field(12345, ge=0, le=MAX_SEED, description="seed of the evaluation noise, the same for every run and method")
    clip_model: Optional[str] = Field(None, description="a local CLIP model folder (CLIPModel + CLIPProcessor files): the "
                                      "CLIP score of a text-to-image run's decoded samples against their prompts; "
                                      "unset: that metric is skipped")


class RuntimeConfig(BaseModel):
    """Where and how a run executes; does not change its numbers on CPU."""

    model_config = ConfigDict(extra="forbid")
    device: str = Field("cpu", description="torch device of every network; 'cuda' gives each process of a multi-process run its own GPU")
    num_threads: Optional[int] = Field(None, ge=1, le=4096, description="torch threads; tiny MLPs are fastest with 1")
    progress: bool = Field(True, description="show progress bars")
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp", description="with several processes (torchrun): 'ddp' replicates the generator and fake score, "
                           "'fsdp' shards them with FSDP2 (torch >= 2.6; large networks), and the teacher too "
                           "(runtime.fsdp_shard_teacher); checkpoints hold the full state, written by the main process")
    fsdp_sharding: Literal["full_shard", "shard_grad_op"] = Field(
        "full_shard", description="FSDP: 'full_shard' frees each unit's gathered weights after its forward and gathers "
                                  "them again for the backward; 'shard_grad_op' keeps them until the backward "
                                  "(more memory, one all-gather fewer)")
    fsdp_min_params: Optional[int] = Field(
        None, ge=1, description="FSDP: the smallest submodules holding at least this many parameters (none inside "
                                "another) each become a unit, gathered only while it runs; null: one unit per "
                                "trained network, and one per layer of the teacher")
    fsdp_shard_teacher: bool = Field(
        True, description="FSDP: shard the frozen teacher too (each process keeps 1/N of its weights, gathered unit "
                          "by unit as it runs, and whole for the evaluation on the main process); false: a whole "
                          "copy on every process")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="autocast the forward passes: bf16, or fp16 with dynamic loss scaling (CUDA only); weights stay fp32 "
                    "(under FSDP the weights a unit gathers are cast to it, gradients are reduced in fp32)")
    cast_weights: Literal["auto", "per_call", "per_update"] = Field(
        "auto", description="mixed precision: when the networks' convolution and linear weights are cast to it: per_call "
                            "(autocast, in every forward and backward), per_update (low-precision copies, refreshed after "
                            "each optimiser step, made once for the frozen teacher: the same numbers, fewer ops per call); "
                            "auto: per_update in one eager process (torch >= 2.4), else per_call")
    tf32: bool = Field(True, description="allow TF32 matrix products and convolutions on CUDA GPUs that have them")
    cudnn_benchmark: bool = Field(
        True, description="CUDA: let cuDNN time its convolution algorithms once per input shape and keep the fastest "
                          "(the first step of each shape is slower); false for repeatable GPU runs")
    compile: bool = Field(False, description="torch.compile the teacher, generator and fake score for training (GPUs: faster after a warm-up of minutes)")
    compile_mode: Optional[Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]] = Field(None, description="torch.compile mode: null (default), 'reduce-overhead' (CUDA graphs) or 'max-autotune'")
    cuda_graph: bool = Field(
        False, description="CUDA: after three eager iterations, capture an iteration's updates (generator and fake-score "
                           "steps) as one CUDA graph and replay it: the same numbers, paced by the GPU's kernels instead "
                           "of the host's dispatch; one eager process, no fp16 (scoredistill.cuda_graph)")
    gradient_checkpointing: bool = Field(
        False, description="recompute the trained networks' activations in the backward instead of keeping them "
                           "(diffusers' and transformers' gradient checkpointing): less memory, about one more forward")
    channels_last: bool = Field(False, description="keep the networks' 4-D weights in channels-last memory format (convolutional UNets on GPUs)")
    find_unused_parameters: bool = Field(False, description="DDP: allow trained parameters that a step does not use (slower)")
    tensorboard: Optional[bool] = Field(
        None, description="write TensorBoard scalars to RUN/tensorboard; null: when the tensorboard package is installed")
    debug_weight_hashes: bool = Field(
        False, description="debug: after every step, each process appends a hash of its weights to RUN/debug/weights.rankR.txt")

    @field_validator("device")
    @classmethod
    def _a_torch_device(cls, value: str) -> str:
        import torch

        try:
            torch.device(value)
        except (RuntimeError, ValueError):
            raise ValueError("not a torch device; allowed: cpu, cuda, cuda:N, mps, xpu, ...") from None
        return value

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        return "no" if value is False else value  # YAML reads a bare 'no' (--set runtime.mixed_precision=no) as false


class RunConfig(BaseModel):
    """The whole resolved configuration of a run, as written to ``config.yaml``."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    method: str
    preset: str
    ablations: list[str] = Field(default_factory=list)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    teacher: ComponentSpec
    generator: ComponentSpec
    fake_score: ComponentSpec
    losses: dict[str, ComponentSpec]
    fake_score_loss: Optional[ComponentSpec] = None
    pairs: Optional[ComponentSpec] = None
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    @field_validator("losses")
    @classmethod
    def _some_loss(cls, v: dict) -> dict:
        if not v:
            raise ValueError("no generator loss term is left: nothing would train the generator")
        return v

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method, "preset": self.preset, "ablations": list(self.ablations), "seed": self.seed}
        for key in COMPONENT_SECTIONS:
            spec = getattr(self, key)
            out[key] = spec.to_dict() if spec is not None else None
        out[LOSS_SECTION] = {name: spec.to_dict() for name, spec in self.losses.items()}
        for key in ("train", "eval", "runtime"):
            out[key] = getattr(self, key).model_dump(mode="json")
        return out

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.create(self.to_dict()))


# --------------------------------------------------------------------------- merging


def _merge(base: dict, over: dict) -> dict:
    """OmegaConf merge, except that a section naming a *different* component replaces the old one.

    ``fake_score: {component: sample_itself}`` over ``{component: mlp_denoiser, width: 128}``
    must not keep ``width``; a loss term keeps its ``weight`` unless the new one gives one.
    """
    base = copy.deepcopy(base)
    old_sections = _component_sections(base)
    for path, section in _component_sections(over).items():
        old = old_sections.get(path)
        if "component" in section and old is not None and old.get("component") != section["component"]:
            kept = {"weight": old["weight"]} if path[0] == LOSS_SECTION and "weight" in old else {}
            _replace(base, ".".join(path), kept)
    try:
        return OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(base), OmegaConf.create(over)), resolve=True)
    except OmegaConfBaseException as exc:
        raise UserError(f"cannot merge config: {str(exc).splitlines()[0]}") from None


def _component_sections(cfg: dict) -> dict[tuple[str, ...], dict]:
    """Every section of ``cfg`` that holds a component, by path (``("losses", "regression")``)."""
    out: dict[tuple[str, ...], dict] = {(k,): cfg[k] for k in COMPONENT_SECTIONS if isinstance(cfg.get(k), dict)}
    terms = cfg.get(LOSS_SECTION) if isinstance(cfg.get(LOSS_SECTION), dict) else {}
    out.update({(LOSS_SECTION, k): v for k, v in terms.items() if isinstance(v, dict)})
    return out


def _preset_losses(method_cfg: dict, preset_cfg: dict) -> dict:
    """The preset's retuning of the loss terms the method already has (it never adds a term)."""
    terms = preset_cfg.get(LOSS_SECTION) or {}
    return {LOSS_SECTION: {k: v for k, v in terms.items() if k in (method_cfg.get(LOSS_SECTION) or {})}}


def _drop(cfg: dict, dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    node = cfg
    for p in parents:
        node = node.get(p) or {}
    if isinstance(node, dict):
        node.pop(leaf, None)


def _replace(cfg: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = cfg
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = copy.deepcopy(value)


def parse_overrides(overrides: list[str]) -> dict:
    """``["a.b=1", "c=[1,2]"]`` -> nested dict, with YAML-typed values (OmegaConf dotlist)."""
    for item in overrides:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise UserError(f"--set expects key=value (for example train.steps=500), got '{item}'")
    out: dict = {}
    for item in overrides:  # one at a time, so that an error names its item
        try:
            one = OmegaConf.to_container(OmegaConf.from_dotlist([item]), resolve=True)
            out = OmegaConf.to_container(OmegaConf.merge(out, one), resolve=True)
        except (OmegaConfBaseException, yaml.YAMLError, ValueError, TypeError) as exc:  # a YAML tag (!!python/...) too
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"cannot parse --set {item!r}: {first} (values are plain YAML: numbers, strings, true/false, "
                            "null, [lists], {maps})") from None
    return out


def merged_config(registry: Registry, method: str, preset: str, ablations: list[str] = (), overrides: list[str] = ()) -> dict:
    """The raw merged config dict (before validation)."""
    m = registry.method(method)
    p = registry.preset(preset)
    problem = {k: v for k, v in p.config.items() if k not in (LOSS_SECTION, "fake_score_loss")}
    cfg = _merge({"method": method, "preset": preset, "ablations": list(ablations)}, problem)
    cfg = _merge(cfg, m.config)
    cfg = _merge(cfg, _preset_losses(m.config, p.config))
    for name in ablations:
        if name not in m.ablations:
            raise one_of("ablation", name, m.ablations, where=f" for method '{method}'")
        ab = m.ablations[name]
        for key in ab.drop:
            _drop(cfg, key)
        for key, value in ab.replace.items():
            _replace(cfg, key, value)
    if not cfg.get(LOSS_SECTION):
        raise UserError(
            f"ablating {', '.join(ablations)} leaves method '{method}' with no generator loss: "
            f"nothing would train the generator; ablate fewer of: {', '.join(sorted(m.ablations))}"
        )
    changes = parse_overrides(list(overrides))
    for key, where in COMMAND_LINE_KEYS.items():
        if key in changes:
            raise UserError(f"--set {key}=... cannot be used: the {key} is chosen on the command line with {where}")
    _check_new_terms(method, cfg.get(LOSS_SECTION) or {}, changes.get(LOSS_SECTION))
    return _merge(cfg, changes)


def _check_new_terms(method: str, terms: dict, changes: Any) -> None:
    """``--set losses.NAME.KEY=...`` for a term the method lacks must add it whole (with ``component``): else a typo."""
    for name, section in (changes or {}).items() if isinstance(changes, dict) else ():
        if name not in terms and not (isinstance(section, dict) and "component" in section):
            raise UserError(f"method '{method}' has no loss term '{name}'; its terms: {', '.join(sorted(terms))} "
                            f"(a new term needs losses.{name}.component=NAME)")


# --------------------------------------------------------------------------- validation


def validate_component(registry: Registry, section: str, role: str, raw: Any) -> ComponentSpec:
    if not isinstance(raw, dict) or "component" not in raw:
        allowed = ", ".join(sorted(registry.components[role]))
        raise UserError(f"config section '{section}' needs 'component: NAME' ({role} components: {allowed})")
    raw = dict(raw)
    name = raw.pop("component")
    weight = raw.pop("weight", 1.0) if role == LOSS_ROLE else 1.0
    info = registry.component(role, name)
    check_strict_numbers(info.config_model, raw, section)
    if isinstance(weight, bool):
        raise UserError(f"invalid config value '{section}.weight': expected a number, not a boolean (got {weight!r})")
    try:
        config = info.config_model.model_validate(raw)
    except ValidationError as err:
        raise UserError(format_validation_error(err, section, info.config_model)) from None
    try:
        weight = float(weight)
    except (TypeError, ValueError):
        raise UserError(f"invalid config value '{section}.weight': expected a number (got {weight!r})") from None
    return ComponentSpec(component=name, role=role, config=config, weight=weight)


def build_part(ctx: Any, section: str, role: str, raw: Optional[dict], default: str) -> Any:
    """Build the component of ``role`` that a loss term's setting ``section`` names (``{component: NAME, ...settings}``;
    ``default`` when it names none), e.g. a consistency loss's ``target`` network or ``curriculum``; one-line errors."""
    raw = {"component": default, **(raw or {})}
    spec = validate_component(ctx.hooks.registry, section, role, raw)
    return ctx.hooks.registry.component(role, spec.component).cls(spec.config, ctx)


def validate(registry: Registry, raw: dict) -> RunConfig:
    """Validate a merged config dict into a :class:`RunConfig` (one-line errors)."""
    data = dict(raw)
    for section, role in COMPONENT_SECTIONS.items():
        if data.get(section) is not None:
            data[section] = validate_component(registry, section, role, data[section])
    losses = data.get(LOSS_SECTION) or {}
    if not isinstance(losses, dict):
        raise UserError(f"config section '{LOSS_SECTION}' must map term names to components")
    data[LOSS_SECTION] = {k: validate_component(registry, f"{LOSS_SECTION}.{k}", LOSS_ROLE, v) for k, v in losses.items()}
    check_strict_numbers(RunConfig, {k: v for k, v in data.items() if k in ("seed", "train", "eval", "runtime")}, "")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise UserError(format_validation_error(err, "", RunConfig)) from None


def resolve(registry: Registry, method: str, preset: str, ablations: list[str] = (), overrides: list[str] = ()) -> RunConfig:
    return validate(registry, merged_config(registry, method, preset, list(ablations), list(overrides)))


def load_run_config(registry: Registry, path: Path) -> RunConfig:
    """Re-validate a run folder's ``config.yaml``."""
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except UnicodeDecodeError:
        raise UserError(f"cannot read run config {path}: it is not UTF-8 text (restore it from a copy)") from None
    except (OSError, OmegaConfBaseException, yaml.YAMLError, ValueError) as exc:
        raise UserError(f"cannot read run config {path}: {(str(exc).strip().splitlines() or [type(exc).__name__])[0]}") from None
    if not isinstance(raw, dict):
        raise UserError(f"run config {path} is not a mapping")
    return validate(registry, raw)
