"""The counts of one training step of the book network (torchblocks.cli.bench.step):
held at or below the figures of the commit that introduced them, and a
counter that can see what it counts."""

import pytest
import torch

import torchblocks
from torchblocks.cli.bench import step

pytestmark = pytest.mark.python_path

# (Triton launches, other tensor ops, allocations, host-to-device uploads), by
# device and backend, measured when this test was written (a lower count is
# welcome: lower the figure). On the CPU the ops include the class-index
# check of the targets (an aminmax and two reads of it) that a GPU skips, and the
# gradients' fresh addresses after zero_grad() cost the optimizer one upload
# of its pointer table; a GPU's caching allocator hands the same ones back.
# The reference's exponentials are exp2((x - shift) * log2 e): a multiply more
# than exp(x - shift) each (47 -> 49 ops, 61 -> 63), 2.5x quicker on the CPU.
TODAY = {
    ("cpu", "reference"): (0, 49, 33, 0),
    ("cpu", "triton"): (9, 8, 19, 1),
    ("cuda", "reference"): (0, 63, 50, 0),  # the CPU's fast cross-entropy path reads targets: not on CUDA
    ("cuda", "triton"): (9, 5, 17, 1),
}


def test_the_book_training_step_costs_no_more_than_today(target):
    counts = step.count_training_step(target.device, batch=16)  # the counts of batch 128, 8x quicker
    launches, ops, allocations, uploads = TODAY[(target.device, target.backend)]
    assert counts.triton_launches <= launches, counts
    assert counts.tensor_ops <= ops, counts
    assert counts.allocations <= allocations, counts
    assert counts.host_uploads <= uploads, counts
    compiled_path_off = target.device == "cpu" and target.backend == "reference"  # reference-cpu-python
    assert ("the compiled eager CPU path off" in step.describe(counts)) == compiled_path_off


def test_the_counter_counts_ops_allocations_uploads_and_launches(target):
    x = torch.randn(64, device=target.device)
    host_step = torch.zeros(())
    counter = step._OpCounter([step._storage(host_step)])
    with step.count_triton_launches() as launches, counter:
        y = x * 2  # one op, one allocation
        y.add_(1)  # one op, in place
        y[:8]  # a view: nothing
        host_step.add_(1)  # host bookkeeping: not counted
        torchblocks.functional.relu(y)  # one Triton launch on the Triton backend; its output allocated
    assert counter.ops.get("aten::mul") == 1 and counter.ops.get("aten::add_") == 1, counter.ops
    assert counter.allocations == 2 and counter.host_uploads == 0, counter.ops
    assert launches[0] == (1 if target.backend == "triton" else 0)
    uploads = step._OpCounter()
    with uploads:
        torch.tensor([1.0, 2.0], device=target.device)
    assert uploads.host_uploads == 1


def test_bench_prints_the_step_counts(capsys):
    torchblocks.cli.bench.run([], "cpu", [torch.float32], quick=True)
    assert "Triton launches" in capsys.readouterr().out
