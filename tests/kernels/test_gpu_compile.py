"""The GPU's proxy in CI: every kernel, every autotune config a launch can
choose and every dtype, compiled offline for sm_90 (H100) and sm_80 (A100)
by tests/kernels/gpu_compile.py, with no GPU. These fail when a config or a kernel
regresses: it no longer compiles, outgrows shared memory, spills registers,
loses its tensor-core instructions or its 128-bit accesses."""

import json
import os
import subprocess
import sys

import pytest

import gpu_compile
from conftest import NO_TRITON

pytestmark = [pytest.mark.triton, NO_TRITON]

# ptxas keeps one 8-byte value on the stack in some float64 cross-entropy
# kernels (at 40 registers, depending on the row length's divisibility):
# a stack slot, not register pressure. Nothing else may spill at all.
SPILL_ALLOWANCE = {("cross_entropy", "float64"): 16}


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """Every variant's row, compiled once in a process without the interpreter."""
    path = tmp_path_factory.mktemp("gpu_compile") / "rows.json"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, gpu_compile.__file__, "--json", str(path)], env=env,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(path.read_text())


def _failures(rows, broken):
    """The rows for which ``broken(row)`` says what is wrong, one per line."""
    lines = [f"sm_{row['arch']} {row['id']}: {problem}" for row in rows if (problem := broken(row))]
    return "\n".join(lines)


def test_every_kernel_is_compiled_for_both_architectures(rows):
    """A new kernel must join the check: every ``*_kernel`` in torchblocks.kernels is compiled."""
    import importlib
    import pkgutil

    import torchblocks.kernels

    kernels = {
        name
        for module in pkgutil.iter_modules(torchblocks.kernels.__path__)
        for name in vars(importlib.import_module(f"torchblocks.kernels.{module.name}"))
        if name.endswith("_kernel")
    }
    for arch in gpu_compile.MAX_SHARED_MEMORY:
        assert {row["kernel"] for row in rows if row["arch"] == arch} == kernels


def test_every_variant_compiles(rows):
    assert not _failures(rows, lambda row: row.get("error"))


def test_shared_memory_fits_the_device(rows):
    assert not _failures(rows, lambda row: row["shared"] > gpu_compile.MAX_SHARED_MEMORY[row["arch"]] and (
        f"{row['shared']} bytes of shared memory > {gpu_compile.MAX_SHARED_MEMORY[row['arch']]}"))


def test_no_register_spills(rows):
    def spills(row):
        if row["spill_bytes"] is None:
            return "no ptxas report"
        allowed = SPILL_ALLOWANCE.get((row["module"], row["dtype"]), 0)
        return row["spill_bytes"] > allowed and f"{row['spill_bytes']} bytes spilled ({row['registers']} registers)"

    assert not _failures(rows, spills)


def test_gemm_uses_tensor_cores(rows):
    """wgmma for 16-bit and TF32 tiles on sm_90, mma.sync before and for float64."""
    dense = [row for row in rows if row["kernel"] == "dense_matmul_kernel"]
    assert {row["dtype"] for row in dense} == {"float16", "bfloat16", "float32", "float32-tf32", "float64"}
    assert not _failures(dense, lambda row: row["tensor_core"] != row["expected_tensor_core"] and (
        f"tensor-core instruction {row['tensor_core']}, expected {row['expected_tensor_core']}"))


def test_elementwise_and_optimizer_kernels_use_128_bit_accesses(rows):
    wide = [row for row in rows if row["wide_accesses"]]
    assert {row["kernel"] for row in wide} == {"relu_forward_kernel", "relu_backward_kernel", "multi_tensor_kernel"}
    assert {row["name"] for row in wide if row["kernel"] == "multi_tensor_kernel"} == {
        "sgd step", "rmsprop step", "adam step", "adam capturable step"}
    assert not _failures(wide, lambda row: not (row["wide_loads"] and row["wide_stores"]) and (
        f"128-bit loads {row['wide_loads']}, stores {row['wide_stores']}"))


def test_pruning_estimate_never_underestimates_shared_memory(rows):
    """A launch prunes configs by ``shared_memory_bytes`` before compiling any:
    the estimate must bound what the compiler allocates."""
    import torch

    from torchblocks.kernels import dense

    configs = {gpu_compile.config_label(config): config for config in dense._configs(interpreter=False)}
    for row in rows:
        if row["kernel"] == "dense_matmul_kernel":
            element_size = getattr(torch, row["dtype"].split("-")[0]).itemsize
            assert row["shared"] <= dense.shared_memory_bytes(configs[row["config"]], element_size), row["id"]


def test_a_launch_keeps_its_architectures_and_kinds_configs_that_fit():
    import torch

    from torchblocks.kernels import dense

    configs = dense._configs(interpreter=False)
    h100 = dense.launchable_configs(configs, 90, "ieee", 4, gpu_compile.MAX_SHARED_MEMORY[90])
    assert [dense._shape(c) for c in h100] == dense.TILES[90]["ieee"]
    a100_float64 = dense.launchable_configs(configs, 80, "float64", 8, gpu_compile.MAX_SHARED_MEMORY[80])
    assert a100_float64 and all(dense.shared_memory_bytes(c, 8) <= 166912 for c in a100_float64)
    small = dense.launchable_configs(configs, 80, "16-bit", 2, 101376)  # a consumer GPU's 99 KB
    assert small and len(small) < len(dense.TILES[80]["16-bit"])
    assert dense.operand_kind(torch.float32, "tf32") == "tf32" and dense.operand_kind(torch.bfloat16, "ieee") == "16-bit"
    assert dense.tile_architecture((9, 0)) == 90 and dense.tile_architecture((8, 9)) == 80
