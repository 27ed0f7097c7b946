"""scripts/gpu.sh, as far as a machine without a GPU can run it: its options,
the name of its results folder, its install step (no download, nothing
installed into the Python it is given), and its refusal to run GPU stages."""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu.sh"

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without a GPU")


def gpu_sh(*args, env=None, timeout=300):
    environment = {key: value for key, value in os.environ.items() if key not in ("GPU_NAME", "GPU_OUT")}
    environment["PYTHON"] = sys.executable
    environment.update(env or {})
    return subprocess.run(["bash", str(SCRIPT), *args], env=environment, capture_output=True, text=True,
                          timeout=timeout)


def test_help_lists_every_stage():
    result = gpu_sh("--help")
    assert result.returncode == 0
    for stage in ("test", "check", "bench [BLOCK ...]", "all", "install", "where", "--out DIR"):
        assert stage in result.stdout


@pytest.mark.parametrize("args, message", [
    ((), "name a stage: test, check, bench, all, install or where"),
    (("bogus",), "unknown stage or option 'bogus'"),
    (("--out",), "--out needs a folder"),
    (("bench", "attention"), "unknown stage or option 'attention'"),
])
def test_bad_arguments_exit_2_saying_why(args, message):
    result = gpu_sh(*args)
    assert result.returncode == 2 and message in result.stderr


@pytest.mark.parametrize("name, folder", [
    ("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3"),
    ("NVIDIA H200", "nvidia-h200"),
    ("  Tesla V100-SXM2 (16GB) ", "tesla-v100-sxm2-16gb"),
])
def test_results_folder_is_named_after_the_gpu(name, folder):
    result = gpu_sh("where", env={"GPU_NAME": name})
    assert result.returncode == 0
    assert result.stdout.strip() == str(ROOT / "benchmarks" / "results" / folder)


@pytest.mark.parametrize("stage", ["test", "check", "bench", "all"])
def test_gpu_stages_refuse_to_run_without_a_gpu_and_write_nothing(stage, tmp_path):
    results = ROOT / "benchmarks" / "results"
    before = sorted(results.rglob("*"))
    result = gpu_sh("--out", str(tmp_path / "out"), stage)
    assert result.returncode == 2
    assert "need a CUDA GPU" in result.stderr and "nothing was run or written" in result.stderr
    assert sorted(results.rglob("*")) == before
    assert not any((tmp_path / "out").iterdir())


def test_install_uses_no_network_and_leaves_the_python_it_is_given_untouched(borrowing_venv):
    """A throwaway virtual environment without CUDA that sees this one's torch
    and triton through a .pth file: the install step must import torchblocks
    from its temporary folder, install nothing into that environment, and
    never reach a package index."""
    python, site = borrowing_venv
    installed_before = sorted(os.listdir(site))
    result = gpu_sh("install", env={"PYTHON": str(python), "PIP_INDEX_URL": "http://127.0.0.1:9/unreachable"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "torchblocks 0.1.0 from /" in result.stdout and "torchblocks-gpu." in result.stdout
    assert f"CUDA {torch.version.cuda}" in result.stdout  # a CUDA build of torch names its CUDA without a GPU
    assert sorted(os.listdir(site)) == installed_before
