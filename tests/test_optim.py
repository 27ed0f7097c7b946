"""torchblocks.optim against torch.optim: trajectories, state dicts, schedulers,
param groups, GradScaler, and bad input. The option sets and the small model
are the ones ``torchblocks check`` uses (torchblocks.cli.cases.OPTIMIZERS)."""

import copy
import os
import platform
import subprocess
import sys
from collections import Counter

import pytest
import torch

import torchblocks
import torchblocks.optim
from torchblocks import testing
from torchblocks._ops import _eager_cpu
from torchblocks.cli import cases
from torchblocks.optim import _multi_tensor
from torchblocks.testing import assert_close, relative_error, tolerance

def _options_id(options: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items())


CASES = [
    pytest.param(entry, options, id=f"{entry.name}-{_options_id(options)}")
    for entry in cases.OPTIMIZERS
    for options in entry.option_sets
]
ENTRIES = {entry.name: entry for entry in cases.OPTIMIZERS}


def _kept_state(options: dict) -> tuple:
    """Which buffers a step keeps besides the step count: a momentum buffer,
    a centered mean, a running maximum."""
    return bool(options.get("momentum")), bool(options.get("centered")), bool(options.get("amsgrad"))


def _first_of_each_kept_state() -> list:
    """Per optimizer, the first option set of each kind of state it keeps:
    what a state dict's layout depends on."""
    seen, kept = set(), []
    for case in CASES:
        entry, options = case.values
        kind = (entry.name, _kept_state(options))
        if kind not in seen:
            seen.add(kind)
            kept.append(case)
    return kept


STATE_CASES = _first_of_each_kept_state()
TRAJECTORY_DTYPES = [torch.float32, torch.float64]
needs_the_compiled_path = pytest.mark.skipif(os.environ.get("TORCHBLOCKS_EAGER_CPU") == "0",
                                             reason="TORCHBLOCKS_EAGER_CPU=0 turns it off")


def _pair(entry, options, device="cpu", dtype=torch.float32):
    """(our model, our optimizer, native model, native optimizer), from one start."""
    model = cases.small_model(device, dtype)
    native_model = copy.deepcopy(model)
    return (model, entry.ours(cases.param_groups(model, options), **options),
            native_model, entry.native(cases.param_groups(native_model, options), **options))


def _assert_same_parameters(model, native_model, what="parameters"):
    assert_close(cases.flat_parameters(model), cases.flat_parameters(native_model), what=what)


# Each option set in one dtype, float32 and float64 in turn within each optimizer's list (three or
# more sets each): every optimizer meets both dtypes, every option set is stepped.
TRAJECTORY_CASES = [
    pytest.param(entry, options, dtype, id=f"{entry.name}-{_options_id(options)}-{dtype}")
    for entry in cases.OPTIMIZERS
    for options, dtype in zip(entry.option_sets, TRAJECTORY_DTYPES * len(entry.option_sets))
]


@pytest.mark.parametrize("entry, options, dtype", TRAJECTORY_CASES)
def test_trajectory_matches_twin(target, entry, options, dtype):
    error = cases.trajectory_error(entry, options, torch.device(target.device), dtype)
    assert error <= tolerance(dtype), f"{cases.TRAJECTORY_STEPS} steps: relative error {error:.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("entry, options", CASES)
def test_half_step_is_as_close_to_float64_as_the_twin(target, entry, options, dtype):
    comparison = cases.half_step_comparison(entry, options, torch.device(target.device), dtype)
    assert comparison.ok, str(comparison)


@pytest.mark.python_path  # the step replaced by a no-op: nothing is stepped
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_step_check_fails_a_step_that_does_nothing(target, monkeypatch, dtype):
    """The half-precision check compares updates, not parameters: a no-op
    step (or one that drops the update) cannot pass it."""
    for entry in cases.OPTIMIZERS:
        monkeypatch.setattr(entry.ours, "_update", lambda self, group, params: None)
        for options in entry.option_sets:
            comparison = cases.half_step_comparison(entry, options, torch.device(target.device), dtype)
            assert comparison.error == 1.0 and not comparison.ok, (entry.name, options, comparison)


@pytest.mark.parametrize("entry, options", STATE_CASES)
def test_state_dict_round_trip_both_ways(target, entry, options):
    """torch -> torchblocks -> torch mid-training, then on: the same as the twin
    throughout (segments of multiples of 3 steps keep train()'s pattern)."""
    straight_model = cases.small_model(target.device, torch.float32)
    model = copy.deepcopy(straight_model)
    cases.train(straight_model, entry.native(cases.param_groups(straight_model, options), **options), 30)

    native = entry.native(cases.param_groups(model, options), **options)
    cases.train(model, native, 9)
    ours = entry.ours(cases.param_groups(model, options), **options)
    ours.load_state_dict(native.state_dict())
    cases.train(model, ours, 9)
    saved = ours.state_dict()
    assert {k: sorted(v) for k, v in saved["state"].items()} == {
        k: sorted(v) for k, v in native.state_dict()["state"].items()}
    native_again = entry.native(cases.param_groups(model, options), **options)
    native_again.load_state_dict(saved)
    cases.train(model, native_again, 12)
    _assert_same_parameters(model, straight_model)


@pytest.mark.parametrize("name", ENTRIES)
def test_state_dict_layout_matches_twin(name):
    entry = ENTRIES[name]
    options = entry.option_sets[-1]
    model, ours, native_model, native = _pair(entry, options)
    cases.train(model, ours, 3)
    cases.train(native_model, native, 3)
    ours_state, native_state = ours.state_dict(), native.state_dict()
    assert ours_state["param_groups"] == native_state["param_groups"]
    assert ours_state["state"].keys() == native_state["state"].keys()
    for index, native_entry in native_state["state"].items():
        for key, value in native_entry.items():
            mine = ours_state["state"][index][key]
            assert (mine.dtype, mine.device, mine.shape) == (value.dtype, value.device, value.shape), key
            assert_close(mine, value, what=f"state {index} {key}")


def _schedulers():
    from torch.optim import lr_scheduler as s

    return {
        "LambdaLR": lambda o: s.LambdaLR(o, lambda epoch: 0.9**epoch),
        "MultiplicativeLR": lambda o: s.MultiplicativeLR(o, lambda epoch: 0.95),
        "StepLR": lambda o: s.StepLR(o, step_size=5, gamma=0.5),
        "MultiStepLR": lambda o: s.MultiStepLR(o, milestones=[3, 8], gamma=0.3),
        "ConstantLR": lambda o: s.ConstantLR(o, factor=0.5, total_iters=4),
        "LinearLR": lambda o: s.LinearLR(o, start_factor=0.2, total_iters=10),
        "ExponentialLR": lambda o: s.ExponentialLR(o, gamma=0.9),
        "SequentialLR": lambda o: s.SequentialLR(
            o, [s.ConstantLR(o, factor=0.1, total_iters=2), s.ExponentialLR(o, gamma=0.9)], milestones=[2]),
        "PolynomialLR": lambda o: s.PolynomialLR(o, total_iters=15, power=2.0),
        "CosineAnnealingLR": lambda o: s.CosineAnnealingLR(o, T_max=10),
        "ChainedScheduler": lambda o: s.ChainedScheduler([s.ConstantLR(o, factor=0.5, total_iters=3),
                                                          s.ExponentialLR(o, gamma=0.9)]),
        "CyclicLR": lambda o: s.CyclicLR(o, base_lr=o.defaults["lr"] / 10, max_lr=o.defaults["lr"], step_size_up=4),
        "CosineAnnealingWarmRestarts": lambda o: s.CosineAnnealingWarmRestarts(o, T_0=4),
        "OneCycleLR": lambda o: s.OneCycleLR(o, max_lr=o.defaults["lr"], total_steps=20),
        "ReduceLROnPlateau": lambda o: s.ReduceLROnPlateau(o, patience=0, factor=0.5),
    }


class _PlateauStepper:
    """ReduceLROnPlateau steps on a metric: a rising one, so it acts."""

    def __init__(self, scheduler):
        self.scheduler, self.metric = scheduler, 0.0

    def step(self):
        self.metric += 1.0
        self.scheduler.step(self.metric)


# CyclicLR and OneCycleLR also write the momentum (SGD, RMSprop) or the betas (Adam, AdamW).
MOMENTUM_SCHEDULERS = ("CyclicLR", "OneCycleLR")


def _scheduler_cases():
    """What a scheduler writes into the groups, each optimizer must read at
    every step, on every path: the two schedulers that write momentum or
    betas with every optimizer; each of the others, which write the
    learning rate alone in patterns of their own, with one optimizer in
    turn, so that every optimizer meets three of those patterns."""
    names = list(ENTRIES)
    lr_only = [name for name in _schedulers() if name not in MOMENTUM_SCHEDULERS]
    return ([(scheduler, name) for scheduler in MOMENTUM_SCHEDULERS for name in names]
            + [(scheduler, names[index % len(names)]) for index, scheduler in enumerate(lr_only)])


@pytest.mark.parametrize("scheduler_name, name", _scheduler_cases())
def test_every_lr_scheduler(target, scheduler_name, name):
    """The learning rate (and OneCycle's/Cyclic's momentum or betas) is read
    from the group at each step."""
    options = {"SGD": dict(lr=0.05, momentum=0.9), "RMSprop": dict(lr=0.005, momentum=0.5)}.get(name, dict(lr=0.02))
    entry = ENTRIES[name]
    if scheduler_name == "CyclicLR" and name in ("Adam", "AdamW"):
        options = dict(options, betas=(0.9, 0.99))
    model, ours, native_model, native = _pair(entry, options, target.device)
    make = _schedulers()[scheduler_name]
    schedulers = [make(ours), make(native)]
    if scheduler_name == "ReduceLROnPlateau":
        schedulers = [_PlateauStepper(s) for s in schedulers]
    cases.train(model, ours, 20, scheduler=schedulers[0])
    cases.train(native_model, native, 20, scheduler=schedulers[1])
    assert [g["lr"] for g in ours.param_groups] == [g["lr"] for g in native.param_groups]
    _assert_same_parameters(model, native_model)


def test_add_param_group_and_zero_grad(target):
    torch.manual_seed(0)
    runs = []
    for optim_module in (torchblocks.optim, torch.optim):
        model = cases.small_model(target.device, torch.float32)
        optimizer = optim_module.Adam(model[0].parameters(), lr=0.01)
        cases.train(model, optimizer, 5)
        optimizer.add_param_group({"params": list(model[2].parameters()), "lr": 0.02, "amsgrad": True})
        cases.train(model, optimizer, 5)
        optimizer.zero_grad(set_to_none=False)
        assert all(p.grad is not None and not p.grad.any() for p in model[0].parameters())
        optimizer.zero_grad()
        assert all(p.grad is None for p in model.parameters())
        runs.append((model, optimizer))
    (model, ours), (native_model, native) = runs
    assert len(ours.state) == len(native.state)
    _assert_same_parameters(model, native_model)


def test_parameters_without_grad_are_skipped(target):
    model = cases.small_model(target.device, torch.float32)
    optimizer = torchblocks.optim.SGD(cases.param_groups(model, {}), lr=0.1, momentum=0.9)
    before = model.unused.detach().clone()
    cases.train(model, optimizer, 3)
    assert torch.equal(model.unused, before)
    assert model.unused not in optimizer.state


@pytest.mark.parametrize("name", ["SGD", "RMSprop", "Adam", "AdamW"])
def test_grad_scaler_unscales_and_skips_inf_steps(target, name):
    entry = ENTRIES[name]
    options = entry.option_sets[1]
    model, ours, native_model, native = _pair(entry, options, target.device)
    for run_model, optimizer in ((model, ours), (native_model, native)):
        scaler = torch.amp.GradScaler(target.device, init_scale=2.0**10, growth_interval=3)
        cases.train(run_model, optimizer, 6, scaler=scaler)
        optimizer.zero_grad()
        before = cases.flat_parameters(run_model).clone()
        run_model(torch.full((1, 40), float("inf"), device=target.device)).sum().backward()
        scale = scaler.get_scale()
        scaler.step(optimizer)  # an inf gradient: the step is skipped
        scaler.update()
        assert torch.equal(cases.flat_parameters(run_model), before)
        assert scaler.get_scale() == scale / 2
    _assert_same_parameters(model, native_model)


def test_closure_is_called_and_its_loss_returned(target):
    model = cases.small_model(target.device, torch.float32)
    optimizer = torchblocks.optim.RMSprop(model.parameters())
    x = torch.randn(4, 40, device=target.device)

    def closure():
        optimizer.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad


def test_tensor_learning_rate(target):
    model, ours, native_model, native = _pair(ENTRIES["Adam"], {}, target.device)
    for group in (*ours.param_groups, *native.param_groups):
        group["lr"] = torch.tensor(0.02)
    cases.train(model, ours, 10)
    cases.train(native_model, native, 10)
    _assert_same_parameters(model, native_model)


@pytest.mark.parametrize("name", ["SGD", "RMSprop", "Adam"])
def test_layouts_the_kernel_cannot_address_take_the_reference(target, name):
    """A non-dense parameter and a gradient laid out unlike its parameter."""
    entry = ENTRIES[name]
    options = entry.option_sets[1]
    params = []
    for _ in range(2):
        generator = torch.Generator().manual_seed(0)
        base = torch.randn(6, 8, generator=generator).to(target.device)
        params.append([torch.nn.Parameter(base[:, ::2]), torch.nn.Parameter(torch.randn(5, 7, generator=generator))])
    ours, native = entry.ours(params[0], **options), entry.native(params[1], **options)
    for step in range(5):
        generator = torch.Generator().manual_seed(step)
        grads = [torch.randn(6, 4, generator=generator), torch.randn(7, 5, generator=generator).t()]
        for group_params, optimizer in ((params[0], ours), (params[1], native)):
            for param, grad in zip(group_params, grads):
                param.grad = grad.to(target.device)
            optimizer.step()
    for mine, theirs in zip(*params):
        assert_close(mine, theirs)


def test_empty_parameter(target):
    param = torch.nn.Parameter(torch.empty(0, 3, device=target.device))
    optimizer = torchblocks.optim.Adam([param, torch.nn.Parameter(torch.ones(2, device=target.device))])
    param.grad = torch.empty_like(param)
    optimizer.step()
    assert optimizer.state[param]["step"].item() == 1


def test_mixed_dtypes_in_one_group(target):
    params = [torch.nn.Parameter(torch.ones(3, device=target.device, dtype=dtype))
              for dtype in (torch.float32, torch.float64, torch.float32)]
    native_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for group in (params, native_params):
        for p in group:
            p.grad = torch.full_like(p, 0.5)
    torchblocks.optim.SGD(params, lr=0.1, momentum=0.9).step()
    torch.optim.SGD(native_params, lr=0.1, momentum=0.9).step()
    for mine, theirs in zip(params, native_params):
        assert mine.dtype == theirs.dtype
        assert_close(mine, theirs)


@pytest.fixture
def stepped(monkeypatch):
    """A fresh ``_multi_tensor.entries_stepped`` for the test: how many entries
    (parameter, gradient, state) each implementation stepped."""
    counter = Counter()
    monkeypatch.setattr(_multi_tensor, "entries_stepped", counter)
    return counter


def _fast_implementation(target) -> str:
    """What steps dense parameters on ``target``: Triton (under the interpreter
    on the CPU), the compiled CPU step on reference-cpu (a build that failed
    fails the test rather than falling back unseen), else the foreach reference."""
    if target.backend == "triton":
        return "triton"
    return "compiled-cpu" if target.device == "cpu" and _eager_cpu._enabled else "reference"


def _real_values(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's values as a real tensor, for the tolerance helpers: a
    complex one's real view (real and imaginary parts), a sparse one dense."""
    tensor = tensor.detach()
    if tensor.is_sparse:
        tensor = tensor.to_dense()
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


def _assert_same_as_twin(ours, native, params, native_params):
    """Every parameter and every state tensor of ``ours`` as the twin's: the
    same keys, dtype, shape and layout (complex state stays complex, a sparse
    momentum buffer sparse), and the values within the dtype's tolerance."""
    for index, (param, native_param) in enumerate(zip(params, native_params)):
        assert_close(_real_values(param), _real_values(native_param), what=f"parameter {index}")
        state, native_state = ours.state[param], native.state[native_param]
        assert state.keys() == native_state.keys(), index
        for key, value in native_state.items():
            mine = state[key]
            assert (mine.dtype, mine.shape, mine.layout) == (value.dtype, value.shape, value.layout), (index, key)
            assert_close(_real_values(mine), _real_values(value), what=f"state {index} {key}")


def _complex_params(dtype, device, seed=0):
    """One group's parameters: two complex ones of ``dtype`` and a real one of its precision."""
    generator = torch.Generator().manual_seed(seed)
    shapes_and_dtypes = [((5, 3), dtype), ((4,), dtype.to_real()), ((7,), dtype)]
    return [torch.nn.Parameter(torch.randn(shape, generator=generator, dtype=dtype).to(device))
            for shape, dtype in shapes_and_dtypes]


def _complex_steps(optimizer, params, steps: range):
    """Step ``optimizer`` on gradients drawn from each step's index (complex
    ones with independent real and imaginary parts)."""
    for step in steps:
        generator = torch.Generator().manual_seed(100 + step)
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator, dtype=param.dtype).to(param.device)
        optimizer.step()


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=str)
@pytest.mark.parametrize("entry, options", CASES)
def test_complex_parameters_step_as_their_real_view_like_twin(target, stepped, entry, options, dtype):
    """Parameters and every state tensor after five steps, complex and real
    parameters in one group, as torch.optim's: a step that skipped them, lost
    their imaginary parts or kept a moment of the complex value (|g|^2 for
    re(g)^2, im(g)^2) would differ. The target's own implementation stepped
    every entry."""
    params, native_params = _complex_params(dtype, target.device), _complex_params(dtype, target.device)
    starts = [param.detach().clone() for param in params]
    ours, native = entry.ours(params, **options), entry.native(native_params, **options)
    _complex_steps(ours, params, range(5))
    _complex_steps(native, native_params, range(5))
    _assert_same_as_twin(ours, native, params, native_params)
    for start, native_param in zip(starts, native_params):  # the twin moved them: a no-op step cannot pass
        assert relative_error(_real_values(start), _real_values(native_param)) > tolerance(dtype.to_real())
    assert +stepped == Counter({_fast_implementation(target): 3 * 5})


@pytest.mark.parametrize("entry, options", STATE_CASES)
def test_complex_state_dict_round_trip_both_ways(target, stepped, entry, options):
    """torch -> torchblocks -> torch mid-training with complex parameters: the
    state dict ours saves holds the twin's keys, dtypes (complex) and shapes,
    and the run ends where the twin's own straight run does."""
    straight_params = _complex_params(torch.complex128, target.device)
    straight = entry.native(straight_params, **options)
    _complex_steps(straight, straight_params, range(9))

    params = _complex_params(torch.complex128, target.device)
    native = entry.native(params, **options)
    _complex_steps(native, params, range(3))
    ours = entry.ours(params, **options)
    ours.load_state_dict(native.state_dict())
    _complex_steps(ours, params, range(3, 6))
    saved, native_saved = ours.state_dict(), native.state_dict()
    assert saved["state"].keys() == native_saved["state"].keys()
    for index, native_entry in native_saved["state"].items():
        assert {key: (value.dtype, value.shape) for key, value in saved["state"][index].items()} == {
            key: (value.dtype, value.shape) for key, value in native_entry.items()}, index
    native_again = entry.native(params, **options)
    native_again.load_state_dict(saved)
    _complex_steps(native_again, params, range(6, 9))
    _assert_same_as_twin(native_again, straight, params, straight_params)
    assert +stepped == Counter({_fast_implementation(target): 3 * 3})


SPARSE_SGD_OPTIONS = [
    dict(lr=0.1),
    dict(lr=0.1, momentum=0.9),
    dict(lr=0.1, momentum=0.9, dampening=0.5),
    dict(lr=0.1, momentum=0.9, nesterov=True),
    dict(lr=0.05, maximize=True),
    dict(lr=0.05, momentum=0.8, maximize=True),
]


def _embedding_model(device):
    """An embedding with sparse gradients between two dense layers, in float64."""
    generator = torch.Generator().manual_seed(0)
    model = torch.nn.ModuleDict(dict(embedding=torch.nn.Embedding(10, 4, sparse=True),
                                     head=torch.nn.Linear(4, 3)))
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    return model.to(device=device, dtype=torch.float64)


def _embedding_steps(model, optimizer, steps: range):
    """Steps of mean squared error (its negative when the optimizer
    maximizes, so that the run converges) on rows that repeat within a batch
    (an uncoalesced gradient) and change between steps."""
    sign = -1 if optimizer.param_groups[0]["maximize"] else 1
    for step in steps:
        optimizer.zero_grad()
        rows = torch.tensor([1, 3, 3, 4 + step % 5, 1], device=model.head.weight.device)
        (sign * (model.head(model.embedding(rows)) - 1).square().mean()).backward()
        optimizer.step()


@pytest.mark.parametrize("options", SPARSE_SGD_OPTIONS, ids=_options_id)
def test_sparse_gradients_step_like_torch_sgd(target, stepped, options):
    """An Embedding(sparse=True) beside dense layers in one group, five steps:
    parameters and momentum buffers as torch.optim.SGD's (a sparse buffer for
    the embedding, as torch keeps it). The embedding takes the reference, the
    dense parameters the target's own implementation."""
    model, native_model = _embedding_model(target.device), _embedding_model(target.device)
    start = model.embedding.weight.detach().clone()
    ours = torchblocks.optim.SGD(model.parameters(), **options)
    native = torch.optim.SGD(native_model.parameters(), **options)
    _embedding_steps(model, ours, range(5))
    _embedding_steps(native_model, native, range(5))
    assert model.embedding.weight.grad.is_sparse
    _assert_same_as_twin(ours, native, list(model.parameters()), list(native_model.parameters()))
    assert relative_error(start, native_model.embedding.weight) > tolerance(torch.float64)
    assert +stepped == Counter({_fast_implementation(target): 2 * 5}) + Counter({"reference": 5})


@pytest.mark.parametrize("options", [options for options in SPARSE_SGD_OPTIONS if options.get("momentum")],
                         ids=_options_id)
def test_sparse_momentum_state_dict_round_trip_both_ways(target, options):
    """torch -> torchblocks -> torch mid-training with a sparse momentum
    buffer: the run ends where the twin's own straight run does."""
    straight_model, model = _embedding_model(target.device), _embedding_model(target.device)
    _embedding_steps(straight_model, torch.optim.SGD(straight_model.parameters(), **options), range(9))
    native = torch.optim.SGD(model.parameters(), **options)
    _embedding_steps(model, native, range(3))
    ours = torchblocks.optim.SGD(model.parameters(), **options)
    ours.load_state_dict(native.state_dict())
    _embedding_steps(model, ours, range(3, 6))
    assert ours.state_dict()["state"][0]["momentum_buffer"].is_sparse
    native_again = torch.optim.SGD(model.parameters(), **options)
    native_again.load_state_dict(ours.state_dict())
    _embedding_steps(model, native_again, range(6, 9))
    for param, straight_param in zip(model.parameters(), straight_model.parameters()):
        assert_close(param, straight_param)


@pytest.mark.python_path  # refused before any step: nothing is stepped
@pytest.mark.parametrize("name, options", [
    ("RMSprop", {}),
    ("Adam", {}),
    ("AdamW", dict(amsgrad=True)),
    ("SGD", dict(weight_decay=0.1)),
    ("SGD", dict(momentum=0.9, weight_decay=0.1)),
    ("SGD", dict(fused=True)),
])
def test_sparse_gradients_are_refused_where_torch_refuses(target, name, options):
    """The twin's exception type and words, the parameter named, and nothing
    of the group written: the dense parameter before the embedding included."""
    errors = []
    for optim_module in (torch.optim, torchblocks.optim):
        model = _embedding_model(target.device)
        named = [("head.weight", model.head.weight), ("embedding.weight", model.embedding.weight)]
        optimizer = getattr(optim_module, name)(named, **options)
        model.head(model.embedding(torch.tensor([1, 3, 3], device=target.device))).sum().backward()
        before = [param.detach().clone() for _, param in named]
        with pytest.raises(Exception) as error:
            optimizer.step()
        errors.append(error.value)
    native_error, our_error = errors
    assert type(our_error) is type(native_error)
    assert str(native_error) in str(our_error)
    assert "parameter 'embedding.weight' (1 of param group 0, shape (10, 4)) has a sparse gradient" in str(our_error)
    assert all(torch.equal(param, start) for (_, param), start in zip(named, before))
    assert not optimizer.state


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_fused_with_complex_parameters_fails_as_in_torch_optim(name):
    """fused=True takes floating-point parameters only: torch's RuntimeError, word for word."""
    errors = []
    for optim_module in (torch.optim, torchblocks.optim):
        params = _complex_params(torch.complex64, "cpu")
        optimizer = getattr(optim_module, name)(params, fused=True)
        with pytest.raises(RuntimeError) as error:
            _complex_steps(optimizer, params, range(1))
        errors.append(error.value)
    assert str(errors[1]) == str(errors[0])


@pytest.mark.parametrize("name, options", [
    ("SGD", dict(lr=-0.1)),
    ("SGD", dict(lr=torch.tensor([0.1, 0.2]))),
    ("SGD", dict(momentum=-1)),
    ("SGD", dict(weight_decay=-1e-4)),
    ("SGD", dict(nesterov=True)),
    ("SGD", dict(momentum=0.9, dampening=0.1, nesterov=True)),
    ("SGD", dict(fused=True, foreach=True)),
    ("SGD", dict(fused=True, differentiable=True)),
    ("RMSprop", dict(alpha=-0.5)),
    ("RMSprop", dict(eps=-1e-8)),
    ("RMSprop", dict(momentum=-0.1)),
    ("RMSprop", dict(lr=torch.tensor([0.1, 0.2]))),
    ("Adam", dict(betas=(1.0, 0.999))),
    ("Adam", dict(betas=(0.9, -0.1))),
    ("Adam", dict(eps=-1.0)),
    ("Adam", dict(lr=torch.tensor([0.1, 0.2]))),
    ("Adam", dict(lr=torch.tensor(0.1), foreach=True)),
    ("Adam", dict(betas=(torch.tensor(0.9), torch.tensor(0.99)), foreach=True)),
    ("Adam", dict(betas=(torch.tensor(0.9), 0.99))),
    ("Adam", dict(betas=(0, 0.99))),
    ("Adam", dict(betas=(torch.tensor([0.9, 0.8]), torch.tensor(0.99)))),
    ("Adam", dict(fused=True, foreach=True)),
    ("Adam", dict(fused=True, foreach=True, differentiable=True)),
    ("AdamW", dict(fused=True, differentiable=True)),
    ("AdamW", dict(weight_decay=-0.01)),
    ("AdamW", dict(lr=torch.tensor(0.1), foreach=True)),
])
def test_bad_hyperparameters_fail_as_in_torch_optim(name, options):
    """The same exception type and message as the twin's, for the same arguments."""
    params = [torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(Exception) as native_error:
        getattr(torch.optim, name)(params, **options)
    with pytest.raises(type(native_error.value)) as ours_error:
        getattr(torchblocks.optim, name)(params, **options)
    assert type(ours_error.value) is type(native_error.value)
    assert str(ours_error.value) == str(native_error.value)


# ---- differentiable=True: autograd through the steps ---------------------------------------------
# The parameters are tensors computed from leaves; each step's gradients are those of a loss of a copy
# of the parameters, taken with create_graph=True, so they depend on the parameters; the gradient of a
# loss of the stepped parameters then reaches the leaves through every step's parameters, gradients and
# state, and reaches the hyperparameters given as tensors that require grad (those torch.optim's own
# tests differentiate: SGD's lr and weight_decay; Adam's and AdamW's lr, betas and weight_decay; and
# RMSprop's lr, which torch.optim.RMSprop refuses). Every step takes the reference.

DIFFERENTIABLE_SHAPES = [(3, 4), (5,), (2, 3, 2)]


def _leaves(shapes):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator, dtype=torch.float64, requires_grad=True) for shape in shapes]


def _tensor_hyperparameters(name) -> dict:
    """Fresh float64 tensors that require grad, by argument name (Adam's betas as a pair)."""
    def tensor(value):
        return torch.tensor(value, dtype=torch.float64, requires_grad=True)

    if name == "SGD":
        return dict(lr=tensor(0.1), weight_decay=tensor(0.05))
    if name == "RMSprop":
        return dict(lr=tensor(0.01))
    return dict(lr=tensor(0.01), betas=(tensor(0.9), tensor(0.999)), weight_decay=tensor(0.1))


def _flat(hyperparameters: dict) -> list:
    return [tensor for value in hyperparameters.values()
            for tensor in (value if isinstance(value, tuple) else (value,))]


def _rebuilt(hyperparameters: dict, tensors) -> dict:
    """``hyperparameters`` with its tensors replaced, in ``_flat``'s order, by ``tensors``."""
    tensors = iter(tensors)
    return {key: tuple(next(tensors) for _ in value) if isinstance(value, tuple) else next(tensors)
            for key, value in hyperparameters.items()}


def _through_steps(module, name, options, leaves, hyperparameters):
    """Three differentiable steps of ``module``'s optimizer ``name`` on parameters computed from
    ``leaves``, with ``options`` and ``hyperparameters``: (stepped parameters, their states)."""
    params = [leaf * 1 for leaf in leaves]
    optimizer = getattr(module, name)(params, **{**options, **hyperparameters}, differentiable=True)
    for step in range(3):
        copies = [param.clone() for param in params]
        loss = sum((copy.sin() * (i + 1 + step) + copy.square()).sum() for i, copy in enumerate(copies))
        for param, grad in zip(params, torch.autograd.grad(loss, copies, create_graph=True)):
            param.grad = grad
        optimizer.step()
    return params, [optimizer.state[param] for param in params]


def _differentiable_id(value):
    return _options_id(value) if isinstance(value, dict) else "tensor-hyperparameters" if value is True else \
        "" if value is False else str(value)


# (name, options, tensor hyperparameters): torch.optim computes each
DIFFERENTIABLE_TWIN_CASES = [
    ("SGD", dict(lr=0.1), False),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True), False),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.1, maximize=True), False),
    ("SGD", dict(lr=0.1, momentum=0.9, foreach=True), False),
    ("SGD", {}, True),
    ("SGD", dict(momentum=0.9, nesterov=True), True),
    ("RMSprop", dict(lr=0.01), False),
    ("RMSprop", dict(lr=0.01, momentum=0.5, weight_decay=0.1, maximize=True), False),
    ("Adam", dict(lr=0.01), False),
    ("Adam", dict(lr=0.01, weight_decay=0.1, maximize=True), False),
    ("AdamW", dict(lr=0.01, weight_decay=0.1), False),
    ("Adam", {}, True),
    ("AdamW", {}, True),
]


@pytest.mark.python_path  # a differentiable step takes the reference on every backend
@pytest.mark.parametrize("name, options, tensor_hyperparameters", DIFFERENTIABLE_TWIN_CASES, ids=_differentiable_id)
def test_differentiable_steps_match_twin_with_their_gradients(target, stepped, name, options, tensor_hyperparameters):
    """Parameters, state, and the gradients through the steps into the leaves and hyperparameters."""
    results = []
    for module in (torchblocks.optim, torch.optim):
        leaves = _leaves(DIFFERENTIABLE_SHAPES)
        hyperparameters = _tensor_hyperparameters(name) if tensor_hyperparameters else {}
        params, states = _through_steps(module, name, options, leaves, hyperparameters)
        gradients = torch.autograd.grad(sum(param.cos().sum() for param in params), leaves + _flat(hyperparameters))
        results.append((params, states, gradients))
    (params, states, gradients), (native_params, native_states, native_gradients) = results
    for index, (param, native_param) in enumerate(zip(params, native_params)):
        assert_close(param, native_param, what=f"parameter {index}")
        assert states[index].keys() == native_states[index].keys()
        for key, value in native_states[index].items():
            assert_close(states[index][key], value, what=f"state {key} of parameter {index}")
    for index, (gradient, native_gradient) in enumerate(zip(gradients, native_gradients)):
        assert_close(gradient, native_gradient, what=f"gradient {index} through the steps")
    assert stepped == Counter(reference=3 * len(DIFFERENTIABLE_SHAPES))


@pytest.mark.parametrize("name, options, tensor_hyperparameters", [
    ("SGD", dict(lr=0.1, weight_decay=0.1, maximize=True), True),
    ("RMSprop", dict(lr=0.01, centered=True, momentum=0.5, weight_decay=0.1), True),
    ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1), True),
    ("AdamW", dict(lr=0.01, amsgrad=True), True),
    ("Adam", dict(lr=0.01, maximize=True), False),
], ids=_differentiable_id)
def test_differentiable_steps_pass_gradcheck(stepped, name, options, tensor_hyperparameters):
    """The gradients through three steps against finite differences, also where torch.optim has none
    to compare with: its centered RMSprop and amsgrad raise on the backward, a step having written a
    tensor their backward kept. (SGD with momentum is left out: its first momentum buffer is a detached
    copy of the gradient, as torch.optim.SGD's, which finite differences do not detach.)"""
    leaves = _leaves([(2, 2), (3,)])
    hyperparameters = _tensor_hyperparameters(name) if tensor_hyperparameters else {}

    def stepped_parameters(*inputs):
        params, _ = _through_steps(torchblocks.optim, name, options, inputs[:len(leaves)],
                                   _rebuilt(hyperparameters, inputs[len(leaves):]))
        return tuple(params)

    assert torch.autograd.gradcheck(stepped_parameters, (*leaves, *_flat(hyperparameters)))
    assert set(stepped) == {"reference"}


@pytest.mark.parametrize("view", [False, True], ids=["leaf", "view-of-a-leaf"])
@pytest.mark.parametrize("name", ["SGD", "RMSprop", "Adam", "AdamW"])
def test_differentiable_refuses_a_leaf_that_requires_grad_before_writing(name, view):
    """torch.optim's in-place step raises a RuntimeError on it (having written the state); ours
    raises the same type first, and leaves the parameter and the state as they were."""
    def step(module):
        leaf = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
        param = leaf[1:] if view else leaf
        param.grad = torch.ones_like(param)
        options = dict(momentum=0.5) if name in ("SGD", "RMSprop") else dict(amsgrad=True)
        return getattr(module, name)([param], lr=0.1, **options, differentiable=True), param

    optimizer, param = step(torchblocks.optim)
    testing.assert_rejected_like_native(optimizer.step, lambda: step(torch.optim)[0].step(),
                                        "is a leaf that requires grad")
    assert torch.equal(param.detach(), torch.ones_like(param)) and not optimizer.state


@pytest.mark.parametrize("name", ["RMSprop", "Adam", "AdamW"])
def test_differentiable_with_foreach_fails_as_in_torch_optim(name):
    """torch.optim.RMSprop's and Adam's foreach steps refuse differentiable=True (an AssertionError at
    the step); SGD's steps (test_differentiable_steps_match_twin_with_their_gradients)."""
    def step(module):
        param = torch.ones(3, dtype=torch.float64, requires_grad=True) * 1
        param.grad = torch.ones(3, dtype=torch.float64)
        return getattr(module, name)([param], foreach=True, differentiable=True)

    ours = step(torchblocks.optim)
    testing.assert_rejected_like_native(ours.step, lambda: step(torch.optim).step(),
                                        "foreach=True with differentiable=True")
    assert not ours.state


def test_differentiable_adam_refuses_a_step_count_that_requires_grad():
    def step(module):
        param = torch.ones(3, dtype=torch.float64, requires_grad=True) * 1
        param.grad = torch.ones(3, dtype=torch.float64)
        optimizer = module.Adam([param], differentiable=True)
        optimizer.step()
        optimizer.state[param]["step"] = torch.tensor(1.0, requires_grad=True)
        return optimizer

    testing.assert_rejected_like_native(step(torchblocks.optim).step, lambda: step(torch.optim).step(),
                                        "`requires_grad` is not supported for `step`")


@pytest.mark.parametrize("name", ["SGD", "RMSprop", "Adam", "AdamW"])
def test_the_differentiable_flag_not_the_grad_mode_decides_what_is_recorded(name):
    """As in torch.optim: differentiable=True records the step under torch.no_grad too; without it a
    step under enable_grad records nothing (a leaf that requires grad steps in place)."""
    for module in (torchblocks.optim, torch.optim):
        leaf = torch.ones(3, dtype=torch.float64, requires_grad=True)
        param = leaf * 1
        param.grad = torch.ones(3, dtype=torch.float64)
        with torch.no_grad():
            getattr(module, name)([param], lr=0.1, differentiable=True).step()
        assert param.grad_fn is not None and torch.autograd.grad(param.sum(), leaf)[0].shape == (3,)
        leaf.grad = torch.ones(3, dtype=torch.float64)
        with torch.enable_grad():
            getattr(module, name)([leaf], lr=0.1).step()
        assert leaf.grad_fn is None and not torch.equal(leaf.detach(), torch.ones(3, dtype=torch.float64))


# The compiled eager path takes RMSprop's capturable step with a float lr;
# Adam's and AdamW's capturable steps, and a tensor lr on the device, take the
# reference: marked python_path, those cases have no reference-cpu variant.
CAPTURABLE_REFERENCE = pytest.mark.python_path
CAPTURABLE_CASES = [
    ("RMSprop", dict(lr=0.01)),
    ("RMSprop", dict(lr=0.01, alpha=0.9, eps=1e-4, momentum=0.5, centered=True, weight_decay=0.1)),
    pytest.param("Adam", dict(lr=0.01, weight_decay=0.1, amsgrad=True), marks=CAPTURABLE_REFERENCE),
    pytest.param("Adam", dict(lr=0.01, betas=(0.0, 0.9), maximize=True), marks=CAPTURABLE_REFERENCE),
    pytest.param("AdamW", dict(lr=0.01, weight_decay=0.1), marks=CAPTURABLE_REFERENCE),
]
TENSOR_LR = [False, pytest.param(True, marks=CAPTURABLE_REFERENCE)]


@pytest.fixture
def capturable_on_cpu(monkeypatch):
    """torch.optim takes capturable=True only on devices that capture graphs.
    On the CPU the capturable step is checked for what capture needs (state
    on the device, no host reads) with the CPU allowed, for the twin as for ours."""
    import importlib

    def allowed(supports_xla=True):
        return ["cuda", "cpu"]

    for module in (importlib.import_module("torch.optim.adam"), importlib.import_module("torch.optim.rmsprop"),
                   _multi_tensor):
        monkeypatch.setattr(module, "_get_capturable_supported_devices", allowed)


def _capturable_pair(target, name, options, tensor_lr):
    model, ours, native_model, native = _pair(ENTRIES[name], dict(options, capturable=True), target.device)
    if tensor_lr:
        for group in (*ours.param_groups, *native.param_groups):
            group["lr"] = torch.tensor(group["lr"], device=target.device)
    return model, ours, native_model, native


@pytest.mark.parametrize("tensor_lr", TENSOR_LR, ids=["", "tensor-lr"])
@pytest.mark.parametrize("name, options", CAPTURABLE_CASES, ids=lambda v: str(v))
def test_capturable_trajectory_and_state_match_twin(target, capturable_on_cpu, name, options, tensor_lr):
    model, ours, native_model, native = _capturable_pair(target, name, options, tensor_lr)
    cases.train(model, ours, 10)
    cases.train(native_model, native, 10)
    _assert_same_parameters(model, native_model)
    for param, native_param in zip(model.parameters(), native_model.parameters()):
        if param in ours.state:
            step, native_step = ours.state[param]["step"], native.state[native_param]["step"]
            assert (step.device, step.dtype, step.shape) == (native_step.device, native_step.dtype, native_step.shape)
            assert step.item() == native_step.item()


@pytest.mark.parametrize("tensor_lr", TENSOR_LR, ids=["", "tensor-lr"])
@pytest.mark.parametrize("name", ["RMSprop", pytest.param("Adam", marks=CAPTURABLE_REFERENCE),
                                  pytest.param("AdamW", marks=CAPTURABLE_REFERENCE)])
def test_capturable_step_reads_nothing_on_the_host(target, capturable_on_cpu, name, tensor_lr):
    """No .item(), float(), .tolist(), .cpu() on the step path, from the first
    step (which creates the state) on; the non-capturable step, which reads
    its step counts (Adam) or its tensor lr (RMSprop), is caught by the same guard."""
    model, ours, native_model, native = _capturable_pair(target, name, {}, tensor_lr)
    inputs = torch.randn(8, 40, device=target.device)
    for optimizer, network in ((ours, model), (native, native_model)):
        for _ in range(2):
            network(inputs).square().mean().backward()
            with testing.no_host_reads():
                optimizer.step()
    model, ours, _, _ = _pair(ENTRIES[name], {"lr": torch.tensor(1e-3)} if name == "RMSprop" else {}, target.device)
    model(inputs).square().mean().backward()
    with pytest.raises(testing.HostRead), testing.no_host_reads():
        ours.step()


@pytest.mark.parametrize("name", ["RMSprop", "Adam", "AdamW"])
def test_capturable_on_a_device_torch_cannot_capture_fails_as_in_torch_optim(name):
    for optimizer_class in (getattr(torch.optim, name), getattr(torchblocks.optim, name)):
        param = torch.nn.Parameter(torch.ones(3))
        param.grad = torch.ones(3)
        with pytest.raises(AssertionError, match="If capturable=True, params and state_steps must be on supported "
                                                 r"devices: \['cuda'"):
            optimizer_class([param], capturable=True).step()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["RMSprop", "Adam", "AdamW"])
def test_capturable_step_replays_in_a_cuda_graph(target, name):
    """Ours captured once in a CUDA graph and replayed, against the twin's
    capturable step run eagerly, on the same gradients."""
    model, ours, native_model, native = _pair(ENTRIES[name], dict(lr=0.01, capturable=True), "cuda")
    params = [p for p in model.parameters() if p is not model.unused]
    native_params = [p for p in native_model.parameters() if p is not native_model.unused]
    generator = torch.Generator(device="cuda").manual_seed(0)
    for param in (*params, *native_params):
        param.grad = torch.zeros_like(param)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up: state, autotuning and the launch tables
            ours.step()
            native.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ours.step()
    for _ in range(5):
        for param, native_param in zip(params, native_params):
            param.grad.copy_(torch.randn(param.shape, device="cuda", generator=generator))
            native_param.grad.copy_(param.grad)
        graph.replay()
        native.step()
    torch.cuda.synchronize()
    _assert_same_parameters(model, native_model)


@pytest.mark.parametrize("name, options", [
    ("Adam", dict(betas=(torch.tensor([0.8]), torch.tensor(0.99)))),
    ("Adam", dict(lr=torch.tensor(0.01), betas=[0.8, 0.9])),
])
def test_hyperparameters_torch_accepts_are_accepted(name, options):
    param, native_param = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    ours, native = getattr(torchblocks.optim, name)([param], **options), getattr(torch.optim, name)([native_param], **options)
    assert str(ours.defaults["betas"]) == str(native.defaults["betas"])
    for p, optimizer in ((param, ours), (native_param, native)):
        p.grad = torch.tensor([0.5, -1.0, 2.0])
        optimizer.step()
    assert_close(param, native_param)


@pytest.mark.parametrize("name", ["SGD", "RMSprop", "Adam", "AdamW"])
def test_defaults_match_twin(name):
    param = torch.nn.Parameter(torch.ones(2))
    ours, native = getattr(torchblocks.optim, name)([param]), getattr(torch.optim, name)([param])
    assert ours.defaults == native.defaults
    assert isinstance(ours, torch.optim.Optimizer)


def test_adam_state_dict_loads_into_adamw_as_decoupled():
    param = torch.nn.Parameter(torch.ones(2))
    adamw = torchblocks.optim.AdamW([param])
    adamw.load_state_dict(torchblocks.optim.Adam([param]).state_dict())
    assert adamw.param_groups[0]["decoupled_weight_decay"] is True


def test_reference_in_small_batches_matches_twin(monkeypatch):
    """The reference splits long lists into cache-sized batches; batches of a
    tensor or two give the same trajectories."""
    monkeypatch.setattr(_eager_cpu, "_enabled", False)
    for optimizer_class in (_multi_tensor.MultiTensorOptimizer, torchblocks.optim.SGD):
        monkeypatch.setattr(optimizer_class, "reference_batch_elements", 64)
    with torchblocks.use_backend("reference"):
        for entry in cases.OPTIMIZERS:
            error = cases.trajectory_error(entry, entry.option_sets[-1], torch.device("cpu"), torch.float32)
            assert error <= tolerance(torch.float32), entry.name


@pytest.mark.parametrize("name, batches", [("SGD", 1), ("RMSprop", 3), ("Adam", 3)])
def test_the_reference_steps_in_cache_sized_batches_but_sgd_in_one(monkeypatch, name, batches):
    """RMSprop and Adam make several passes that reuse a batch while it is in
    cache; SGD's passes do not, so its whole list is one batch."""
    monkeypatch.setattr(_eager_cpu, "_enabled", False)
    module = sys.modules[getattr(torchblocks.optim, name).__module__]
    reference = getattr(module, f"{name.lower()}_reference")
    calls = []
    monkeypatch.setattr(module, f"{name.lower()}_reference", lambda params, *a, **k: (
        calls.append(len(params)), reference(params, *a, **k)))
    params = [torch.nn.Parameter(torch.zeros(400_000)) for _ in range(6)]  # 2.4M elements: 3 batches of 2 tensors
    for param in params:
        param.grad = torch.ones_like(param)
    with torchblocks.use_backend("reference"):
        getattr(torchblocks.optim, name)(params).step()
    assert len(calls) == batches and sum(calls) == len(params)


@pytest.mark.parametrize("name", ["SGD", "RMSprop", "Adam"])
def test_a_lazily_negated_gradient_steps_as_its_values(target, name):
    """A gradient with torch._neg_view's negative bit (memory holding -g)
    steps as g: the Triton and compiled steps, which read memory through
    pointers, leave it to the reference."""
    entry = ENTRIES[name]
    options = entry.option_sets[1]
    params = [torch.nn.Parameter(torch.ones(4, 3, device=target.device)) for _ in range(2)]
    ours, native = entry.ours([params[0]], **options), entry.native([params[1]], **options)
    for step in range(3):
        grad = torch.randn(4, 3, generator=torch.Generator().manual_seed(step)).to(target.device)
        params[0].grad, params[1].grad = torch._neg_view(-grad), grad
        ours.step()
        native.step()
    assert params[0].grad.is_neg()
    assert_close(params[0], params[1])


@pytest.mark.parametrize("entry", cases.OPTIMIZERS, ids=lambda entry: entry.name)
def test_a_step_is_an_in_place_write_to_autograd(target, entry):
    """A graph that saved a parameter raises on backward after a step, as
    with torch.optim, rather than computing with the stepped values."""
    for optimizer_class in (entry.native, entry.ours):
        param = torch.nn.Parameter(torch.ones(3, device=target.device))
        loss = (param * param).sum()
        loss.backward(retain_graph=True)
        optimizer_class([param], lr=0.1).step()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def _refuse_the_reference(monkeypatch, entry):
    """Make the foreach reference of ``entry``'s optimizer fail if it runs."""
    module = sys.modules[entry.ours.__module__]
    name = next(name for name in vars(module) if name.endswith("_reference"))

    def refuse(*args, **kwargs):
        raise AssertionError(f"{name} ran: the compiled step left an entry it should have taken")

    monkeypatch.setattr(module, name, refuse)


@pytest.mark.eager_cpu
@needs_the_compiled_path
@pytest.mark.parametrize("dtype", TRAJECTORY_DTYPES, ids=str)
@pytest.mark.parametrize("entry, options", CASES)
def test_compiled_cpu_step_split_over_threads_matches_twin(monkeypatch, entry, options, dtype):
    """Plain CPU tensors on the reference backend take the one-pass compiled
    step (optim_cpu.cpp) and never the foreach reference. 100,003 elements
    split over two threads: the second starts off a 16-byte boundary and the
    loops end off the vector width."""
    assert _eager_cpu.module() is not None, _eager_cpu.build_error()
    _refuse_the_reference(monkeypatch, entry)
    generator = torch.Generator().manual_seed(0)
    starts = [torch.randn(100_003, generator=generator, dtype=dtype) / 4,
              torch.randn(7, 5, generator=generator, dtype=dtype) / 4]
    params, native_params = ([torch.nn.Parameter(start.clone()) for start in starts] for _ in range(2))
    with torchblocks.use_backend("reference"):
        ours, native = entry.ours(params, **options), entry.native(native_params, **options)
        for step in range(5):
            for param, native_param in zip(params, native_params):
                param.grad = torch.randn(param.shape, generator=generator, dtype=dtype)
                native_param.grad = param.grad.clone()
            ours.step()
            native.step()
    for param, native_param, start in zip(params, native_params, starts):
        assert not torch.equal(native_param, start)
        error = relative_error(param, native_param)
        assert error <= tolerance(dtype), f"{tuple(param.shape)}: relative error {error:.3g}"


def _compiled_cpu_trajectories():
    """{case id: the parameters after three compiled CPU steps}, every option set in float32 and float64."""
    trajectories = {}
    for case in CASES:
        entry, options = case.values
        for dtype in TRAJECTORY_DTYPES:
            # drawn in float64: torch's float32 randn draws other numbers in AVX2
            generator = torch.Generator().manual_seed(0)
            params = [torch.nn.Parameter(torch.randn(100_003, generator=generator, dtype=torch.float64).to(dtype) / 4)]
            optimizer = entry.ours(params, **options)
            for step in range(3):
                params[0].grad = torch.randn(params[0].shape, generator=generator, dtype=torch.float64).to(dtype)
                optimizer.step()
            trajectories[f"{case.id}-{dtype}"] = params[0].detach()
    return trajectories


@pytest.mark.eager_cpu
@needs_the_compiled_path
def test_compiled_cpu_steps_run_in_torchs_instruction_set():
    """AVX2 loops on x86-64 where torch's own CPU kernels run AVX2 or AVX-512, else the baseline loops."""
    x86 = platform.machine().lower() in ("x86_64", "amd64") and sys.platform != "win32"
    vector = x86 and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    assert _eager_cpu.module().step_instruction_set() == ("avx2" if vector else "baseline")


@pytest.mark.eager_cpu
@needs_the_compiled_path
def test_compiled_cpu_steps_give_the_same_numbers_in_both_instruction_sets(tmp_path):
    """Under ATEN_CPU_CAPABILITY=default (a child process: torch reads it
    once) the steps run the baseline loops, which an AVX2 machine runs
    nowhere else. Neither set fuses a multiply-add, so both give the same
    numbers to the bit; this process's match the twin (the test above)."""
    if _eager_cpu.module().step_instruction_set() == "baseline":
        pytest.skip("the baseline loops are this process's: the tests above cover them")
    saved = tmp_path / "baseline.pt"
    code = ("import sys, torch; from torchblocks._ops import _eager_cpu; "
            f"sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_optim; "
            "assert _eager_cpu.module().step_instruction_set() == 'baseline'; "
            f"torch.save(test_optim._compiled_cpu_trajectories(), {str(saved)!r})")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "ATEN_CPU_CAPABILITY": "default"})
    baseline, avx2 = torch.load(saved), _compiled_cpu_trajectories()
    assert baseline.keys() == avx2.keys()
    different = [case for case in avx2 if not torch.equal(avx2[case], baseline[case])]
    assert not different, f"AVX2 and the baseline loops differ in {different}"


@pytest.mark.eager_cpu
@pytest.mark.parametrize("entry", cases.OPTIMIZERS, ids=lambda entry: entry.name)
def test_under_a_compiling_trace_the_reference_steps(monkeypatch, entry):
    """A step torch.compile traces takes the foreach reference, which dynamo can see."""
    _refuse_the_reference(monkeypatch, entry)
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.ones(3)
    optimizer = entry.ours([param], lr=0.1)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torchblocks.use_backend("reference"), pytest.raises(AssertionError, match="_reference ran"):
        optimizer.step()


@pytest.mark.triton
@pytest.mark.parametrize("name", ["SGD", "RMSprop", "Adam", "AdamW"])
def test_one_launch_per_group_device_and_dtype(target, monkeypatch, name):
    if target.backend != "triton":
        pytest.skip("counts Triton launches")
    from torchblocks.kernels import optim as kernels

    launches = []
    launch = kernels.multi_tensor_launch
    monkeypatch.setattr(kernels, "multi_tensor_launch", lambda kernel, roles, *a, **k: (
        launches.append(len(roles[0])), launch(kernel, roles, *a, **k)))
    model = cases.small_model(target.device, torch.float32)
    optimizer = getattr(torchblocks.optim, name)(cases.param_groups(model, {}))
    cases.train(model, optimizer, 1)
    assert launches == [2, 2]  # group 0: weight and bias; group 1: weight and bias (unused has no grad)
