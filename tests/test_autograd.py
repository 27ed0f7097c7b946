"""The autograd contract of every block, as native has it: forward-mode AD
(gradcheck's forward checks), second derivatives (gradgradcheck, a gradient
penalty against native), torch.func (vmap, grad, jacrev, functional_call),
torch.export. On every target: the Triton kernels
(under the interpreter without a GPU) run inside each of these too."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jacrev, vmap

import torchblocks
from torchblocks.cli.cases import AUTOGRAD_CASES as CASES, LABELS, randn
from torchblocks.testing import assert_close, assert_parity

tb = torchblocks.functional
# The losses' cases ignore a row (LABELS holds -100), weigh classes or smooth, so
# their calls take the Python path: marked python_path, they have no reference-cpu
# variant. Their "plain" cases are the compiled eager CPU path's, and only its.


def _marks(name):
    if "cross_entropy" not in name:
        return ()
    return pytest.mark.compiled_path if "plain" in name else pytest.mark.python_path


CASE_PARAMS = [pytest.param(name, marks=_marks(name)) for name in CASES]
# torch.func's cases: the plain ones would repeat the others there, as the compiled module declines torch.func
FUNC_CASES = [name for name in CASES if "plain" not in name]
# torch.func's transforms (vmap, grad, jacrev) take the Python path: the compiled module declines them
TORCH_FUNC = pytest.mark.python_path


@pytest.mark.parametrize("name", CASE_PARAMS)
def test_gradgradcheck(target, name):
    """Every entry of the second derivatives, reverse over reverse and forward
    over reverse (torch.func.hessian's way: the backward Functions' jvps);
    under the slow interpreter, random projections of them (fast mode),
    beside the gradient penalty's full parity."""
    case = CASES[name]
    assert torch.autograd.gradgradcheck(case.ours, case.make(target.device), fast_mode=target.interpreted,
                                        check_fwd_over_rev=True)


@pytest.mark.parametrize("name", CASE_PARAMS)
def test_gradcheck_forward_ad(target, name):
    """The jvps against finite differences, and batched (the legacy vmap over
    the tangents); under the slow interpreter, random projections (fast mode).
    Not batched in place: torch's check refuses any in-place custom Function
    under the legacy vmap (its jvp's in-place write is not seen as one), even
    a minimal one; jacfwd's vmap batches it (tests/test_contract.py)."""
    case = CASES[name]
    assert torch.autograd.gradcheck(case.ours, case.make(target.device), check_forward_ad=True,
                                    check_batched_forward_grad=name != "relu in place",
                                    fast_mode=target.interpreted)


def _gradient_penalty(fn):
    """A loss plus the squared norm of its gradients (create_graph=True): its
    own gradient needs the second derivatives of ``fn``."""
    def penalised(*inputs):
        output = fn(*inputs)
        weights = torch.linspace(0.5, 1.5, output.numel(), dtype=output.dtype, device=output.device)
        loss = (output.reshape(-1) * weights).sum()
        grads = torch.autograd.grad(loss, inputs, create_graph=True)
        return loss + sum(g.square().sum() for g in grads)
    return penalised


@pytest.mark.parametrize("name", CASE_PARAMS)
def test_gradient_penalty_matches_native(target, name):
    case = CASES[name]
    assert_parity(_gradient_penalty(case.ours), _gradient_penalty(case.native), case.inputs(target.device), what=name)


@pytest.mark.python_path  # inplace_backward
def test_inplace_backward_refuses_a_gradient_of_the_gradient(target):
    x = randn(4, 5, device=target.device).requires_grad_()
    loss = tb.softmax_cross_entropy(x * 1, LABELS[:4].to(target.device), inplace_backward=True)
    with pytest.raises(RuntimeError, match="no gradient of the gradient exists"):
        torch.autograd.grad(loss, x, create_graph=True)


@TORCH_FUNC
@pytest.mark.parametrize("name", FUNC_CASES)
def test_vmap_matches_native(target, name):
    case = CASES[name]
    if name == "relu in place":
        pytest.skip("covered by test_vmap_relu_in_place")
    inputs = [t.detach() for t in case.inputs(target.device)]
    batched = torch.stack([inputs[0] * scale for scale in (1.0, -0.5, 2.0)])  # a batch of first inputs
    ours = vmap(case.ours, in_dims=(0,) + (None,) * (len(inputs) - 1))(batched, *inputs[1:])
    native = vmap(case.native, in_dims=(0,) + (None,) * (len(inputs) - 1))(batched, *inputs[1:])
    assert_close(ours, native)


@TORCH_FUNC
def test_vmap_relu_in_place(target):
    x = randn(3, 4, device=target.device)
    ours, native = x.clone(), x.clone()
    vmap(lambda t: tb.relu(t, inplace=True))(ours)
    vmap(lambda t: F.relu(t, inplace=True))(native)
    assert torch.equal(ours, native)


@TORCH_FUNC
@pytest.mark.parametrize("name", FUNC_CASES)
def test_jacrev_matches_native(target, name):
    case = CASES[name]
    inputs = [t.detach() for t in case.inputs(target.device)]
    argnums = tuple(range(len(inputs)))
    for ours, native in zip(jacrev(case.ours, argnums)(*inputs), jacrev(case.native, argnums)(*inputs)):
        assert_close(ours, native, what="jacobian")


def _models(device):
    """A torchblocks MLP and its native twin with the same weights."""
    torch.manual_seed(0)
    ours = torch.nn.Sequential(torchblocks.nn.Dense(4, 6, activation="relu"), torchblocks.nn.Dense(6, 5),
                               torchblocks.nn.ReLU(), torchblocks.nn.Dense(5, 3)).double().to(device)
    native = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 5), torch.nn.ReLU(),
                                 torch.nn.Linear(5, 3)).double().to(device)
    native.load_state_dict(dict(zip(native.state_dict(), ours.state_dict().values())))
    return ours, native


@TORCH_FUNC
def test_per_sample_gradients_match_native(target):
    """vmap(grad(...)) over samples with functional_call: the classic per-sample gradient."""
    ours, native = _models(target.device)
    x, labels = randn(7, 4, device=target.device, seed=3), torch.randint(3, (7,)).to(target.device)

    def per_sample(model, loss_fn):
        params = {name: p.detach() for name, p in model.named_parameters()}

        def loss(params, x, label):
            return loss_fn(functional_call(model, params, (x[None],)), label[None])

        return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, labels)

    ours_grads = per_sample(ours, tb.softmax_cross_entropy)
    native_grads = per_sample(native, F.cross_entropy)
    for (name, mine), theirs in zip(ours_grads.items(), native_grads.values()):
        assert mine.shape == (7, *dict(ours.named_parameters())[name].shape)
        assert_close(mine, theirs, what=f"per-sample gradient of {name}")


@TORCH_FUNC
def test_hessian_matches_native(target):
    ours, native = _models(target.device)
    x, labels = randn(3, 4, device=target.device, seed=3), torch.tensor([0, 2, 1], device=target.device)
    hessian = jacrev(jacrev(lambda x: tb.softmax_cross_entropy(ours(x), labels, label_smoothing=0.1)))(x)
    expected = jacrev(jacrev(lambda x: F.cross_entropy(native(x), labels, label_smoothing=0.1)))(x)
    assert_close(hessian, expected, what="hessian")


def test_torch_export_matches_eager(target):
    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torchblocks.nn.Dense(4, 6, activation="relu"), torchblocks.nn.ReLU(),
                                            torchblocks.nn.Dense(6, 3))
            self.loss = torchblocks.nn.SoftmaxCrossEntropy(label_smoothing=0.1)

        def forward(self, x, labels):
            logits = self.body(x)
            return logits, self.loss(logits, labels)

    model = Classifier().to(target.device)
    x, labels = randn(5, 4, device=target.device).float(), torch.tensor([0, 2, 1, 1, 0], device=target.device)
    exported = torch.export.export(model, (x, labels))
    assert any("torchblocks" in str(node.target) for node in exported.graph.nodes)
    for ours, expected in zip(exported.module()(x, labels), model(x, labels)):
        assert_close(ours, expected)
