"""The non-finite guard's host work does not grow with the number of parameter tensors (a GPU run is host-bound when it does).

On a GPU whose iteration is launch-bound, every aten op the host issues costs about as much as
a kernel. The guard keeps each update's loss terms and one gradient flag (a single foreach op
over all the gradients) as they are and stacks them when it checks, so its check at log steps
and its ``skip`` test on every update cost a handful of ops whatever the network (they were
three per value: 13,167 ops for a check after ten CIFAR-UNet iterations). Counted on CPU with a
dispatch mode, on a diffusers UNet.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from scoredistill import trainer
from scoredistill.config import resolve
from scoredistill.images.testing import tiny_diffusers_teacher_folder
from scoredistill.plugins import Hooks, make_plugin_manager


class OpCount(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = self.outputs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        self.outputs += len(out) if isinstance(out, (list, tuple)) else int(out is not None)
        return out


def _unet_run(hooks, tmp_path, *overrides: str):
    folder = tiny_diffusers_teacher_folder(tmp_path / "teacher")
    config = resolve(hooks.registry, "dmd", "digits", ["regression"],
                     ["teacher.component=diffusers_unet", f"teacher.path={folder}", "generator.component=unet_generator",
                      "fake_score.component=unet_denoiser", "train.batch_size=2", "train.fake_updates_per_step=1",
                      "runtime.progress=false", "train.fake_score_warmup_steps=0", *overrides])
    run = trainer.build(config, Hooks(make_plugin_manager()), tmp_path / "run")
    trainer.setup(run)
    trainer.train_iteration(run)  # lazy state outside the counts
    run.guard.check(run)
    return run


def _ops(fn) -> int:
    with OpCount() as mode:
        fn()
    return mode.ops


@pytest.mark.parametrize("grad_clip", ["null", "1.0"])
def test_the_guards_check_costs_a_few_ops_per_update(hooks, tmp_path, grad_clip):
    run = _unet_run(hooks, tmp_path, f"train.grad_clip={grad_clip}")
    tensors = len(run.trained["generator"].params)
    assert tensors > 40  # the UNet: many parameter tensors, so a per-tensor cost would show
    for _ in range(5):
        trainer.train_iteration(run)
    assert len(run.guard.pending) == 10  # a generator and a fake-score update per iteration
    assert all(flag is not None for *_, flag in run.guard.pending)  # the gradients are watched
    ops = _ops(lambda: run.guard.check(run))
    assert ops <= 12, ops  # two stacks and their tests, and the host read; not one or more per value


def test_the_gradient_check_is_one_op_whatever_the_number_of_tensors(hooks, tmp_path):
    run = _unet_run(hooks, tmp_path)
    net = run.trained["generator"]
    assert len(net.params) > 40
    with OpCount() as mode:
        flag = run.engine.check_gradients(net.wrapper, net.params, None)
    assert mode.ops <= 2, mode.ops  # the flag's zero and one foreach check
    assert mode.outputs <= 2, mode.outputs  # a per-tensor norm (_foreach_norm) gave one output per parameter tensor
    assert flag.shape == ()  # what the guard keeps per update


def test_skipping_non_finite_updates_costs_a_few_ops_per_update(hooks, tmp_path):
    stop = _unet_run(hooks, tmp_path / "stop")
    skip = _unet_run(hooks, tmp_path / "skip", "train.on_nonfinite=skip")
    extra = _ops(lambda: trainer.train_iteration(skip)) - _ops(lambda: trainer.train_iteration(stop))
    assert 0 < extra <= 2 * 12, extra  # per update: one stack of its values, isfinite, all, the flag and its use
    assert float(skip.guard.skipped) == 0


def test_a_non_finite_entry_in_one_of_many_gradient_tensors_is_caught(hooks, tmp_path):
    run = _unet_run(hooks, tmp_path)
    original = run.engine.check_gradients

    def poisoned(wrapper, params, max_norm, watch=True):  # one NaN in one of the gradient tensors, after the backward
        params[len(params) // 2].grad.view(-1)[0] = float("nan")
        return original(wrapper, params, max_norm, watch)

    run.engine.check_gradients = poisoned
    trainer.train_iteration(run)
    with pytest.raises(trainer.TrainingStopped, match="non-finite gradient of the generator at generator step 2"):
        run.guard.check(run)


@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("max_norm", [None, 1.0])
def test_the_gradient_flag_is_set_exactly_when_a_gradient_is_not_finite(bad, max_norm):
    from scoredistill.config import RuntimeConfig
    from scoredistill.engine import Engine

    engine = Engine(RuntimeConfig())
    try:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.SiLU(), torch.nn.Linear(5, 2))
        net(torch.randn(4, 3)).square().sum().backward()
        params = list(net.parameters())
        params[0].grad[0, 0] = -0.0  # a signed zero and a subnormal: a scale that rounded would change them
        params[1].grad[1] = 1e-40
        if bad is not None:
            params[2].grad[1, 3] = bad
        before = [p.grad.clone() for p in params]
        flag = engine.check_gradients(net, params, max_norm)
        expected = not all(bool(torch.isfinite(g).all()) for g in before)  # independent: each gradient read on its own
        assert flag.shape == () and float(flag) == float(expected)
        if max_norm is None:  # the check leaves every gradient as it was, bit for bit
            for p, g in zip(params, before):
                assert torch.equal(p.grad.view(torch.int32), g.view(torch.int32))
        assert engine.check_gradients(net, params, max_norm, watch=False) is None
    finally:
        engine.close()
