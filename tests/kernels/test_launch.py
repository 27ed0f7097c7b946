"""What every launcher shares: the device guard, and the reading of the
TF32 setting under both of torch's APIs."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

import torchblocks
from conftest import NO_INTERPRETER, NO_TRITON
from torchblocks.testing import TF32_TOLERANCE, relative_error


def _run_every_launcher(device):
    """One call of each block and one optimizer step, with gradients, on seeded inputs."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=generator).to(device).requires_grad_()
    w = torch.randn(4, 5, generator=generator).to(device).requires_grad_()
    hidden = torchblocks.functional.dense(x, w, activation="relu")
    loss = torchblocks.functional.softmax_cross_entropy(torchblocks.functional.relu(hidden), torch.arange(6, device=device) % 4)
    loss.backward()
    torchblocks.optim.Adam([w]).step()
    return x.grad, w


@pytest.mark.triton
@NO_TRITON
@NO_INTERPRETER
def test_every_launcher_runs_under_the_device_guard(monkeypatch):
    """A launch on a tensor of cuda:1 must go to cuda:1: each launcher enters
    ``device_guard`` with a tensor of the launch."""
    from torchblocks.kernels import _launch, cross_entropy, dense, optim

    guarded = []

    def recording_guard(tensor):
        guarded.append(tensor.device)
        return contextlib.nullcontext()

    for module in (_launch, dense, cross_entropy, optim):
        monkeypatch.setattr(module, "device_guard", recording_guard)
    with torchblocks.use_backend("triton"):
        _run_every_launcher("cpu")
    # dense forward, relu, cross-entropy forward and backward, relu backward x2, dx, dW, the step
    assert len(guarded) >= 9 and set(guarded) == {torch.device("cpu")}


def test_device_guard_makes_the_tensors_gpu_current(monkeypatch):
    pytest.importorskip("triton")
    from torchblocks.kernels import _launch

    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda device: entered.append(device) or contextlib.nullcontext())

    class OnSecondGpu:
        is_cuda, device = True, torch.device("cuda", 1)

    with _launch.device_guard(OnSecondGpu()):
        pass
    assert entered == [torch.device("cuda", 1)]
    assert isinstance(_launch.device_guard(torch.zeros(1)), contextlib.nullcontext)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tensors_on_a_second_gpu():
    torch.cuda.set_device(0)
    with torchblocks.use_backend("triton"):
        grad_input, weight = _run_every_launcher("cuda:1")
    with torchblocks.use_backend("reference"):
        expected_grad, expected_weight = _run_every_launcher("cuda:1")
    assert grad_input.device == weight.device == torch.device("cuda", 1)
    assert relative_error(grad_input, expected_grad) <= TF32_TOLERANCE
    assert relative_error(weight, expected_weight) <= TF32_TOLERANCE


@pytest.mark.parametrize("api", ["new", "legacy"])
def test_tf32_setting_is_read_under_either_api(api):
    """torch >= 2.9 raises on a read of the legacy allow_tf32 once the new API
    was used; the Dense launcher reads the setting either way."""
    pytest.importorskip("triton")
    from torchblocks.kernels import dense

    matmul = torch.backends.cuda.matmul
    if api == "new" and not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch < 2.9 has no fp32_precision API")
    saved = matmul.fp32_precision if hasattr(matmul, "fp32_precision") else matmul.allow_tf32
    try:
        for allowed in (True, False):
            if api == "new":
                matmul.fp32_precision = "tf32" if allowed else "ieee"
            else:
                matmul.allow_tf32 = allowed
            cuda = torch.device("cuda")
            assert dense._input_precision(torch.float32, cuda) == ("tf32" if allowed else "ieee")
            assert dense._input_precision(torch.float16, cuda) == "ieee"
    finally:
        if hasattr(matmul, "fp32_precision"):
            matmul.fp32_precision = saved
        else:
            matmul.allow_tf32 = saved


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dense_under_the_new_tf32_api_on_cuda():
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch < 2.9 has no fp32_precision API")
    saved = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        x, w = torch.randn(64, 32, device="cuda"), torch.randn(16, 32, device="cuda")
        with torchblocks.use_backend("triton"):
            ours = torchblocks.functional.dense(x, w)
        assert relative_error(ours, F.linear(x, w)) <= TF32_TOLERANCE
    finally:
        matmul.fp32_precision = saved


def test_cross_entropy_forward_reads_the_target_logit_before_any_reduction():
    """With the gradient written over the logits, warps that pass the last
    barrier of the log-sum-exp loop store gradients over the row: the
    target's logit must be loaded before the first reduction. The interpreter
    runs no warps, so the order is checked in the kernel's source here and
    the outcome on CUDA (test_cross_entropy's in-place tests, and below)."""
    import inspect

    pytest.importorskip("triton")
    from torchblocks.kernels import cross_entropy

    source = inspect.getsource(cross_entropy.cross_entropy_forward_kernel.fn)
    target_logit = source.index("x_y = tl.load(")
    assert target_logit < source.index("for start in range(0, C, BLOCK_C)")
    assert target_logit < source.index("tl.max(") and target_logit < source.index("tl.sum(")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("classes", [4096 * 3 + 7, 50257])
def test_in_place_gradient_over_long_rows_on_cuda(classes):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(16, classes, generator=generator).cuda()
    labels = torch.randint(classes, (16,), generator=generator).cuda()
    leaf = logits.clone().requires_grad_()
    with torchblocks.use_backend("triton"):
        loss = torchblocks.functional.softmax_cross_entropy(leaf * 1, labels, inplace_backward=True)
    loss.backward()
    native_leaf = logits.clone().requires_grad_()
    expected = F.cross_entropy(native_leaf, labels)
    expected.backward()
    assert relative_error(loss, expected) <= 1e-5 and relative_error(leaf.grad, native_leaf.grad) <= 1e-5


def test_autotuning_is_keyed_on_a_bucket_of_m():
    """Batches of 96 and 128 rows (the book's last batch and the others)
    share one tuning; the exact M is no key."""
    pytest.importorskip("triton")
    from torchblocks.kernels import dense

    assert "M" not in dense.dense_matmul_kernel.keys and "M_BUCKET" in dense.dense_matmul_kernel.keys
    assert dense.m_bucket(96) == dense.m_bucket(128) == 128 and dense.m_bucket(129) == 256


def test_autotuning_results_are_kept_across_processes():
    """triton >= 3.2 keeps each tuning on disk when asked (not under the
    interpreter, which does not tune); the Dense kernel asks."""
    triton = pytest.importorskip("triton")
    import inspect

    from torchblocks.kernels import dense

    if "cache_results" not in inspect.signature(triton.autotune).parameters:
        pytest.skip(f"triton {triton.__version__} cannot keep tunings on disk")
    assert dense._autotune_cache() == {"cache_results": True}
    if not dense.INTERPRETER:
        assert dense.dense_matmul_kernel.cache_results


def test_the_fused_heads_skinny_gemm_has_a_tile_that_fills_an_h100():
    """At LLM size (8192 rows x 4096 hidden x 128256 classes, bf16) a chunk's
    dx GEMM is skinny: (chunk rows x 4096), reduced over 128256 classes. The
    autotuner's sm_90 list must hold a tile that gives the 132 SMs work each."""
    triton = pytest.importorskip("triton")
    from torchblocks._ops.dense_cross_entropy import default_chunk_rows
    from torchblocks.kernels import dense

    rows = default_chunk_rows(8192, 4096, 128256)
    configs = dense.launchable_configs(dense._configs(interpreter=False), 90, "16-bit", 2, 232448)
    programs = [triton.cdiv(rows, c.kwargs["BLOCK_M"]) * triton.cdiv(4096, c.kwargs["BLOCK_N"]) for c in configs]
    assert max(programs) >= 132, f"{rows} rows: at most {max(programs)} programs"
