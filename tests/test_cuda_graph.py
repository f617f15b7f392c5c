"""``runtime.cuda_graph``: what can be checked without CUDA.

The graphs themselves (every registered method, eager against replayed, bit for bit; a whole
``train()``; a non-finite stop) are checked on a CUDA machine by
``benchmarks/gpu_cuda_graph_check.py``, whose last results are in ``benchmarks/README.md``.
Here: the refusals, and the host-side bookkeeping a replay does (the guard's records, the lr).
"""

from types import SimpleNamespace

import pytest
import torch

from scoredistill.config import RuntimeConfig
from scoredistill.cuda_graph import IterationGraph
from scoredistill.engine import Engine
from scoredistill.errors import UserError


@pytest.mark.parametrize("runtime,error", [
    (dict(), "runtime.device is cpu, and CUDA graphs need a CUDA device"),
    (dict(compile=True), "runtime.compile is on"),
    (dict(mixed_precision="bf16", compile=True, compile_mode="reduce-overhead"), "runtime.compile is on"),
])
def test_where_a_graph_cannot_work_is_a_one_line_error(runtime, error):
    with pytest.raises(UserError, match=error) as info:
        Engine(RuntimeConfig(cuda_graph=True, **runtime))
    assert "\n" not in str(info.value) and "set runtime.cuda_graph=false" in str(info.value)


def test_off_by_default():
    assert RuntimeConfig().cuda_graph is False
    Engine(RuntimeConfig())  # nothing refused


def test_a_replay_records_the_captured_updates_under_its_own_step_as_copies():
    """The guard's records at capture point at the graph's outputs, which the next replay overwrites:
    each replay appends copies, named by the generator step it is."""
    loss, flag = torch.tensor(1.5), torch.tensor(0.0)
    graph = IterationGraph()
    graph.observed = [("generator step 4", "generator", ["dm"], [loss], None),
                      ("a fake-score update of generator step 4", "fake_score", ["fake_score"], [loss], flag)]
    graph.captured_at = 3
    run = SimpleNamespace(step=9, guard=SimpleNamespace(pending=[]))
    graph._observe(run)
    loss.fill_(float("nan"))  # the next replay
    flag.fill_(1.0)
    run.step = 10
    graph._observe(run)
    first, second, third, fourth = run.guard.pending
    assert [r[0] for r in run.guard.pending] == ["generator step 10", "a fake-score update of generator step 10",
                                                 "generator step 11", "a fake-score update of generator step 11"]
    assert float(first[3][0]) == 1.5 and float(second[3][0]) == 1.5 and float(second[4]) == 0.0  # copies, not views
    assert torch.isnan(third[3][0]) and float(fourth[4]) == 1.0
    assert first[1:3] == ("generator", ["dm"]) and first[4] is None


def test_a_scheduled_lr_reaches_the_tensor_the_graph_reads_only_when_it_changes():
    group = {"lr": 0.5}
    lr = torch.full((), 0.5)
    graph = IterationGraph()
    graph.lrs = [(group, lr, 0.5)]
    graph._fill_lrs()
    assert float(lr) == 0.5
    group["lr"] = 0.25  # the schedule's step, on the host
    graph._fill_lrs()
    assert float(lr) == 0.25 and graph.lrs[0][2] == 0.25
    lr.fill_(7.0)  # not written again while the schedule keeps it
    graph._fill_lrs()
    assert float(lr) == 7.0
