"""The build of the compiled eager CPU path: a call's arguments are checked
before anything is built for it."""

import pytest
import torch

import torchblocks.functional as TF
from torchblocks._ops import _eager_cpu

pytestmark = pytest.mark.eager_cpu


def test_a_call_without_a_tensor_raises_before_any_build(monkeypatch):
    def build():
        raise AssertionError("a call that raises built the module first")

    monkeypatch.setattr(_eager_cpu, "_module", None)
    monkeypatch.setattr(_eager_cpu, "_build_error", None)
    monkeypatch.setattr(_eager_cpu, "_build", build)
    with pytest.raises(TypeError, match="relu: input must be a torch.Tensor, got NoneType"):
        TF.relu(None)
    with pytest.raises(TypeError):
        torch.nn.functional.relu(None)  # what native raises
