"""The build of the compiled eager CPU path made boring (torchblocks/_ops/_build.py):
at most one compile per machine, torch version, compiler and sources, a
failure remembered by every later process, a built module loaded without
ninja, a lock left by a killed build that does not block, an unwritable
cache that falls back to the temporary directory or to the Python path.

Nothing here compiles: a failing build runs a fake compiler (a script that
counts its calls and fails), a successful one is the module this session
built (tests/test_eager_cpu.py), copied into a cache of the test's own.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import types
import warnings
from pathlib import Path

import pytest
import torch

import torchblocks.functional as TF
from torchblocks._ops import _build, _eager_cpu

pytestmark = pytest.mark.eager_cpu
ROOT = Path(__file__).resolve().parents[1]
FAKE_MODULE = types.SimpleNamespace(name="a module compiled by the test's stand-in for the compiler")


def python(code: str, env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    """Runs ``code`` in a new interpreter with this one's environment but the
    eager CPU setting, changed by ``env``; the worktree's torchblocks first."""
    base = {name: value for name, value in os.environ.items() if name != "TORCHBLOCKS_EAGER_CPU"}
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env={**base, **env})


def fake_compiler(folder: Path, version: str = "fake c++ 1.0") -> Path:
    """A compiler that prints ``version`` for ``--version``, and otherwise
    appends its arguments to ``calls`` beside it and fails."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "c++"
    script.write_text(f'#!/bin/sh\nif [ "$1" = --version ]; then echo "{version}"; exit 0; fi\n'
                      f'echo "$@" >> "{folder / "calls"}"\necho "fake compiler: no" >&2\nexit 1\n')
    script.chmod(0o755)
    return script


def calls(compiler: Path) -> int:
    """How many times the fake ``compiler`` was asked to do anything but say its version."""
    log = compiler.parent / "calls"
    return len(log.read_text().splitlines()) if log.exists() else 0


def caches(tmp_path: Path) -> dict:
    """The environment of a process whose configured cache and temporary
    directory are the test's own."""
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return {"TORCH_EXTENSIONS_DIR": str(tmp_path / "cache"), "TMPDIR": str(tmp_path / "tmp")}


@pytest.fixture
def own_caches(tmp_path, monkeypatch):
    """This process's configured cache and temporary directory under
    ``tmp_path``; the build machinery starts afresh, and compiling is a stand-in
    that counts its calls (``compiled``) and returns a fake module."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setattr(_eager_cpu, "_enabled", _eager_cpu._enabled)  # what teardown restores
    _eager_cpu.set_enabled(False)  # the built module's kernels leave the ops; a later call registers them again
    monkeypatch.setattr(_eager_cpu, "_module", None)
    monkeypatch.setattr(_eager_cpu, "_build_error", None)
    monkeypatch.setattr(_eager_cpu, "_enabled", True)
    monkeypatch.setattr(_eager_cpu, "_serving", False)
    compiled = []

    def compile_extension(folder, name, sources, flags):
        assert not (folder / _build.BATON).exists(), "torch's lock file is gone before torch builds"
        compiled.append(folder)
        return FAKE_MODULE

    monkeypatch.setattr(_build, "compile_extension", compile_extension)
    return compiled


def build_key() -> dict:
    """The key the build of the eager CPU path is recorded under here."""
    return {"name": _eager_cpu.NAME, "python": f"{sys.version_info.major}.{sys.version_info.minor}",
            "torch": torch.__version__,
            "binary": _build.binary_key([*_eager_cpu.SOURCES, *_eager_cpu.HEADERS], _eager_cpu.compile_flags())}


WARNED_TWICE = """
    import warnings
    import torch
    import torchblocks.functional as TF
    from torchblocks._ops import _eager_cpu
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = _eager_cpu.module()
        y = TF.relu(torch.tensor([-1.0, 2.0], requires_grad=True))
        _eager_cpu.module()
    assert module is None and y.grad_fn.name() == "ReLUFunctionBackward", (module, y.grad_fn)
    ours = [str(w.message) for w in caught if str(w.message).startswith("torchblocks")]
    assert len(ours) == 1, ours
    print(ours[0])
"""


def test_a_failed_build_is_remembered_and_no_later_process_tries_again(tmp_path):
    compiler = fake_compiler(tmp_path / "bin")
    env = {**caches(tmp_path), "CXX": str(compiler)}
    first = python(WARNED_TWICE, env)
    assert first.returncode == 0, first.stderr
    tried = calls(compiler)
    assert tried >= 1, "the first process tries to compile"
    record = _build.read_record(_eager_cpu.build_directory(tmp_path / "cache"))
    assert record is not None and record["ok"] is False and str(compiler) in record["compiler"], record
    assert "fake c++ 1.0" in record["compiler"] and record["key"]["torch"] == torch.__version__

    second = python(WARNED_TWICE, env)
    assert second.returncode == 0, second.stderr
    assert calls(compiler) == tried, "a later process does not compile again"
    assert "compiling" not in second.stderr
    record_path = str(_eager_cpu.build_directory(tmp_path / "cache") / _build.RECORD)
    assert record_path in second.stdout and "TORCHBLOCKS_EAGER_CPU=retry" in second.stdout, second.stdout

    again = python(WARNED_TWICE, {**env, "TORCHBLOCKS_EAGER_CPU": "retry"})
    assert again.returncode == 0, again.stderr
    assert calls(compiler) > tried, "TORCHBLOCKS_EAGER_CPU=retry tries again"


def test_a_remembered_failure_binds_only_its_compiler(own_caches, tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", str(fake_compiler(tmp_path / "old")))
    folder = _eager_cpu.build_directory()
    folder.mkdir(parents=True)
    key = build_key()
    _build.write_record(folder, key, ok=False, error="fake c++: no")
    said = "fake c..: no .on .* with .*fake c.. 1.0; the whole error is recorded in .*build.json.*EAGER_CPU=retry"
    with pytest.raises(_build.BuildFailed, match=said):
        _eager_cpu._build()
    assert own_caches == []
    monkeypatch.setattr(_eager_cpu, "_setting", "retry")
    assert _eager_cpu._build() is FAKE_MODULE and own_caches == [folder]
    assert _build.read_record(folder)["ok"] is True
    _build.write_record(folder, key, ok=False, error="fake c++: no")
    monkeypatch.setattr(_eager_cpu, "_setting", "1")
    monkeypatch.setenv("CXX", str(fake_compiler(tmp_path / "new", version="fake c++ 2.0")))
    assert _eager_cpu._build() is FAKE_MODULE and own_caches == [folder, folder], "a new compiler tries again"


@pytest.fixture
def built_folder():
    """The folder of the module this session built (or loaded) in the cache."""
    if not _eager_cpu._enabled:
        pytest.skip("TORCHBLOCKS_EAGER_CPU=0 turns the compiled path off")
    module = _eager_cpu.module()
    assert module is not None, _eager_cpu.build_error()
    return Path(module.__file__).parent


def test_a_built_module_is_recorded_and_loads_without_ninja_or_a_compiler(built_folder, tmp_path):
    record = _build.read_record(built_folder)
    assert record is not None and record["ok"] is True, record
    copy = _eager_cpu.build_directory(tmp_path / "cache")
    copy.mkdir(parents=True)
    for name in (f"{_eager_cpu.NAME}.so", _build.RECORD):
        shutil.copy2(built_folder / name, copy / name)
    (tmp_path / "bin").mkdir()
    code = """
        import sys
        sys.modules["ninja"] = None  # no ninja package
        import torch
        from torchblocks._ops import _eager_cpu
        module = _eager_cpu.module()
        assert module is not None, _eager_cpu.build_error()
        x = torch.tensor([-1.0, 2.0])
        print(_eager_cpu.serving(x).relu(x).tolist(), "torch.utils.cpp_extension" in sys.modules)
    """
    env = {**caches(tmp_path), "PATH": str(tmp_path / "bin"), "CXX": "/bin/false"}  # nothing to build with
    result = python(code, env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[0.0,", "2.0]", "False"] and "compiling" not in result.stderr


def test_a_lock_left_by_a_killed_build_does_not_block(own_caches, monkeypatch):
    monkeypatch.setattr(_build, "WAIT_SECONDS", 10.0)  # a lock that outlived its holder fails the test, never hangs it
    folder = _eager_cpu.build_directory()
    killed = python(f"""
        import os, signal
        from pathlib import Path
        from torchblocks._ops import _build
        with _build.locked(Path({str(folder)!r})):
            (Path({str(folder)!r}) / _build.BATON).touch()  # as torch.utils.cpp_extension does mid-build
            os.kill(os.getpid(), signal.SIGKILL)
    """, {})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (folder / _build.BATON).exists() and (folder / _build.LOCK).read_text().strip().isdigit()
    assert _eager_cpu._build() is FAKE_MODULE and own_caches == [folder]
    assert not (folder / _build.BATON).exists()


def test_a_held_lock_is_waited_for_at_most_so_long_and_says_who_holds_it(own_caches, monkeypatch):
    folder = _eager_cpu.build_directory()
    monkeypatch.setattr(_build, "WAIT_SECONDS", 0.3)
    with _build.locked(folder):  # another open file: flock excludes it even in this process
        with pytest.warns(RuntimeWarning, match=f"waited 0.3 s for .*{_build.LOCK}, held by the build of pid "
                                                f"{os.getpid()}"):
            assert _eager_cpu.module() is None
    assert own_caches == [] and _build.read_record(folder) is None, "a wait that ran out is no failure to remember"


def test_a_process_that_waited_takes_the_outcome_of_the_build_it_waited_for(own_caches):
    folder = _eager_cpu.build_directory()
    started = threading.Event()

    def another_process_builds():
        with _build.locked(folder):
            started.set()
            time.sleep(0.5)
            _build.write_record(folder, build_key(), ok=False, error="the other build's compiler: no")

    other = threading.Thread(target=another_process_builds)
    other.start()
    started.wait()
    with pytest.raises(_build.BuildFailed, match="the other build's compiler: no"):
        _eager_cpu._build()
    other.join()
    assert own_caches == [], "no second compile of what the lock's holder settled"


def test_an_unwritable_cache_falls_back_to_the_temporary_directory(own_caches, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("a regular file, so no folder can be made under it, even by root")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "file" / "cache"))
    fallback = _eager_cpu.build_directory(tmp_path / "tmp" / f"torchblocks-{os.getuid()}")
    assert _eager_cpu._build() is FAKE_MODULE and own_caches == [fallback]
    assert _build.read_record(fallback)["ok"] is True
    assert fallback.parent.stat().st_mode & 0o777 == 0o700


def test_a_fallback_that_others_can_write_is_not_used(own_caches, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "file" / "cache"))
    shared = tmp_path / "tmp" / f"torchblocks-{os.getuid()}"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(_build.BuildFailed, match="writable by no one else; found owner uid .*, mode 777"):
        _eager_cpu._build()
    assert own_caches == []


def test_no_writable_folder_runs_the_python_path_with_one_warning(own_caches, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "file" / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "file" / "tmp"))
    x = torch.tensor([-1.0, 2.0], requires_grad=True)
    with pytest.warns(RuntimeWarning, match="expected a folder this user can write to build in; found none"):
        y = TF.relu(x)
    assert own_caches == [] and y.grad_fn.name() == "ReLUFunctionBackward"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: no second warning
        assert TF.relu(x).grad_fn.name() == "ReLUFunctionBackward"


def test_a_build_folder_per_torch_version_and_sources_shared_by_environments(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = _eager_cpu.build_directory()
    assert folder.parent == tmp_path and torch.__version__ in folder.name
    with monkeypatch.context() as patch:
        patch.setattr(sys, "prefix", "/another/venv")
        assert _eager_cpu.build_directory() == folder
    header = tmp_path / "another.h"
    header.write_text("#pragma once\n")
    with monkeypatch.context() as patch:
        patch.setattr(_eager_cpu, "HEADERS", [*_eager_cpu.HEADERS, header])
        assert _eager_cpu.build_directory() != folder
    with monkeypatch.context() as patch:
        patch.setattr(_eager_cpu, "compile_flags", lambda: ["-O2"])
        assert _eager_cpu.build_directory() != folder


def test_a_call_without_a_tensor_raises_before_any_build(own_caches):
    with pytest.raises(TypeError, match="relu: input must be a torch.Tensor, got NoneType"):
        TF.relu(None)
    assert own_caches == [] and _eager_cpu._module is None, "a call that raises built the module first"
    with pytest.raises(TypeError):
        torch.nn.functional.relu(None)  # what native raises
