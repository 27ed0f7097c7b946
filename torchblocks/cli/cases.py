"""The cases every block and optimizer is checked on, read by ``torchblocks
check`` and by the tests alike.

``BLOCKS``: per block, parity cases for any (device, dtype), run by ``check``
and tests/cli/test_cases.py. ``OPTIMIZERS``: per optimizer, the option sets
whose trajectories on ``small_model`` must follow the native twin's (``check``
and tests/test_optim.py). ``AUTOGRAD_CASES``: one small float64 case per
block and mode for the autograd contract (second derivatives, torch.func;
tests/test_autograd.py). A new block or optimizer plugs in by adding entries.
"""

import copy
import dataclasses
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

import torchblocks
import torchblocks.optim
from torchblocks.testing import Comparison, compare, relative_error

tb = torchblocks.functional

ALL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class Case:
    """One parity case: ``ours(*inputs)`` against ``native(*inputs)``.
    Floating-point inputs get gradients; the rest pass through as they are."""

    label: str
    ours: Callable
    native: Callable
    inputs: Sequence[torch.Tensor]
    gradcheck: bool = True  # also gradcheck and gradgradcheck it in float64 (keep those small)


@dataclasses.dataclass(frozen=True)
class BlockCheck:
    name: str
    cases: Callable[[torch.device, torch.dtype], Sequence[Case]]  # (device, dtype) -> cases
    dtypes: Sequence[torch.dtype] = ALL_DTYPES


def _away_from_zero(shape, dtype, device, generator):
    """Random values with |x| >= 0.1: finite differences stay off ReLU's kink."""
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    return (x + 0.1 * x.sign()).to(device=device, dtype=dtype)


def _relu_cases(device, dtype):
    generator = torch.Generator().manual_seed(0)

    def ours(x):
        return torchblocks.functional.relu(x)

    def ours_inplace(x):
        return torchblocks.functional.relu(x * 1, inplace=True)

    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.0, -1.0])
    wide = _away_from_zero((12, 33), dtype, device, generator)
    return [
        Case("empty", ours, F.relu, [_away_from_zero((0, 5), dtype, device, generator)]),
        Case("one element", ours, F.relu, [_away_from_zero((1,), dtype, device, generator)]),
        Case("odd 3-D", ours, F.relu, [_away_from_zero((3, 5, 17), dtype, device, generator)]),
        Case("transposed", ours, F.relu, [wide.t()]),
        Case("strided slice", ours, F.relu, [wide[1::2, ::3]]),
        Case("in place", ours_inplace, F.relu, [_away_from_zero((257,), dtype, device, generator)]),
        Case("nan and inf", ours, F.relu, [special.to(device=device, dtype=dtype)], gradcheck=False),
    ]


def _dense_cases(device, dtype):
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)

    def ours(activation):
        return lambda x, w, b=None: torchblocks.functional.dense(x, w, b, activation=activation)

    def native(activation):
        return lambda x, w, b=None: F.relu(F.linear(x, w, b)) if activation else F.linear(x, w, b)

    cases = []
    for activation in (None, "relu"):
        name = activation or "linear"
        cases += [
            Case(f"{name} 1x1x1", ours(activation), native(activation), [randn(1, 1), randn(1, 1), randn(1)]),
            Case(f"{name} 37x45x70", ours(activation), native(activation), [randn(37, 70), randn(45, 70), randn(45)],
                 gradcheck=False),
            Case(f"{name} 3-D input, no bias", ours(activation), native(activation), [randn(2, 3, 5), randn(4, 5)]),
            Case(f"{name} transposed x and W", ours(activation), native(activation),
                 [randn(6, 4).t(), randn(6, 3).t(), randn(3)]),
            Case(f"{name} empty batch", ours(activation), native(activation), [randn(0, 8), randn(5, 8), randn(5)]),
        ]
    return cases


def _cross_entropy_cases(device, dtype):
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return (3 * torch.randn(shape, generator=generator, dtype=torch.float64)).to(device=device, dtype=dtype)

    def labels(classes, *shape):
        return torch.randint(classes, shape, generator=generator).to(device)

    def pair(weight=None, **options):  # class weights are no input: native has no gradient for them
        # native's weight in x's dtype: the twin rule's float64 run widens it with x
        return (lambda x, t: torchblocks.functional.softmax_cross_entropy(x, t, weight, **options),
                lambda x, t: F.cross_entropy(x, t, None if weight is None else weight.to(x.dtype), **options))

    ignored = labels(5, 6)
    ignored[2] = -100
    probabilities = torch.rand((4, 5), generator=generator).softmax(dim=1).to(device=device, dtype=dtype)
    extreme = torch.tensor([[1e4, -1e4, 0.0], [3e38, -3e38, 1.0], [-float("inf"), 0.0, 1.0]]).to(device, dtype)
    return [
        Case("(N, C) mean", *pair(), [randn(6, 5), labels(5, 6)]),
        Case("(C) input", *pair(reduction="sum"), [randn(5), labels(5)]),
        Case("(N, C, d) none", *pair(reduction="none"), [randn(2, 4, 3), labels(4, 2, 3)]),
        Case("weighted, ignored, smoothed", *pair(weight=randn(5).abs(), label_smoothing=0.2), [randn(6, 5), ignored]),
        Case("probability targets", *pair(weight=randn(5).abs(), label_smoothing=0.1), [randn(4, 5), probabilities]),
        Case("extreme and -inf logits", *pair(reduction="none"), [extreme, labels(3, 3)], gradcheck=False),
    ]


def _dense_cross_entropy_cases(device, dtype):
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)

    target = torch.randint(5, (5,), generator=generator).to(device)
    target[3] = -100

    def pair(**options):
        return (lambda x, w, b=None: torchblocks.functional.dense_cross_entropy(x, w, target, b, chunk_rows=3, **options),
                lambda x, w, b=None: F.cross_entropy(F.linear(x, w, b), target, **options))

    return [
        Case("mean, 2 chunks", *pair(), [randn(5, 3), randn(5, 3), randn(5)]),
        Case("sum, smoothed, no bias", *pair(reduction="sum", label_smoothing=0.1), [randn(5, 3), randn(5, 3)]),
        Case("none", *pair(reduction="none"), [randn(5, 3), randn(5, 3), randn(5)]),
    ]


BLOCKS = [
    BlockCheck("relu", _relu_cases),
    BlockCheck("dense", _dense_cases),
    BlockCheck("cross_entropy", _cross_entropy_cases),
    BlockCheck("dense_cross_entropy", _dense_cross_entropy_cases),
]


@dataclasses.dataclass(frozen=True)
class OptimizerCheck:
    """One optimizer: ours against the twin, one trajectory per option set."""

    ours: type
    native: type
    option_sets: Sequence[dict]  # constructor keyword arguments, one trajectory each
    dtypes: Sequence[torch.dtype] = ALL_DTYPES

    @property
    def name(self) -> str:
        return self.ours.__name__


OPTIMIZERS = [
    OptimizerCheck(torchblocks.optim.SGD, torch.optim.SGD, [
        dict(lr=0.1),
        dict(lr=0.1, momentum=0.9),
        dict(lr=0.1, momentum=0.9, dampening=0.5),
        dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
        dict(lr=0.05, weight_decay=0.1, maximize=True),
        dict(lr=0.05, momentum=0.8, weight_decay=0.01, maximize=True),
    ]),
    OptimizerCheck(torchblocks.optim.RMSprop, torch.optim.RMSprop, [
        dict(lr=0.01),
        dict(lr=1e-3, alpha=0.9, eps=1e-7),  # the book's (Keras's) RMSprop
        dict(lr=0.01, momentum=0.5),
        dict(lr=0.01, centered=True),
        dict(lr=0.01, alpha=0.9, eps=1e-4, momentum=0.5, centered=True, weight_decay=0.1, maximize=True),
    ]),
    OptimizerCheck(torchblocks.optim.Adam, torch.optim.Adam, [
        dict(lr=0.01),
        dict(lr=0.01, amsgrad=True),
        dict(lr=0.01, weight_decay=0.1),
        dict(lr=0.01, betas=(0.5, 0.9), eps=1e-6),
        dict(lr=0.01, weight_decay=0.1, amsgrad=True, maximize=True),
        dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
    ]),
    OptimizerCheck(torchblocks.optim.AdamW, torch.optim.AdamW, [
        dict(lr=0.01),
        dict(lr=0.01, weight_decay=0.1, amsgrad=True),
        dict(lr=0.01, betas=(0.8, 0.99), maximize=True),
    ]),
]

TRAJECTORY_STEPS = 30


def small_model(device, dtype) -> torch.nn.Module:
    """A two-layer network whose first weight (64 x 40) spans three kernel
    chunks, plus a parameter ``unused`` that never gets a gradient."""
    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3))
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) / 4)
    model.unused = torch.nn.Parameter(torch.randn(3, generator=generator))
    return model.to(device=device, dtype=dtype)


def param_groups(model: torch.nn.Module, options: dict) -> list:
    """Two groups: the first layer with ``options``; the rest at half the learning rate."""
    return [{"params": list(model[0].parameters())},
            {"params": [*model[2].parameters(), model.unused], "lr": options.get("lr", 1e-3) / 2}]


def train(model, optimizer, steps: int, scheduler=None, scaler=None):
    """``steps`` steps of mean squared error on fixed random data (more than
    the model can interpolate: a fitted model's near-zero gradients would make
    Adam's sign-like steps chaotic), or of its
    negative when the optimizer maximizes (so that every trajectory converges
    rather than amplifying rounding). Every third step the last bias has no
    gradient (its step count falls behind); the loss goes through ``scaler``
    when given. Returns the losses."""
    generator = torch.Generator().manual_seed(1)
    param = next(model.parameters())
    x = torch.randn(256, 40, generator=generator).to(param.device, param.dtype)
    y = torch.randn(256, 3, generator=generator).to(param.device, param.dtype)
    sign = -1 if optimizer.defaults.get("maximize") else 1
    losses = []
    for step in range(steps):
        optimizer.zero_grad()
        loss = sign * (model(x) - y).square().mean()
        (scaler.scale(loss) if scaler else loss).backward()
        if step % 3 == 2:
            model[2].bias.grad = None
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


def flat_parameters(model) -> torch.Tensor:
    """Every parameter of ``model``, detached and flattened into one 1-D tensor."""
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def trajectory_error(check: OptimizerCheck, options: dict, device, dtype, steps: int = TRAJECTORY_STEPS) -> float:
    """Relative error of the parameters after ``steps`` steps of ours against the twin's."""
    model = small_model(device, dtype)
    native_model = copy.deepcopy(model)
    train(model, check.ours(param_groups(model, options), **options), steps)
    train(native_model, check.native(param_groups(native_model, options), **options), steps)
    return relative_error(flat_parameters(model), flat_parameters(native_model))


# The twin rule's factor for one 16-bit step: ours computes in float32 and
# rounds once per stored tensor, torch.optim in the dtype op by op, so ours is
# as close to float64 or closer (measured, the Triton kernels and the
# reference alike: 0.44-0.99 of torch's error); 10% for the last roundings
# landing either way.
HALF_STEP_TWIN_FACTOR = 1.1


def half_step_comparison(check: OptimizerCheck, options: dict, device, dtype) -> Comparison:
    """The update (parameters after one step minus before, exact in float64)
    of ours on ``dtype`` (float16/bfloat16) parameters and state, against
    torch's own from the very same values, gradients and state, by the twin
    rule: ours no further from torch's step in float64 than torch's step in
    ``dtype`` is, times ``HALF_STEP_TWIN_FACTOR``. A step that does nothing
    has error 1.

    Half trajectories are not compared: with the state stored in 16 bits,
    (1 - beta2) * g^2 underflows in float16 and a step divides by eps, after
    which two correct implementations drift apart by orders of magnitude. One
    step from a random mid-training state checks the math itself.

    Example::

        >>> half_step_comparison(OPTIMIZERS[0], {"lr": 0.1}, torch.device("cpu"), torch.bfloat16).ok
        True
    """
    generator = torch.Generator().manual_seed(2)
    start = small_model(device, torch.float32)
    native = check.native(param_groups(start, options), **options)
    train(start, native, 1)  # creates the twin's state
    with torch.no_grad():
        for param in start.parameters():
            # small parameters, so that one update spans many units in the last place
            param.copy_((param / 64).to(dtype))
        for state in native.state.values():
            for key, value in state.items():
                if key != "step":
                    # in [0.01, 0.02): a centered RMSprop's v - a^2 stays positive
                    value.copy_(((1 + torch.rand(value.shape, generator=generator)) / 100).to(device, dtype))
    state = native.state_dict()
    grads = {name: (torch.randn(p.shape, generator=generator) / 10).to(device, dtype)
             for name, p in start.named_parameters() if name != "unused"}

    def update(optimizer_class, model_dtype):
        model = copy.deepcopy(start).to(model_dtype)
        for name, param in model.named_parameters():
            param.grad = grads[name].to(model_dtype) if name in grads else None
        optimizer = optimizer_class(param_groups(model, options), **options)
        optimizer.load_state_dict(copy.deepcopy(state))
        before = flat_parameters(model).double()
        optimizer.step()
        return flat_parameters(model).double() - before

    return compare(update(check.ours, dtype), update(check.native, dtype), "update",
                   exact=update(check.native, torch.float64), factor=HALF_STEP_TWIN_FACTOR)


# The autograd contract: one float64 case per block and mode, its inputs built per device.

def randn(*shape, device="cpu", seed=0, away_from_zero=False):
    """A float64 tensor of ``shape``, seeded; |x| >= 0.2 with ``away_from_zero`` (off ReLU's kink)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (x + 0.2 * x.sign() if away_from_zero else x).to(device)


@dataclasses.dataclass(frozen=True)
class AutogradCase:
    """``ours`` against ``native`` on the float64 tensors ``inputs(device)``."""

    ours: Callable
    native: Callable
    inputs: Callable  # device -> the differentiable inputs, float64

    def make(self, device):
        return [t.requires_grad_() for t in self.inputs(device)]


LABELS = torch.tensor([0, 3, -100, 1, 3])
# No row ignored, no class weight, no smoothing: the common case, which the compiled eager CPU path takes.
PLAIN_LABELS = torch.tensor([0, 3, 2, 1, 3])
CLASS_WEIGHT = torch.tensor([0.5, 1.0, 2.0, 1.5], dtype=torch.float64)


def _index_case(**options):
    def ours(x):
        return tb.softmax_cross_entropy(x, LABELS.to(x.device), CLASS_WEIGHT.to(x.device), **options)

    def native(x):
        return F.cross_entropy(x, LABELS.to(x.device), CLASS_WEIGHT.to(x.device), **options)

    return AutogradCase(ours, native, lambda device: [randn(5, 4, device=device, seed=1)])


def _plain_index_case(reduction):
    return AutogradCase(lambda x: tb.softmax_cross_entropy(x, PLAIN_LABELS.to(x.device), reduction=reduction),
                        lambda x: F.cross_entropy(x, PLAIN_LABELS.to(x.device), reduction=reduction),
                        lambda device: [randn(5, 4, device=device, seed=1)])


def _probability_case(**options):
    return AutogradCase(
        lambda x, t, w: tb.softmax_cross_entropy(x, t, w, **options),
        lambda x, t, w: F.cross_entropy(x, t, w, **options),
        lambda device: [randn(5, 4, device=device, seed=1), randn(5, 4, device=device, seed=2).softmax(dim=1),
                        CLASS_WEIGHT.to(device, copy=True)])


def _dense_inputs(*x_shape, bias=True):
    return lambda device: [randn(*x_shape, device=device), randn(4, x_shape[-1], device=device, seed=1)] + (
        [randn(4, device=device, seed=2)] if bias else [])


def _dense_cross_entropy_case(labels=LABELS, **options):
    def ours(x, w, b):
        return tb.dense_cross_entropy(x, w, labels.to(x.device), b, chunk_rows=2, **options)

    def native(x, w, b):
        return F.cross_entropy(F.linear(x, w, b), labels.to(x.device), **options)

    return AutogradCase(ours, native, _dense_inputs(5, 3))


AUTOGRAD_CASES = {
    "relu": AutogradCase(tb.relu, F.relu, lambda device: [randn(3, 4, device=device, away_from_zero=True)]),
    "relu in place": AutogradCase(lambda x: tb.relu(x * 1, inplace=True), lambda x: F.relu(x * 1, inplace=True),
                                  lambda device: [randn(3, 4, device=device, away_from_zero=True)]),
    "dense": AutogradCase(tb.dense, F.linear, _dense_inputs(3, 5)),
    "dense relu": AutogradCase(lambda x, w, b: tb.dense(x, w, b, activation="relu"),
                               lambda x, w, b: F.relu(F.linear(x, w, b)), _dense_inputs(3, 5)),
    "dense no bias, 3-D input": AutogradCase(tb.dense, F.linear, _dense_inputs(2, 3, 5, bias=False)),
    "cross_entropy indices mean": _index_case(label_smoothing=0.2),
    "cross_entropy indices sum": _index_case(reduction="sum"),
    "cross_entropy indices none": _index_case(reduction="none", label_smoothing=0.1),
    "cross_entropy plain mean": _plain_index_case("mean"),
    "cross_entropy plain sum": _plain_index_case("sum"),
    "cross_entropy probabilities mean": _probability_case(label_smoothing=0.2),
    "cross_entropy probabilities none": _probability_case(reduction="none"),
    "dense_cross_entropy mean": _dense_cross_entropy_case(label_smoothing=0.1),
    "dense_cross_entropy sum": _dense_cross_entropy_case(reduction="sum"),
    "dense_cross_entropy none": _dense_cross_entropy_case(reduction="none", label_smoothing=0.1),
    "dense_cross_entropy plain mean": _dense_cross_entropy_case(PLAIN_LABELS),
    "dense_cross_entropy plain sum": _dense_cross_entropy_case(PLAIN_LABELS, reduction="sum"),
}
