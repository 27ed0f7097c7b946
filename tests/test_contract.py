"""The contract matrix: every block under every transform, on every
implementation, against its native twin in the same run.

Rows: a transform (eager, torch.jit.trace replayed on new inputs,
torch.compile, torch.export, compiled autograd (over a forward run inside it,
and over one run before it), the torch.func transforms,
jacobian(vectorize=True), functional_call, checkpointing, saved-tensor hooks,
anomaly mode, no_grad, inference_mode, forward-mode AD, hooks on grad_fn).
Columns: a block call (relu, in-place relu, dense, dense + relu, softmax
cross-entropy with each option, the fused head). Layers: the implementation
(the compiled eager CPU path, the Python Functions, the Triton kernels under
the interpreter). Each cell computes ours and native's in float64 and asserts
the same numbers, or an error of the same type where native refuses; and it
asserts which implementation ran: a cell of the compiled path that silently
took the Python Functions fails, as does one where the compiled path should
have declined (a trace, a transform) and did not; on the Triton path, that
the launchers launched, and left to the reference the calls they must (those
of a jit.trace recording, the legacy vmap's batched gradients) and no other.
The optimizers' steps have their own, smaller matrix: tests/test_contract_optim.py.
The ``path`` fixture (tests/conftest.py) puts each implementation in force.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

import torchblocks.functional as TF
from torchblocks import backend
from torchblocks._ops import _eager_cpu
from torchblocks.testing import assert_close


# ---- the blocks ----------------------------------------------------------------------------------

def _randn(*shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _labels(rows, classes, seed, ignored=None):
    labels = torch.randint(classes, (rows,), generator=torch.Generator().manual_seed(seed))
    if ignored is not None:
        labels[::3] = ignored
    return labels


class Block:
    """One call of a block: ``ours`` and ``native`` take the same inputs,
    made by ``inputs(seed)``; ``grads`` are the positions differentiated;
    ``vmap_dims`` the in_dims of a batch; ``compiled_takes``: whether the
    compiled path computes the call in eager mode (else it must decline);
    ``one_op``: whether its C++ kernels are those of the block's dispatcher
    ops, so that every transform but a compiling trace reaches them too,
    and ``op_declines`` the names of the transforms under which its C++
    still declines;
    ``triton_takes``: whether the Triton backend has kernels for it (class
    probabilities are plain PyTorch on every backend)."""

    def __init__(self, name, ours, native, inputs, grads, compiled_takes, vmap_dims=None, triton_takes=True,
                 one_op=False, op_declines=()):
        self.name, self.ours, self.native, self.inputs = name, ours, native, inputs
        self.grads, self.compiled_takes, self.triton_takes = grads, compiled_takes, triton_takes
        self.one_op, self.op_declines = one_op, op_declines
        self.vmap_dims = vmap_dims or tuple(0 if i in grads else None for i in range(len(inputs(0))))

    def __repr__(self):
        return self.name


def _cross_entropy(name, compiled_takes=False, probabilities=False, batched_labels=True, **options):
    """A cross-entropy block: logits (6, 5) against labels or probabilities,
    under vmap a batch of both (``batched_labels``) or of the logits alone.
    Its C++ kernels choose the common case by reading the class indices: a
    batch of them under vmap has no values of one call to read, so a vmap over
    them takes the Functions."""
    ignored = options.get("ignore_index")

    def inputs(seed):
        target = (_randn(6, 5, seed=seed + 1).softmax(1) if probabilities
                  else _labels(6, 5, seed + 1, ignored=ignored))
        return [_randn(6, 5, seed=seed), target]

    return Block(name, lambda x, t: TF.softmax_cross_entropy(x, t, **options),
                 lambda x, t: F.cross_entropy(x, t, **options), inputs, grads=(0,), compiled_takes=compiled_takes,
                 vmap_dims=(0, 0 if batched_labels else None), triton_takes=not probabilities, one_op=compiled_takes,
                 op_declines=("vmap",) if batched_labels else ())


CLASS_WEIGHT = _randn(5, seed=99).abs() + 0.5

BLOCKS = [
    Block("relu", TF.relu, F.relu, lambda seed: [_randn(4, 6, seed=seed)], grads=(0,), compiled_takes=True,
          one_op=True),
    Block("relu-inplace", lambda x: TF.relu(x * 1, inplace=True), lambda x: F.relu(x * 1, inplace=True),
          lambda seed: [_randn(4, 6, seed=seed)], grads=(0,), compiled_takes=True, one_op=True),
    Block("dense", TF.dense, F.linear, lambda seed: [_randn(4, 6, seed=seed), _randn(3, 6, seed=seed + 1),
                                                     _randn(3, seed=seed + 2)], grads=(0, 1, 2), compiled_takes=True,
          one_op=True, vmap_dims=(0, None, None)),
    Block("dense-relu", lambda x, w, b: TF.dense(x, w, b, "relu"), lambda x, w, b: F.relu(F.linear(x, w, b)),
          lambda seed: [_randn(4, 6, seed=seed), _randn(3, 6, seed=seed + 1), _randn(3, seed=seed + 2)],
          grads=(0, 1, 2), compiled_takes=True, one_op=True, vmap_dims=(0, None, None)),
    _cross_entropy("cross_entropy-mean", compiled_takes=True),
    _cross_entropy("cross_entropy-sum", compiled_takes=True, reduction="sum"),
    _cross_entropy("cross_entropy-none", compiled_takes=True, reduction="none"),
    _cross_entropy("cross_entropy-mean-shared_labels", compiled_takes=True, batched_labels=False),
    _cross_entropy("cross_entropy-weight", weight=CLASS_WEIGHT),
    _cross_entropy("cross_entropy-ignore_index", ignore_index=2),
    _cross_entropy("cross_entropy-label_smoothing", label_smoothing=0.2),
    _cross_entropy("cross_entropy-probabilities", probabilities=True, label_smoothing=0.1, weight=CLASS_WEIGHT),
    Block("dense_cross_entropy", TF.dense_cross_entropy,
          lambda x, w, t, b: F.cross_entropy(F.linear(x, w, b), t),
          lambda seed: [_randn(6, 4, seed=seed), _randn(5, 4, seed=seed + 1), _labels(6, 5, seed + 2),
                        _randn(5, seed=seed + 3)], grads=(0, 1, 3), compiled_takes=True,
          vmap_dims=(0, None, 0, None), one_op=True, op_declines=("vmap",)),  # as cross-entropy's, for its labels
    Block("dense_cross_entropy-none-smoothing",
          lambda x, w, t, b: TF.dense_cross_entropy(x, w, t, b, reduction="none", label_smoothing=0.1),
          lambda x, w, t, b: F.cross_entropy(F.linear(x, w, b), t, reduction="none", label_smoothing=0.1),
          lambda seed: [_randn(6, 4, seed=seed), _randn(5, 4, seed=seed + 1), _labels(6, 5, seed + 2),
                        _randn(5, seed=seed + 3)], grads=(0, 1, 3), compiled_takes=False,
          vmap_dims=(0, None, 0, None)),
]


# ---- the transforms ------------------------------------------------------------------------------
# Each runs ``fn`` (ours or native) on ``block``'s inputs and returns the tensors to compare. The
# keyword ``declines`` of TRANSFORMS says whether the compiled path must leave the call to the
# Python Functions under it (True), take it where the block is one it computes (False).

def _leaves(block, seed=0):
    inputs = block.inputs(seed)
    return [t.requires_grad_() if i in block.grads else t for i, t in enumerate(inputs)]


def _cotangent(output):
    return _randn(*output.shape, seed=7)


def _with_grads(output, inputs, block):
    """(output, the gradients of <output, a fixed cotangent> with respect to the differentiated inputs)."""
    grads = torch.autograd.grad(output, [inputs[i] for i in block.grads], _cotangent(output))
    return (output, *grads)


def eager(fn, block):
    inputs = _leaves(block)
    return _with_grads(fn(*inputs), inputs, block)


def jit_trace(fn, block):
    traced = torch.jit.trace(fn, tuple(_leaves(block)), check_trace=False)
    inputs = _leaves(block, seed=1)  # new inputs: a graph that lost the data path replays stale numbers
    return _with_grads(traced(*inputs), inputs, block)


_COMPILED = {}


def compile_fullgraph(fn, block):
    key = (id(fn), backend.get_backend(), _eager_cpu._enabled)
    if key not in _COMPILED:
        torch._dynamo.reset()
        _COMPILED[key] = torch.compile(fn, fullgraph=True, backend="aot_eager")
    inputs = _leaves(block)
    return _with_grads(_COMPILED[key](*inputs), inputs, block)


class _Call(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *inputs):
        return self.fn(*inputs)


def export(fn, block):
    program = torch.export.export(_Call(fn), tuple(block.inputs(0)))
    return (program.module()(*block.inputs(1)),)


def compiled_autograd(fn, block):
    from torch._dynamo import compiled_autograd as captured

    inputs = _leaves(block)
    with captured._enable(torch.compile(backend="eager")):
        output = fn(*inputs)
        (output * _cotangent(output)).sum().backward()
    return (output.detach(), *(inputs[i].grad for i in block.grads))


def compiled_autograd_after_forward(fn, block):
    """The forward in plain eager mode, its backward captured by compiled
    autograd: the captured graph holds whatever nodes the forward attached."""
    from torch._dynamo import compiled_autograd as captured

    inputs = _leaves(block)
    output = fn(*inputs)
    with captured._enable(torch.compile(backend="eager")):
        (output * _cotangent(output)).sum().backward()
    return (output.detach(), *(inputs[i].grad for i in block.grads))


def _batch(block):
    """Three entries of ``block``'s inputs stacked along the batched dims."""
    entries = [block.inputs(seed) for seed in range(3)]
    return [torch.stack(column) if dim is not None else column[0]
            for column, dim in zip(zip(*entries), block.vmap_dims)]


def vmap(fn, block):
    return (torch.func.vmap(fn, in_dims=block.vmap_dims)(*_batch(block)),)


def _scalar(fn):
    def weighted_sum(*inputs):
        output = fn(*inputs)
        return (output * _cotangent(output)).sum()
    return weighted_sum


def func_grad(fn, block):
    return torch.func.grad(_scalar(fn), argnums=block.grads)(*block.inputs(0))


def jacrev(fn, block):
    return torch.func.jacrev(fn, argnums=block.grads)(*block.inputs(0))


def jacfwd(fn, block):
    return torch.func.jacfwd(fn, argnums=block.grads)(*block.inputs(0))


def _of_differentiated(fn, block, inputs):
    """fn as a function of the differentiated inputs alone, the others fixed."""
    def partial(*differentiated):
        full = list(inputs)
        for index, value in zip(block.grads, differentiated):
            full[index] = value
        return fn(*full)
    return partial


def jacobian_vectorized(fn, block):
    inputs = block.inputs(0)
    jacobian = torch.autograd.functional.jacobian(
        _of_differentiated(fn, block, inputs), tuple(inputs[i] for i in block.grads), vectorize=True)
    return tuple(jacobian)


def functional_call(fn, block):
    module = _Call(fn)
    inputs = _leaves(block)
    for index in block.grads:
        module.register_parameter(f"p{index}", torch.nn.Parameter(torch.zeros(inputs[index].shape, dtype=torch.float64)))

    def through_parameters(*args):
        full = [getattr(module, f"p{i}") if i in block.grads else arg for i, arg in enumerate(args)]
        return fn(*full)

    module.fn = through_parameters
    output = torch.func.functional_call(module, {f"p{i}": inputs[i] for i in block.grads}, tuple(inputs))
    return _with_grads(output, inputs, block)


def checkpoint(use_reentrant):
    def run(fn, block):
        inputs = _leaves(block)
        output = torch.utils.checkpoint.checkpoint(fn, *inputs, use_reentrant=use_reentrant)
        return _with_grads(output, inputs, block)
    return run


def save_on_cpu(fn, block):
    inputs = _leaves(block)
    with torch.autograd.graph.save_on_cpu():
        output = fn(*inputs)
    return _with_grads(output, inputs, block)


class _Moved:
    """saved_tensors_hooks that move every saved tensor to storage of their
    own (a copy) and give back only the copy, counting both."""

    def __init__(self):
        self.packs = self.unpacks = 0

    def pack(self, tensor):
        self.packs += 1
        return tensor.detach().clone()

    def unpack(self, copy):
        self.unpacks += 1
        return copy


def saved_tensors_hooks(fn, block):
    inputs = _leaves(block)
    hooks = _Moved()
    with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
        output = fn(*inputs)
    assert hooks.packs > 0
    results = _with_grads(output, inputs, block)
    assert hooks.unpacks > 0, "the backward read no saved tensor through the hooks"
    return results


def anomaly_mode(fn, block):
    with torch.autograd.detect_anomaly(check_nan=True):
        return eager(fn, block)


def no_grad(fn, block):
    with torch.no_grad():
        output = fn(*_leaves(block))
    assert not output.requires_grad
    return (output,)


def inference_mode(fn, block):
    with torch.inference_mode():
        output = fn(*block.inputs(0))
    assert output.is_inference()
    return (output,)


def forward_mode(fn, block):
    inputs = block.inputs(0)
    with forward_ad.dual_level():
        duals = [forward_ad.make_dual(t, _randn(*t.shape, seed=11 + i)) if i in block.grads else t
                 for i, t in enumerate(inputs)]
        output = fn(*duals)
        primal, tangent = forward_ad.unpack_dual(output)
    return primal, tangent


def grad_fn_hooks(fn, block):
    inputs = _leaves(block)
    output = fn(*inputs)
    seen = []
    output.grad_fn.register_prehook(lambda grad_outputs: seen.append(grad_outputs[0].clone()))
    output.grad_fn.register_hook(lambda grad_inputs, grad_outputs: seen.append(len(grad_inputs)))
    assert isinstance(output.grad_fn, torch.autograd.graph.Node)
    results = _with_grads(output, inputs, block)
    assert len(seen) == 2, "the hooks on grad_fn did not both run once"
    return (*results, seen[0])


TRANSFORMS = [  # (transform, whether the compiled path must decline under it, unless it serves the block's op)
    pytest.param(eager, False, id="eager"),
    pytest.param(jit_trace, True, id="jit.trace"),
    pytest.param(compile_fullgraph, True, id="compile"),
    pytest.param(export, True, id="export"),
    pytest.param(compiled_autograd, True, id="compiled_autograd"),
    pytest.param(compiled_autograd_after_forward, False, id="compiled_autograd-after-forward"),
    pytest.param(vmap, True, id="vmap"),
    pytest.param(func_grad, True, id="func.grad"),
    pytest.param(jacrev, True, id="jacrev"),
    pytest.param(jacfwd, True, id="jacfwd"),
    pytest.param(jacobian_vectorized, False, id="jacobian-vectorize"),
    pytest.param(functional_call, False, id="functional_call"),
    pytest.param(checkpoint(True), False, id="checkpoint-reentrant"),
    pytest.param(checkpoint(False), False, id="checkpoint-nonreentrant"),
    pytest.param(save_on_cpu, False, id="save_on_cpu"),
    pytest.param(saved_tensors_hooks, False, id="saved_tensors_hooks"),
    pytest.param(anomaly_mode, False, id="anomaly"),
    pytest.param(no_grad, False, id="no_grad"),
    pytest.param(inference_mode, False, id="inference_mode"),
    pytest.param(forward_mode, True, id="forward_ad"),
    pytest.param(grad_fn_hooks, False, id="grad_fn-hooks"),
]


# The compiling traces: they call the block's ops through torch.ops, not the module's entry points.
COMPILING = (compile_fullgraph, export)


# Where the Triton launchers leave calls to the reference (_dispatch.triton_declines), and why.
TRITON_DECLINES = {
    jit_trace: "while torch.jit.trace records, sizes are traced values (the replays launch)",
    jacobian_vectorized: "the legacy vmap's batched gradients reach the backward, with no storage to launch on",
}


def _outcome(transform, fn, block):
    try:
        return transform(fn, block), None
    except Exception as error:  # compared with native's below
        return None, error


@pytest.mark.parametrize("block", [pytest.param(b, id=b.name) for b in BLOCKS])
@pytest.mark.parametrize("transform, declines", TRANSFORMS)
def test_contract(transform, declines, block, path):
    name, taken = path
    native, native_error = _outcome(transform, block.native, block)
    ours, our_error = _outcome(transform, block.ours, block)
    if native_error is not None:
        assert our_error is not None and isinstance(our_error, type(native_error)), (
            f"native raised {native_error!r}; ours gave {our_error!r}")
    else:
        assert our_error is None, f"native computed it; ours raised {our_error!r}"
        assert len(ours) == len(native)
        for index, (mine, theirs) in enumerate(zip(ours, native)):
            assert_close(mine, theirs, what=f"{transform.__name__} result {index}")
    if name == "compiled":
        if (declines and not (block.one_op and transform not in COMPILING)) or not block.compiled_takes \
                or transform.__name__ in block.op_declines:
            assert taken.compiled == 0, "the compiled path took a call it must leave to the Python Functions"
        else:
            assert taken.compiled > 0, "the compiled path should have run, and the Python Functions did"
    else:
        assert taken.compiled == 0
    if name == "triton" and block.triton_takes:
        assert taken.launched > 0, "no Triton kernel was launched"
        if transform in TRITON_DECLINES:
            assert taken.declined > 0, f"the Triton launchers took every call: {TRITON_DECLINES[transform]}"
        else:
            assert taken.declined == 0, "a Triton launcher left a call to the reference"
    else:
        assert taken.triton == taken.launched == taken.declined == 0
