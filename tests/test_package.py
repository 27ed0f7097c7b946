import importlib.metadata
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from torchblocks.cli.bench import BLOCKS
from torchblocks.cli.data.mnist import DIGITS

ROOT = Path(__file__).resolve().parents[1]
SITE_PACKAGES = Path(sysconfig.get_paths()["purelib"])


def hugging_face_kernels_installed() -> bool:
    """Whether Hugging Face's kernel hub (PyPI's ``kernels``, which
    transformers 5 installs) is in this environment."""
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def copy_of_the_source(destination: Path) -> Path:
    """The checkout without build/: files a stale build left there cannot ship."""
    shutil.copytree(ROOT, destination, ignore=shutil.ignore_patterns(".git", ".venv*", "build", "*.egg-info",
                                                                      "__pycache__", ".pytest_cache", "bench-out"))
    return destination


def python_at(cwd: Path, script: str, python=sys.executable) -> subprocess.CompletedProcess:
    """``python -c script`` run from ``cwd``, which puts ``cwd`` first on sys.path."""
    return subprocess.run([str(python), "-c", script], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_wheel_installs_kernels_as_torchblocks_kernels(tmp_path):
    source = copy_of_the_source(tmp_path / "source")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w",
         str(tmp_path)],
        check=True,
    )
    (wheel,) = tmp_path.glob("torchblocks-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert all(top == "torchblocks" or top.endswith(".dist-info") for top in top_level), top_level
    assert "torchblocks/kernels/relu.py" in names
    assert "torchblocks/kernels/_launch.py" in names
    embedded = {f"torchblocks/cli/data/digits/{spec.name}.gz" for spec in DIGITS.files.values()}
    assert embedded <= set(names), "the embedded digits must ship in the wheel: the fallback needs no network"
    bench_cases = {f"torchblocks/cli/bench/{block}.py" for block in BLOCKS}
    assert bench_cases <= set(names), "the bench cases ship in the package"
    cpp_sources = {f"torchblocks/_ops/{path.name}" for path in (ROOT / "torchblocks" / "_ops").iterdir()
                   if path.suffix in (".cpp", ".h")}
    assert cpp_sources and cpp_sources <= set(names), "the compiled eager CPU path builds from the installed sources"
    metadata = next(n for n in names if n.endswith("METADATA"))
    requirements = [
        line for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines() if line.startswith("Requires-Dist")
    ]
    assert "Requires-Dist: torch>=2.11" in requirements
    assert any(line.startswith("Requires-Dist: triton") and "x86_64" in line for line in requirements)


@pytest.mark.skipif(not hugging_face_kernels_installed(), reason="Hugging Face's kernels is not installed here "
                    "(the pinned test environment has it: transformers 5 installs it)")
def test_kernels_from_the_checkout_root_is_hugging_faces():
    """A script run from the root finds the root first on sys.path; the
    top-level ``kernels`` it imports (and transformers' hub integration with
    it) must still be Hugging Face's, from site-packages."""
    result = python_at(ROOT, "import transformers.integrations.hub_kernels, kernels\n"
                             "print(kernels.__file__, callable(kernels.get_kernel))")
    assert result.returncode == 0, result.stderr
    path, has_get_kernel = result.stdout.split()
    assert Path(path).is_relative_to(SITE_PACKAGES) and not Path(path).is_relative_to(ROOT / "kernels"), path
    assert has_get_kernel == "True"


def test_kernels_from_the_checkout_root_is_nothing_without_hugging_faces():
    """With no other ``kernels`` on sys.path, the import fails as for a
    missing module: the folder never serves as a top-level ``kernels``."""
    result = python_at(ROOT, "import sys\n"
                             "sys.path[:] = [entry for entry in sys.path if 'site-packages' not in entry]\n"
                             "try:\n    import kernels\n"
                             "except ModuleNotFoundError as error:\n    print(error.name, error)\n"
                             "print(sorted(name for name in sys.modules if name.split('.')[0] == 'kernels'))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["kernels No module named 'kernels'", "[]"]


def test_editable_install_without_build_isolation_beside_hugging_faces_kernels(borrowing_venv, tmp_path):
    """``pip install --no-build-isolation -e .`` in an environment that has
    this one's packages (Hugging Face's ``kernels`` among them when
    transformers 5 is installed: its setuptools hook imports ``kernels``
    while the build runs from the root): the kernels then import as
    ``torchblocks.kernels`` from the checkout, from anywhere."""
    python, site = borrowing_venv
    source = copy_of_the_source(tmp_path / "source")
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-q",
                              "--disable-pip-version-check", "-e", str(source)], capture_output=True, text=True,
                             timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr
    assert any(site.glob("__editable__*torchblocks*")), sorted(p.name for p in site.iterdir())
    script = ("import torchblocks.kernels._common as common\nprint(common.__file__)\n"
              "try:\n    import kernels\n    print(kernels.__file__)\n"
              "except ModuleNotFoundError:\n    print('absent')")
    for cwd in (source, tmp_path):
        result = python_at(cwd, script, python)
        assert result.returncode == 0, result.stderr
        ours, theirs = result.stdout.split()
        assert Path(ours) == source / "kernels" / "_common.py"
        if hugging_face_kernels_installed():
            assert Path(theirs).is_relative_to(SITE_PACKAGES), theirs
        else:
            assert theirs == "absent"


def test_the_library_never_imports_its_tools():
    """torchblocks.cli (check, bench, the MNIST job, its data) is the
    workshop: importing every library module leaves it unloaded."""
    modules = ["torchblocks", "torchblocks.functional", "torchblocks.nn", "torchblocks.optim", "torchblocks.patching",
               "torchblocks.override", "torchblocks.hf", "torchblocks.testing", "torchblocks.backend"]
    script = "import importlib, sys\n" + "".join(f"importlib.import_module({name!r})\n" for name in modules) + \
        "print(sorted(name for name in sys.modules if name.startswith('torchblocks.cli')))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout
