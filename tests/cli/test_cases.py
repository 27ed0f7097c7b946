"""The block table ``torchblocks check`` runs (torchblocks.cli.cases.BLOCKS),
run here too: every case at parity with its native twin on each target and
dtype, and the float64 cases marked for it through ``gradcheck`` (under the
slow interpreter the blocks' own test files gradcheck the kernels)."""

import pytest
import torch

from torchblocks.cli.cases import ALL_DTYPES, BLOCKS
from torchblocks.testing import parity, twin

# the fused head's cases ignore a row: the Python path, so no reference-cpu variant
BLOCK_PARAMS = [pytest.param(block, id=block.name,
                             marks=pytest.mark.python_path if block.name == "dense_cross_entropy" else ())
                for block in BLOCKS]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("block", BLOCK_PARAMS)
def test_every_case_at_parity(target, block, dtype):
    for case in block.cases(torch.device(target.device), dtype):
        report = parity(case.ours, case.native, case.inputs)
        assert report.ok, f"{case.label}: {report}"


@pytest.mark.parametrize("block", BLOCK_PARAMS)
def test_gradcheck(target, block):
    if target.interpreted:
        pytest.skip("the Triton kernels are gradchecked by each block's own test file")
    for case in block.cases(torch.device(target.device), torch.float64):
        if case.gradcheck:
            inputs = [twin(t, t.is_floating_point()) for t in case.inputs]
            assert torch.autograd.gradcheck(case.ours, inputs), case.label
