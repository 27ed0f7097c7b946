import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from torchblocks.cli.bench import BLOCKS
from torchblocks.cli.data.mnist import DIGITS

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_kernels_as_torchblocks_kernels(tmp_path):
    source = tmp_path / "source"  # a copy without build/: files a stale build left there cannot ship
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv*", "build", "*.egg-info", "__pycache__",
                                                                 ".pytest_cache", "bench-out"))
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
    assert "Requires-Dist: torch>=2.4" in requirements
    assert any(line.startswith("Requires-Dist: triton") and "x86_64" in line for line in requirements)


def test_the_library_never_imports_its_tools():
    """torchblocks.cli (check, bench, the MNIST job, its data) is the
    workshop: importing every library module leaves it unloaded."""
    modules = ["torchblocks", "torchblocks.functional", "torchblocks.nn", "torchblocks.optim", "torchblocks.patching",
               "torchblocks.override", "torchblocks.hf", "torchblocks.testing", "torchblocks.backend"]
    script = "import importlib, sys\n" + "".join(f"importlib.import_module({name!r})\n" for name in modules) + \
        "print(sorted(name for name in sys.modules if name.startswith('torchblocks.cli')))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout
