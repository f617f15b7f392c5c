"""``runtime.cast_weights=per_update``: low-precision weight copies instead of autocast's cast in every call.

The copies must change nothing but the number of ops: every test compares against autocast's own
per-call casts (``per_call``), bit for bit.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from scoredistill import checkpoint as ckpt
from scoredistill import hookimpl
from scoredistill.config import RuntimeConfig, resolve
from scoredistill.engine import Engine
from scoredistill.errors import UserError
from scoredistill.plugins import Hooks, make_plugin_manager
from scoredistill.precision import WeightCopies, without_weight_copies
from scoredistill.testing import WeightCasts
from scoredistill.trainer import build, generate, restore, save_checkpoint, setup, train, train_iteration

BF16 = torch.bfloat16


def _autocast(dtype=BF16):
    return torch.autocast("cpu", dtype=dtype)


class Net(nn.Module):
    """Every case the copies meet: conv and linear layers, a layer used twice, a tied weight, a GroupNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.twice = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 4)
        self.tied = nn.Linear(4, 4, bias=False)
        self.tied_too = nn.Linear(4, 4, bias=False)
        self.tied_too.weight = self.tied.weight

    def forward(self, x):
        h = self.twice(self.twice(self.norm(self.conv(x)).relu()))
        return self.tied_too(self.tied(self.head(h.mean(dim=(2, 3)))))


def _pair(seed: int = 0):
    torch.manual_seed(seed)
    plain = Net()
    return plain, copy.deepcopy(plain)


def _step(net: nn.Module, x: torch.Tensor, copies: WeightCopies | None = None, dtype=BF16):
    net.zero_grad(set_to_none=True)
    if copies is not None:
        copies.zero_grad()
    with _autocast(dtype):
        y = net(x)
    y.float().square().mean().backward()
    if copies is not None:
        copies.gradients_to_masters()
    return y


@pytest.mark.parametrize("dtype", [BF16, torch.float16])
def test_a_layer_with_copies_computes_autocasts_numbers_and_gradients_bit_for_bit(dtype):
    plain, mine = _pair()
    copies = WeightCopies(mine, dtype, "cpu")
    assert len(copies) == 6 and not any(t is mine.tied.weight for t in copies.masters)  # conv, twice, head; not the tied weight
    x = torch.randn(2, 3, 6, 6)
    a, b = _step(plain, x, dtype=dtype), _step(mine, x, copies, dtype)
    assert a.dtype == dtype and torch.equal(a, b)  # (autocast ran at that dtype)
    for (name, p), q in zip(plain.named_parameters(), mine.parameters()):
        assert p.grad is not None and q.grad is not None and q.grad.dtype == torch.float32, name
        assert torch.equal(p.grad, q.grad), name
    with torch.no_grad():  # a step moves the weights; the copies follow after refresh()
        for p, q in zip(plain.parameters(), mine.parameters()):
            p.sub_(0.1 * p.grad)
            q.sub_(0.1 * q.grad)
    copies.refresh()
    assert torch.equal(_step(plain, x, dtype=dtype), _step(mine, x, copies, dtype))


def test_the_copies_are_used_only_under_autocast_at_their_dtype_and_not_by_a_deep_copy():
    plain, mine = _pair()
    copies = WeightCopies(mine, BF16, "cpu")
    with torch.no_grad():
        mine.conv.weight.add_(1.0)  # the float32 weight moves and the copies are stale (no refresh)
        plain.conv.weight.add_(1.0)
        x = torch.randn(2, 3, 6, 6)
        assert torch.equal(mine(x), plain(x))  # no autocast: the float32 weights themselves
        with _autocast(torch.float16):
            assert torch.equal(mine(x), plain(x))  # autocast at another dtype: its own casts
        twin = copy.deepcopy(mine)
        with _autocast():
            assert torch.equal(twin(x), plain(x))  # a deep copy has its own weights: the layer's own forward
            assert not torch.equal(mine(x), plain(x))  # the stale copies are what the original uses (so the test can fail)
    assert "forward" not in without_weight_copies(copy.deepcopy(mine)).conv.__dict__  # what the hand-written loop compiles
    mine.conv.weight = nn.Parameter(plain.conv.weight.detach().clone())  # a new parameter object: its copy is not its
    with torch.no_grad(), _autocast():
        assert torch.equal(mine.conv(x), plain.conv(x))
    copies.remove()
    with torch.no_grad(), _autocast():
        assert torch.equal(mine(x), plain(x))


def test_a_frozen_weight_gives_its_copy_no_gradient_and_a_thawed_one_does():
    _, mine = _pair()
    copies = WeightCopies(mine, BF16, "cpu")
    mine.conv.requires_grad_(False)
    _step(mine, torch.randn(2, 3, 6, 6), copies)
    assert mine.conv.weight.grad is None and mine.head.weight.grad is not None
    mine.conv.requires_grad_(True)
    _step(mine, torch.randn(2, 3, 6, 6), copies)
    assert mine.conv.weight.grad is not None


@pytest.mark.parametrize("precision,cast,compile_,error", [
    ("no", "per_update", False, "runtime.mixed_precision is 'no'"),
    ("bf16", "per_update", True, "runtime.compile is on"),
])
def test_per_update_where_it_cannot_work_is_a_one_line_error(precision, cast, compile_, error):
    with pytest.raises(UserError, match=error) as info:
        Engine(RuntimeConfig(mixed_precision=precision, cast_weights=cast, compile=compile_))
    assert "\n" not in str(info.value) and "use per_call or auto" in str(info.value)


@pytest.mark.parametrize("precision,compile_,cast,want", [
    ("bf16", False, "auto", BF16), ("bf16", True, "auto", None), ("no", False, "auto", None),
    ("bf16", False, "per_call", None), ("bf16", False, "per_update", BF16),
])
def test_auto_takes_the_copies_in_one_eager_mixed_precision_process(precision, compile_, cast, want):
    assert Engine(RuntimeConfig(mixed_precision=precision, compile=compile_, cast_weights=cast)).weight_copies_dtype == want


# --------------------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def unet_teacher(tmp_path_factory):
    """A tiny 3x8x8 UNet2DModel with attention (linear layers as well as convolutions), saved as a user would."""
    import diffusers

    folder = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                          norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                          up_block_types=("AttnUpBlock2D", "UpBlock2D")).save_pretrained(folder / "unet")
    diffusers.EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5).save_pretrained(folder / "scheduler")
    return folder


def _unet(folder, *more):
    return ("dmd", "digits", ["regression"], ["teacher.component=diffusers_unet", f"teacher.path={folder}",
            "generator.component=unet_generator", "fake_score.component=unet_denoiser", "train.batch_size=4",
            "train.ema_decay=0.9", "train.fake_score_warmup_steps=0", *more])


CASES = {
    "unet": lambda folder: _unet(folder),
    "unet-channels_last-clip": lambda folder: _unet(folder, "runtime.channels_last=true", "train.grad_clip=0.01"),
    # MLPs; DMD2: the GAN head on the fake score's features, which is frozen in the generator step, five fake updates
    # per step, and the fused optimiser that on_nonfinite=skip uses
    "toy2d-dmd2-skip": lambda folder: ("dmd2", "toy2d", [], ["train.batch_size=32", "pairs.num_pairs=64",
                                                             "train.fake_score_warmup_steps=0", "train.on_nonfinite=skip"]),
}


def _run(hooks, tmp_path, case, cast, name):
    method, preset, ablations, overrides = case
    config = resolve(hooks.registry, method, preset, ablations,
                     [*overrides, "runtime.mixed_precision=bf16", f"runtime.cast_weights={cast}", "runtime.progress=false"])
    run = build(config, hooks, tmp_path / name)
    setup(run)
    return run


def _state(run):
    out = {f"{name}.{k}": v.detach().clone() for name, net in run.trained.items() for k, v in net.wrapper.net.state_dict().items()}
    out.update({f"ema.{k}": v.detach().clone() for k, v in run.ema.state_dict().items()} if run.ema is not None else {})
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_training_with_copies_is_bit_for_bit_trainings_with_autocasts_casts(hooks, tmp_path, unet_teacher, case):
    runs, logs = {}, {}
    for cast in ("per_call", "per_update"):  # one after the other: build() seeds the global generator both use
        runs[cast] = _run(hooks, tmp_path, CASES[case](unet_teacher), cast, cast)
        logs[cast] = [train_iteration(runs[cast]) for _ in range(3)]
    assert runs["per_call"].trained["generator"].copies is None and runs["per_call"].teacher_copies is None
    assert all(len(net.copies) > 0 for net in runs["per_update"].trained.values())
    assert len(runs["per_update"].teacher_copies) > 0 or case.startswith("toy2d")  # the mixture teacher has no layers
    for a, b in zip(logs["per_call"], logs["per_update"]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (a, b)
    a, b = _state(runs["per_call"]), _state(runs["per_update"])
    assert a.keys() == b.keys() and not [k for k in a if not torch.equal(a[k], b[k])]
    assert any(not torch.equal(v, w) for v, w in zip(a.values(), _state(_run(hooks, tmp_path, CASES[case](unet_teacher),
                                                                             "per_call", "untrained")).values()))
    samples = [generate(run, 16, seed=1) for run in runs.values()]  # outside autocast: the float32 weights
    assert torch.equal(*samples)


def _methods():
    return sorted(Hooks(make_plugin_manager()).registry.methods)


@pytest.mark.parametrize("method", _methods())
def test_every_method_trains_bit_for_bit_with_copies_on_toy2d(hooks, tmp_path, method):
    """Over the registry (timm-style): each method's iterations, in bf16, with copies and with autocast's casts."""
    case = (method, "toy2d", [], ["train.batch_size=32", "pairs.num_pairs=64", "train.fake_score_warmup_steps=0"])
    states = {}
    for cast in ("per_call", "per_update"):
        run = _run(hooks, tmp_path, case, cast, cast)
        assert all((net.copies is not None and len(net.copies) > 0) == (cast == "per_update") for net in run.trained.values())
        logs = [train_iteration(run) for _ in range(2)]
        states[cast] = (_state(run), [{k: v.clone() for k, v in d.items()} for d in logs])
    (a, la), (b, lb) = states["per_call"], states["per_update"]
    assert not [k for k in a if not torch.equal(a[k], b[k])]
    assert all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(la, lb))


def test_an_iteration_with_copies_casts_no_weight_and_issues_fewer_ops(hooks, tmp_path, unet_teacher):
    counts = {}
    for cast in ("per_call", "per_update"):
        run = _run(hooks, tmp_path, CASES["unet"](unet_teacher), cast, cast)
        train_iteration(run)  # lazy state outside the count
        mode = WeightCasts([*run.models.teacher.parameters(), *(p for net in run.trained.values() for p in net.params)])
        with mode:
            train_iteration(run)
        counts[cast] = mode
    layers = [m for m in run.models.generator.modules() if type(m) in (nn.Conv2d, nn.Linear)]
    tensors = sum(1 + (m.bias is not None) for m in layers)
    # per call: the teacher and G once, the fake score twice (the KL gradient's query, then its own update)
    assert counts["per_call"].casts == 4 * tensors
    assert counts["per_update"].casts == 0
    # and their backward casts: the per-update path adds two foreach copies per update (gradients, refresh)
    saved = counts["per_call"].ops - counts["per_update"].ops
    assert saved >= 4 * tensors + 2 * tensors - 4, (counts["per_call"].ops, counts["per_update"].ops, tensors)


def test_a_resumed_run_with_copies_continues_bit_for_bit(hooks, tmp_path, unet_teacher):
    whole = _run(hooks, tmp_path, CASES["unet"](unet_teacher), "per_update", "whole")
    for _ in range(2):
        train_iteration(whole)
    path = save_checkpoint(whole)
    for _ in range(2):
        train_iteration(whole)
    resumed = _run(hooks, tmp_path, CASES["unet"](unet_teacher), "per_update", "resumed")
    restore(resumed, ckpt.load(path))
    for _ in range(2):
        train_iteration(resumed)
    a, b = _state(whole), _state(resumed)
    assert not [k for k in a if not torch.equal(a[k], b[k])]


class ShrinkG:
    """A plugin that sets the generator's weights in place when training starts."""

    @hookimpl
    def scoredistill_train_start(self, run):
        with torch.no_grad():
            for p in run.models.generator.parameters():
                p.mul_(0.5)


def test_weights_a_plugin_sets_at_train_start_are_the_ones_the_first_step_uses(tmp_path, unet_teacher):
    finals = {}
    for cast in ("per_call", "per_update"):
        pm = make_plugin_manager()
        pm.register(ShrinkG(), name="shrink_g")
        hooks = Hooks(pm)
        method, preset, ablations, overrides = CASES["unet"](unet_teacher)
        config = resolve(hooks.registry, method, preset, ablations, [
            *overrides, "runtime.mixed_precision=bf16", f"runtime.cast_weights={cast}", "runtime.progress=false",
            "train.steps=2", "train.sample_every=null", "train.checkpoint_every=null"])
        run = build(config, hooks, tmp_path / cast)
        train(run)
        finals[cast] = _state(run)
    a, b = finals["per_call"], finals["per_update"]
    assert not [k for k in a if not torch.equal(a[k], b[k])]
