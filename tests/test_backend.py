import subprocess
import sys

import pytest
import torch

import torchblocks
from torchblocks import backend


def test_default_is_auto():
    assert torchblocks.get_backend() == "auto"


def test_set_backend_switches():
    try:
        for name in ("reference", "triton", "auto"):
            torchblocks.set_backend(name)
            assert torchblocks.get_backend() == name
    finally:
        torchblocks.set_backend("auto")


def test_use_backend_restores_the_previous_one():
    with torchblocks.use_backend("reference"):
        assert torchblocks.get_backend() == "reference"
        with torchblocks.use_backend("triton"):
            assert torchblocks.get_backend() == "triton"
        assert torchblocks.get_backend() == "reference"
    assert torchblocks.get_backend() == "auto"


def test_use_backend_restores_on_exception():
    with pytest.raises(KeyError):
        with torchblocks.use_backend("reference"):
            raise KeyError("boom")
    assert torchblocks.get_backend() == "auto"


@pytest.mark.parametrize("name", ["cuda", "Triton", "", None])
def test_unknown_name_raises_and_keeps_the_backend(name):
    with pytest.raises(ValueError, match=f"name must be one of 'auto', 'triton', 'reference', got {name!r}"):
        torchblocks.set_backend(name)
    assert torchblocks.get_backend() == "auto"


def test_which_implementation_runs(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.setattr(backend, "TRITON_AVAILABLE", True)
    monkeypatch.setattr(backend, "INTERPRETER", True)
    with torchblocks.use_backend("auto"):
        assert not backend.use_triton(cpu)  # auto: CPU tensors take the reference even under the interpreter
    with torchblocks.use_backend("reference"):
        assert not backend.use_triton(cpu)
    with torchblocks.use_backend("triton"):
        assert backend.use_triton(cpu)
    monkeypatch.setattr(backend, "INTERPRETER", False)
    with torchblocks.use_backend("triton"), pytest.raises(RuntimeError, match="set the environment variable TRITON_INTERPRET=1"):
        backend.use_triton(cpu)
    monkeypatch.setattr(backend, "TRITON_AVAILABLE", False)
    with torchblocks.use_backend("triton"), pytest.raises(RuntimeError, match="needs the triton package"):
        backend.use_triton(cpu)


def test_import_and_reference_path_work_without_triton():
    script = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, torchblocks\n"
        "from torchblocks import backend\n"
        "assert not backend.TRITON_AVAILABLE\n"
        "x = torch.tensor([-1.0, 2.0], requires_grad=True)\n"
        "torchblocks.functional.relu(x).sum().backward()\n"
        "assert x.grad.tolist() == [0.0, 1.0]\n"
        "torchblocks.set_backend('triton')\n"
        "try:\n"
        "    torchblocks.functional.relu(x)\n"
        "except RuntimeError as e:\n"
        "    assert 'pip install triton' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
