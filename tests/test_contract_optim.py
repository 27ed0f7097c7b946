"""The contract matrix of the optimizers: each torchblocks.optim step against
its torch.optim twin in the same run.

Rows: how the step is taken (eager, under torch.no_grad, inside
torch.compile, with a closure, through a state-dict round trip to the twin
mid-run, with capturable=True, with differentiable=True). Columns: an
optimizer with a set of its options. Layers: the implementation, put in force
by the ``path`` fixture of tests/conftest.py (the compiled CPU step of
optim_cpu.cpp, the foreach reference, the Triton kernels under the
interpreter). Each cell takes the same steps on float64 parameters of a few
shapes, with the same gradients, through ours and through the twin, and
compares the parameters, every state tensor and what ``step`` returned; where
the twin refuses, ours must raise an error of the same type. And it asserts
which implementation stepped every entry (``entries_stepped``): a cell of the
compiled path that silently fell back to the reference fails, as does one
where an implementation should have declined and did not.
"""

import collections

import pytest
import torch

import torchblocks.optim
from test_optim import capturable_on_cpu  # noqa: F401  (a fixture: the capturable row steps on the CPU)
from torchblocks.optim import _multi_tensor
from torchblocks.testing import assert_close

SHAPES = [(3, 4), (5,), (2, 3, 2)]
STEPS = 3


class Case:
    """An optimizer (``name``, the same in torch.optim and torchblocks.optim)
    with ``options``; ``compiled_capturable``: whether the compiled CPU step
    takes it with capturable=True (else the reference does)."""

    def __init__(self, name, options, compiled_capturable=False):
        self.name, self.options, self.compiled_capturable = name, options, compiled_capturable

    def __repr__(self):
        return self.name + "".join(f"-{key}={value}" for key, value in self.options.items())


CASES = [
    Case("SGD", dict(lr=0.1)),
    Case("SGD", dict(lr=0.1, momentum=0.9, nesterov=True)),
    Case("SGD", dict(lr=0.1, weight_decay=0.1)),
    Case("SGD", dict(lr=0.1, maximize=True)),
    Case("RMSprop", dict(lr=1e-3, alpha=0.9, eps=1e-7), compiled_capturable=True),  # the book network's
    Case("RMSprop", dict(lr=0.01, centered=True, momentum=0.5), compiled_capturable=True),
    Case("Adam", {}),
    Case("Adam", dict(amsgrad=True)),
    Case("AdamW", {}),
]


# ---- the steps -------------------------------------------------------------------------------------
# Each takes STEPS steps of ``module``'s optimizer (torch.optim or torchblocks.optim) for ``case`` on
# fresh parameters with the gradients of _gradients, and returns (parameters, their optimizer's state
# per parameter, what the steps returned). The round trip's middle step is the twin's, not counted.

def _parameters(requires_grad=True):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator, dtype=torch.float64).requires_grad_(requires_grad)
            for shape in SHAPES]


def _gradients(step):
    generator = torch.Generator().manual_seed(100 + step)
    return [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in SHAPES]


def _set_gradients(params, step):
    for param, grad in zip(params, _gradients(step)):
        param.grad = grad


def _stepped(module, case, step_call, **extra):
    """STEPS steps of a new ``module`` optimizer, each ``step_call(optimizer)``."""
    params = _parameters()
    optimizer = getattr(module, case.name)(params, **case.options, **extra)
    returned = []
    for step in range(STEPS):
        _set_gradients(params, step)
        returned.append(step_call(optimizer))
    return params, [optimizer.state[p] for p in params], returned


def eager(module, case):
    return _stepped(module, case, lambda optimizer: optimizer.step())


def under_no_grad(module, case):
    def step(optimizer):
        with torch.no_grad():
            return optimizer.step()
    return _stepped(module, case, step)


def compiled_step(module, case):
    """``torch.compile(optimizer.step)``, as torch users compile it (a fresh
    dynamo cache: the step of every optimizer is one code object)."""
    torch._dynamo.reset()
    compiled = {}

    def step(optimizer):
        if optimizer not in compiled:
            compiled[optimizer] = torch.compile(optimizer.step, backend="eager")
        return compiled[optimizer]()
    return _stepped(module, case, step)


def with_closure(module, case):
    """The closure re-evaluates a loss whose gradients are _gradients' and returns it."""
    params = _parameters()
    optimizer = getattr(module, case.name)(params, **case.options)
    returned = []
    for step in range(STEPS):
        def closure():
            optimizer.zero_grad()
            loss = sum((param * grad).sum() for param, grad in zip(params, _gradients(step)))
            loss.backward()
            return loss
        returned.append(optimizer.step(closure).detach())
    return params, [optimizer.state[p] for p in params], returned


def state_dict_round_trip(module, case):
    """STEPS - 1 steps of ``module``'s optimizer, one of torch.optim's loaded
    from its state dict, then one more of ``module``'s loaded from torch.optim's."""
    params = _parameters()
    first = getattr(module, case.name)(params, **case.options)
    twin = getattr(torch.optim, case.name)(params, **case.options)
    last = getattr(module, case.name)(params, **case.options)
    optimizers = [first] * (STEPS - 1) + [twin, last]
    for step, optimizer in enumerate(optimizers):
        if step and optimizer is not optimizers[step - 1]:
            optimizer.load_state_dict(optimizers[step - 1].state_dict())
        _set_gradients(params, step)
        optimizer.step()
    return params, [last.state[p] for p in params], []


def capturable(module, case):
    """capturable=True, the CPU allowed (the capturable_on_cpu fixture): the
    twins without the option refuse it (SGD: a TypeError)."""
    return _stepped(module, case, lambda optimizer: optimizer.step(), capturable=True)


def differentiable(module, case):
    """differentiable=True: the parameters are non-leaf tensors computed from
    leaves, and the gradient of the stepped parameters with respect to the
    leaves (through every step) is part of the result."""
    leaves = _parameters()
    params = [leaf * 1 for leaf in leaves]
    optimizer = getattr(module, case.name)(params, **case.options, differentiable=True)
    for step in range(STEPS):
        _set_gradients(params, step)
        optimizer.step()
    through_the_steps = torch.autograd.grad(sum(param.sum() for param in params), leaves)
    return [param.detach() for param in params], [optimizer.state[p] for p in params], list(through_the_steps)


TRANSFORMS = [
    pytest.param(eager, id="eager"),
    pytest.param(under_no_grad, id="no_grad"),
    pytest.param(compiled_step, id="compile"),
    pytest.param(with_closure, id="closure"),
    pytest.param(state_dict_round_trip, id="state_dict-round-trip"),
    pytest.param(capturable, id="capturable"),
    pytest.param(differentiable, id="differentiable"),
]


def expected_implementation(path_name, transform, case):
    """The implementation that must step every entry of a cell: the path's
    own, but the reference under a compiling trace on every path (dynamo
    traces the foreach ops; it can trace neither the compiled module nor a
    Triton launch) and for a differentiable step on every path (autograd
    records the reference's torch ops; neither the compiled module nor a
    Triton launch has a backward), and on the compiled path for a capturable
    step it has no form of (Adam's)."""
    if transform in (compiled_step, differentiable):
        return "reference"
    if path_name == "compiled" and transform is capturable and not case.compiled_capturable:
        return "reference"
    return {"compiled": "compiled-cpu", "python": "reference", "triton": "triton"}[path_name]


def _outcome(transform, module, case):
    try:
        return transform(module, case), None
    except Exception as error:  # compared with the twin's below
        return None, error


_NATIVE = {}  # (transform, case): the twin's outcome, the same whichever path is in force


def _native_outcome(transform, case):
    key = (transform, repr(case))
    if key not in _NATIVE:
        _NATIVE[key] = _outcome(transform, torch.optim, case)
    return _NATIVE[key]


def _assert_same_state(ours, native, where):
    assert ours.keys() == native.keys(), f"{where}: state keys {sorted(ours)}, the twin's {sorted(native)}"
    for key, value in native.items():
        if isinstance(value, torch.Tensor):
            assert (ours[key].dtype, ours[key].device, ours[key].shape) == (value.dtype, value.device, value.shape)
            assert_close(ours[key], value, what=f"{where} {key}")
        else:
            assert ours[key] == value, f"{where} {key}"


@pytest.mark.parametrize("case", [pytest.param(case, id=repr(case)) for case in CASES])
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_contract_optim(transform, case, path, monkeypatch, capturable_on_cpu):  # noqa: F811
    name, _ = path
    stepped = collections.Counter()
    monkeypatch.setattr(_multi_tensor, "entries_stepped", stepped)
    native, native_error = _native_outcome(transform, case)
    ours, our_error = _outcome(transform, torchblocks.optim, case)
    if native_error is not None:
        assert our_error is not None and isinstance(our_error, type(native_error)), (
            f"the twin raised {native_error!r}; ours gave {our_error!r}")
        assert sum(stepped.values()) == 0, f"ours raised after stepping: {stepped}"
        return
    assert our_error is None, f"the twin computed it; ours raised {our_error!r}"
    (params, states, returned), (native_params, native_states, native_returned) = ours, native
    for index, (param, native_param) in enumerate(zip(params, native_params)):
        assert not torch.equal(native_param, _parameters()[index]), "the twin's steps left a parameter as it was"
        assert_close(param, native_param, what=f"parameter {index}")
        _assert_same_state(states[index], native_states[index], f"state of parameter {index}")
    assert len(returned) == len(native_returned)
    for index, (value, native_value) in enumerate(zip(returned, native_returned)):
        if native_value is None:
            assert value is None, f"step {index} returned {value!r}; the twin's None"
        else:
            assert_close(value, native_value, what=f"returned {index}")
    expected = expected_implementation(name, transform, case)
    assert stepped == collections.Counter({expected: STEPS * len(SHAPES)}), f"expected {expected} to step every entry; stepped: {stepped}"
