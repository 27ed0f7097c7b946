"""``torchblocks check``: every block and optimizer against its native twin.

For each entry of ``BLOCKS``, on every available (device, backend) target and
each dtype: parity of the output and of every input gradient over the
block's cases, then ``gradcheck`` and ``gradgradcheck`` in float64. For each entry of
``OPTIMIZERS``: the parameters of a small model after ``TRAJECTORY_STEPS``
steps, against the twin's, for each option set. A new block or optimizer
plugs in by adding one entry; the loops and the table are shared.
"""

import copy
import dataclasses
import time
import warnings
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

import torchblocks
import torchblocks.optim
from torchblocks import _table, backend
from torchblocks.testing import parity, relative_error, tolerance, twin

ALL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


INTERPRETER_BFLOAT16 = "the Triton interpreter computes bfloat16 wrongly"


def _interpreted_bfloat16(device: str, backend_name: str, dtype: torch.dtype) -> bool:
    """True for the one target a row must skip: bfloat16 under the Triton interpreter."""
    return dtype == torch.bfloat16 and device == "cpu" and backend_name == "triton"


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


@dataclasses.dataclass
class Row:
    block: str
    device: str
    backend: str
    dtype: str
    check: str  # "parity", "gradcheck" or "gradgradcheck"
    cases: int
    max_rel_error: float  # NaN where the check has no error measure
    status: str  # "PASS", "FAIL" or "SKIP"
    note: str = ""


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

    def pair(**options):  # class weights go in options: native has no gradient for them
        return (lambda x, t: torchblocks.functional.softmax_cross_entropy(x, t, **options),
                lambda x, t: F.cross_entropy(x, t, **options))

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


def half_step_error(check: OptimizerCheck, options: dict, device, dtype) -> float:
    """Relative error of the update (parameters after one step minus before)
    of ours on ``dtype`` (float16/bfloat16) parameters and state, against the
    twin's from the very same values, gradients and state. The twin computes
    as ours does: for the Triton kernels, float32 math stored in ``dtype``
    (torch's step on float32 copies, rounded to ``dtype``); for the reference,
    torch's own multi-tensor (foreach) step in ``dtype``. A step that does
    nothing has error 1.

    Half trajectories are not compared: with the state stored in 16 bits,
    (1 - beta2) * g^2 underflows in float16 and a step divides by eps, after
    which two correct implementations drift apart by orders of magnitude. One
    step from a random mid-training state checks the math itself."""
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

    def update(optimizer_class, model_dtype, **extra):
        model = copy.deepcopy(start).to(model_dtype)
        for name, param in model.named_parameters():
            param.grad = grads[name].to(model_dtype) if name in grads else None
        optimizer = optimizer_class(param_groups(model, options), **options, **extra)
        optimizer.load_state_dict(copy.deepcopy(state))
        before = flat_parameters(model).to(dtype)
        optimizer.step()
        return flat_parameters(model).to(dtype).double() - before.double()

    ours = update(check.ours, dtype)
    if backend.use_triton(next(start.parameters())):
        return relative_error(ours, update(check.native, torch.float32))
    return relative_error(ours, update(check.native, dtype, foreach=True))


def run_optimizer(check: OptimizerCheck, device: str, backend_name: str):
    """One row per dtype for one optimizer on one target, each yielded as it is
    done: ``TRAJECTORY_STEPS`` steps in float32/float64, one step in float16/bfloat16."""
    with torchblocks.use_backend(backend_name):
        for dtype in check.dtypes:
            dtype_name = str(dtype).replace("torch.", "")
            half = dtype in (torch.float16, torch.bfloat16)
            name, steps = ("one step", 1) if half else ("trajectory", TRAJECTORY_STEPS)
            if _interpreted_bfloat16(device, backend_name, dtype):
                yield Row(check.name, device, backend_name, dtype_name, name, 0, float("nan"), "SKIP",
                          INTERPRETER_BFLOAT16)
                continue
            target = torch.device(device)
            errors = [half_step_error(check, options, target, dtype) if half
                      else trajectory_error(check, options, target, dtype) for options in check.option_sets]
            worst = max(errors)
            status = "PASS" if worst <= tolerance(dtype) else "FAIL"
            note = f"{steps} step{'s' if steps > 1 else ''}"
            if status == "FAIL":
                note += "; worst: " + ", ".join(f"{k}={v}" for k, v in check.option_sets[errors.index(worst)].items())
            yield Row(check.name, device, backend_name, dtype_name, name, len(errors), worst, status, note)


def targets(device: str = "all", backends: str = "all"):
    """The (device, backend) pairs this process can run."""
    found = [("cpu", "reference")]
    if backend.INTERPRETER and backend.TRITON_AVAILABLE:
        found.append(("cpu", "triton"))
    if torch.cuda.is_available():
        found.append(("cuda", "reference"))
        if backend.TRITON_AVAILABLE:
            found.append(("cuda", "triton"))
    return [(d, b) for d, b in found if device in ("all", d) and backends in ("all", b)]


def _parity_error(case: Case) -> float:
    """Largest relative error of the output and of each input gradient, the
    inputs handed over exactly as built (``torchblocks.testing.parity``)."""
    return parity(case.ours, case.native, case.inputs).max_error


def _differentiable_twins(case: Case):
    return [twin(t, t.is_floating_point()) if isinstance(t, torch.Tensor) else t for t in case.inputs]


def _gradcheck(case: Case) -> bool:
    return torch.autograd.gradcheck(case.ours, _differentiable_twins(case), raise_exception=False)


def _gradgradcheck(case: Case) -> bool:
    """Second derivatives, in fast mode (random projections, not every entry):
    the test suite runs the full check."""
    return torch.autograd.gradgradcheck(case.ours, _differentiable_twins(case), raise_exception=False,
                                        fast_mode=True)


def run_block(block: BlockCheck, device: str, backend_name: str):
    """The rows of one block on one target, each yielded as it is done: parity
    per dtype, then gradcheck and gradgradcheck."""
    with torchblocks.use_backend(backend_name):
        for dtype in block.dtypes:
            dtype_name = str(dtype).replace("torch.", "")
            if _interpreted_bfloat16(device, backend_name, dtype):
                yield Row(block.name, device, backend_name, dtype_name, "parity", 0, float("nan"), "SKIP",
                          INTERPRETER_BFLOAT16)
                continue
            cases = block.cases(torch.device(device), dtype)
            errors = [_parity_error(case) for case in cases]
            worst = max(errors)
            status = "PASS" if worst <= tolerance(dtype) else "FAIL"
            note = "" if status == "PASS" else "worst: " + cases[errors.index(worst)].label
            yield Row(block.name, device, backend_name, dtype_name, "parity", len(cases), worst, status, note)
        cases = [c for c in block.cases(torch.device(device), torch.float64) if c.gradcheck]
        for name, check in (("gradcheck", _gradcheck), ("gradgradcheck", _gradgradcheck)):
            failed = [c.label for c in cases if not check(c)]
            yield Row(block.name, device, backend_name, "float64", name, len(cases), float("nan"),
                      "FAIL" if failed else "PASS", ", ".join(failed))


# The representative set of ``run(quick=True)``: every block and optimizer,
# in float32 and float64, every optimizer's first two option sets.
QUICK_DTYPES = (torch.float32, torch.float64)
QUICK_OPTION_SETS = 2


def names() -> list:
    """The names ``run`` can select: every block, then every optimizer."""
    return [block.name for block in BLOCKS] + [check.name for check in OPTIMIZERS]


def run(device: str = "all", backends: str = "all", only=None, quick: bool = False, progress=None):
    """Every row for every block and optimizer (or those named in ``only``) on
    every available target.

    Args:
        device, backends: narrow the targets ("all", or one).
        only: names from ``names()``; None for all.
        quick: the representative set (``QUICK_DTYPES``, ``QUICK_OPTION_SETS``)
            instead of every dtype and option set.
        progress: called with one line per row as it is done.

    Example::

        >>> rows = torchblocks.check.run("cpu", "reference", only=["relu"], quick=True)
    """
    found = targets(device, backends)
    chosen = [entry for entry in [*BLOCKS, *OPTIMIZERS] if only is None or entry.name in only]
    rows = []
    with warnings.catch_warnings():
        # the interpreter computes with numpy, which warns on the inf and NaN the cases feed it on purpose
        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.runtime\.interpreter")
        for index, entry in enumerate(chosen):
            if quick:
                entry = dataclasses.replace(entry, dtypes=[d for d in entry.dtypes if d in QUICK_DTYPES])
                if isinstance(entry, OptimizerCheck):
                    entry = dataclasses.replace(entry, option_sets=entry.option_sets[:QUICK_OPTION_SETS])
            for target in found:
                started = time.perf_counter()
                for row in (run_block if isinstance(entry, BlockCheck) else run_optimizer)(entry, *target):
                    rows.append(row)
                    if progress is not None:
                        progress(f"[{index + 1}/{len(chosen)}] {row.block} {row.device}/{row.backend} {row.dtype} "
                                 f"{row.check}: {row.status} ({time.perf_counter() - started:.1f} s)")
                        started = time.perf_counter()
    return rows


def format_table(rows) -> str:
    """The rows as an aligned text table."""
    header = ("block", "device", "backend", "dtype", "check", "cases", "max rel err", "result", "note")
    body = [
        (r.block, r.device, r.backend, r.dtype, r.check, str(r.cases),
         "-" if r.max_rel_error != r.max_rel_error else f"{r.max_rel_error:.2e}", r.status, r.note)
        for r in rows
    ]
    return _table.format_table(header, body)
