"""Test set-up shared by every test file.

Without a GPU, the Triton kernels run on the CPU under the Triton interpreter:
TRITON_INTERPRET=1 is set here, before anything imports triton or torchblocks.
The ``target`` fixture runs a test on each (device, backend) pair, and the
reference backend on the CPU twice: through the compiled eager path
(torchblocks/_ops/eager_cpu.cpp) and through the Python Functions; pairs this
machine cannot run are skipped with the reason, never passed silently.
The ``reference-cpu`` label is true by construction: the compiled module's
calls are counted there, and a passing test none of whose calls reached it
fails at teardown. A test (or a ``pytest.param`` case) whose calls all take
the Python path is marked ``python_path``: its ``reference-cpu`` variant is
deselected at collection (not skipped: it would only repeat
``reference-cpu-python``, and CI time is short), so ``reference-cpu-python``
is its one CPU reference variant. Conversely a case marked ``compiled_path``
is there to reach the compiled module: its other targets' variants, which
repeat cases of their own, are deselected.
The ``path`` fixture of the contract matrices (tests/test_contract.py,
tests/test_contract_optim.py) runs a test on each CPU implementation (the
compiled eager path, the Python path, Triton under the interpreter) and
counts in a ``Taken`` what ran.
"""

import os
import pathlib
import subprocess
import sys
import sysconfig
import venv

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torchblocks  # noqa: E402  (after TRITON_INTERPRET is decided)
from torchblocks import backend  # noqa: E402
from torchblocks._ops import _dispatch, _eager_cpu  # noqa: E402

NO_CUDA = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
NO_TRITON = pytest.mark.skipif(not backend.TRITON_AVAILABLE, reason="needs triton")
NO_INTERPRETER = pytest.mark.skipif(
    not backend.INTERPRETER, reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (set when no GPU is present)"
)
COMPILED_OFF = os.environ.get("TORCHBLOCKS_EAGER_CPU") == "0"

TARGETS = [
    pytest.param(("cpu", "reference"), id="reference-cpu"),
    pytest.param(("cpu", "reference-python"), id="reference-cpu-python"),
    pytest.param(("cpu", "triton"), id="triton-interpreter", marks=[pytest.mark.triton, NO_TRITON, NO_INTERPRETER]),
    pytest.param(("cuda", "reference"), id="reference-cuda", marks=[pytest.mark.cuda, NO_CUDA]),
    pytest.param(("cuda", "triton"), id="triton-cuda", marks=[pytest.mark.cuda, pytest.mark.triton, NO_CUDA, NO_TRITON]),
]


class Target:
    """Where a test runs: ``device`` and the backend in force during the test;
    ``python_eager``: the CPU reference through the Python Functions, the
    compiled eager path turned off."""

    def __init__(self, device: str, backend_name: str):
        self.device = device
        self.python_eager = backend_name == "reference-python"
        self.backend = "reference" if self.python_eager else backend_name
        self.interpreted = device == "cpu" and backend_name == "triton"


class OpNames(TorchDispatchMode):
    """A dispatch mode that records the name of each op it sees, in ``names``."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def op_names():
    """``with op_names() as mode: ...`` records the ops run, in ``mode.names``."""
    return OpNames


@pytest.fixture
def borrowing_venv(tmp_path):
    """A throwaway virtual environment that sees this one's packages (torch,
    triton, pip, setuptools, transformers) through a .pth file, so that what is
    installed into it lands in its own site-packages and nowhere else.
    Returns ``(python, site_packages)`` of the throwaway."""
    throwaway = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(throwaway)
    python = throwaway / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    pathlib.Path(site, "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python, pathlib.Path(site)


@pytest.fixture(params=TARGETS)
def target(request, monkeypatch):
    """The ``Target`` in force. On ``reference-cpu`` the compiled module's
    calls are counted, and a test that passed without one fails at teardown."""
    target = Target(*request.param)
    taken = None
    if target.python_eager:
        _python_path(monkeypatch)
    elif target.device == "cpu" and target.backend == "reference":
        if COMPILED_OFF:
            pytest.skip("TORCHBLOCKS_EAGER_CPU=0 turns the compiled path off: reference-cpu-python covers it")
        taken = Taken()
        _count_compiled_calls(monkeypatch, taken)
    with torchblocks.use_backend(target.backend):
        yield target
    if taken is not None and taken.compiled == 0 and _passed(request.node):
        pytest.fail("labelled reference-cpu but nothing reached the compiled path: mark it `python_path` "
                    "(the test, or its pytest.param cases) if its calls are meant for the Python path",
                    pytrace=False)


class Taken:
    """Counts the calls the compiled module took (returned a result for, or
    raised from: a call it declines returns None),
    the times the backend chose Triton (``backend.use_triton`` answering
    True), and of the calls that then reached a Triton launcher, those it
    ``launched`` and those it ``declined`` (``_dispatch.triton_declines``)."""

    def __init__(self):
        self.compiled = 0
        self.triton = 0
        self.launched = 0
        self.declined = 0


class _CountingModule:
    """The compiled module, each entry point counting the calls it takes."""

    def __init__(self, module, taken):
        self._module, self._taken = module, taken

    def __getattr__(self, name):
        entry = getattr(self._module, name)
        if not callable(entry):
            return entry

        def counted(*args, **kwargs):
            try:
                result = entry(*args, **kwargs)
            except Exception:  # raised from C++: an entry point that declines returns None
                self._taken.compiled += 1
                raise
            if result is not None:
                self._taken.compiled += 1
            return result
        return counted


def _count_compiled_calls(monkeypatch, taken):
    """Puts the compiled module, counting into ``taken`` the calls it takes,
    where ``_eager_cpu.runs`` and ``_eager_cpu.module`` hand it out."""
    module = _eager_cpu.module()
    assert module is not None, _eager_cpu.build_error()
    monkeypatch.setattr(_eager_cpu, "_module", _CountingModule(module, taken))


def _python_path(monkeypatch):
    """Turns the compiled path off for the test (its kernels leave the ops at
    once, so that a call through torch.ops takes the Python ones too) and on
    again after it."""
    monkeypatch.setattr(_eager_cpu, "_enabled", _eager_cpu._enabled)  # what teardown restores
    _eager_cpu.set_enabled(False)


CALL_REPORT = pytest.StashKey()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Keeps the report of a test's call phase on the item, for ``_passed``."""
    report = yield
    if report.when == "call":
        item.stash[CALL_REPORT] = report
    return report


def _passed(item) -> bool:
    """Whether the test body of ``item`` ran and passed (not failed, not skipped)."""
    report = item.stash.get(CALL_REPORT, None)
    return report is not None and report.passed


PATHS = [
    pytest.param("compiled", id="compiled-cpu",
                 marks=pytest.mark.skipif(COMPILED_OFF, reason="TORCHBLOCKS_EAGER_CPU=0 turns the compiled path off")),
    pytest.param("python", id="python"),
    pytest.param("triton", id="triton-interpreter", marks=[pytest.mark.triton, NO_TRITON, NO_INTERPRETER]),
]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """The implementation in force, and a ``Taken`` counting what ran."""
    taken = Taken()
    name = request.param
    if name == "compiled":
        _count_compiled_calls(monkeypatch, taken)
    else:
        _python_path(monkeypatch)
    use_triton = backend.use_triton

    def counting_use_triton(tensor):
        chosen = use_triton(tensor)
        taken.triton += bool(chosen)
        return chosen

    monkeypatch.setattr(backend, "use_triton", counting_use_triton)
    triton_declines = _dispatch.triton_declines

    def counting_triton_declines(*args):
        declines = triton_declines(*args)
        taken.declined += declines
        taken.launched += not declines
        return declines

    monkeypatch.setattr(_dispatch, "triton_declines", counting_triton_declines)
    with torchblocks.use_backend("triton" if name == "triton" else "reference"):
        yield name, taken


def pytest_configure(config):
    config.addinivalue_line("markers", "triton: runs the Triton kernels (on CUDA, or under the interpreter)")
    config.addinivalue_line("markers", "cuda: needs a CUDA device")
    config.addinivalue_line("markers", "eager_cpu: the compiled eager CPU path itself (scripts/gpu.sh runs these too, "
                                       "against the GPU machine's own torch)")
    config.addinivalue_line("markers", "python_path: every call takes the Python path, so the reference-cpu variant "
                                       "is deselected and reference-cpu-python is the one CPU reference variant")
    config.addinivalue_line("markers", "compiled_path: a case there to reach the compiled eager CPU path; its "
                                       "variants on other targets are deselected")
    # the interpreter computes with numpy, which warns on the inf and NaN some cases feed it on purpose
    config.addinivalue_line("filterwarnings", r"ignore::RuntimeWarning:triton\.runtime\.interpreter")


def pytest_collection_modifyitems(config, items):
    """Deselects the ``reference-cpu`` variant of each ``python_path`` test or
    case: its calls take the Python path, so it would repeat
    ``reference-cpu-python`` while looking like coverage of the compiled one;
    and the other targets' variants of a ``compiled_path`` case."""
    kept, dropped = [], []
    for item in items:
        params = getattr(item, "callspec", None) and item.callspec.params
        if not params or "target" not in params:
            kept.append(item)
            continue
        on_compiled_target = params["target"] == ("cpu", "reference")
        elsewhere = (item.get_closest_marker("python_path") if on_compiled_target
                     else item.get_closest_marker("compiled_path"))
        (dropped if elsewhere else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
