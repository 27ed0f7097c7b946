"""Every Triton kernel compiled for NVIDIA GPUs offline, with no GPU: the CI's
proxy for one. ``triton.compile`` builds the PTX and the cubin with the ptxas
that ships in the triton wheel; ``ptxas -v`` counts registers and spills.

Each variant is launched as the launchers launch it on real, aligned,
contiguous tensors, with the JIT's specialisations mirrored: pointers and
integers divisible by 16 carry that divisibility, integers equal to 1 become
constants. The dense GEMM is compiled for every autotune config a launch can
choose in each dtype (``launchable_configs``), for each of its three products.

Run as a script (never under TRITON_INTERPRET, whose kernels cannot compile):
    python tests/kernels/gpu_compile.py [--arch 90 80] [--json FILE]
prints a table, or writes the rows as JSON for tests/kernels/test_gpu_compile.py.
"""

import argparse
import concurrent.futures
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile

# Largest shared memory one block may use, in bytes: H100 (227 KB), A100 (163 KB).
MAX_SHARED_MEMORY = {90: 232448, 80: 166912}

# The tensor-core instruction a GEMM of each input dtype must use, by architecture.
TENSOR_CORE_INSTRUCTIONS = {
    90: {"float16": "wgmma", "bfloat16": "wgmma", "float32-tf32": "wgmma", "float64": "mma.sync"},
    80: {"float16": "mma.sync", "bfloat16": "mma.sync", "float32-tf32": "mma.sync", "float64": "mma.sync"},
}
# 128-bit global accesses: four 32-bit words or two 64-bit ones.
WIDE_LOAD = re.compile(r"ld\.global(\.[\w:]+)*\.v4\.[bfsu]32|ld\.global(\.[\w:]+)*\.v2\.[bfsu]64")
WIDE_STORE = re.compile(r"st\.global(\.[\w:]+)*\.v4\.[bfsu]32|st\.global(\.[\w:]+)*\.v2\.[bfsu]64")

DTYPES = ("float16", "bfloat16", "float32", "float64")
TYPE_NAMES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}


@dataclasses.dataclass
class Variant:
    """One compilation: ``kernel`` (module, name) with its arguments."""

    name: str  # e.g. "dense_matmul forward"
    module: str  # in torchblocks.kernels
    kernel: str
    dtype: str  # the data dtype; "float32-tf32" for the TF32 GEMM
    pointers: dict  # argument -> element type ("fp32", "i64", ...)
    integers: dict  # argument -> a typical value (1 becomes a constant, multiples of 16 get the hint)
    constants: dict  # constexpr argument -> value (a triton dtype or the module's function by name: _constant)
    num_warps: int
    num_stages: int = 1
    config: str = ""  # the autotune config, for the table
    wide_accesses: bool = False  # must load and store 128 bits at a time

    @property
    def id(self) -> str:
        return f"{self.name} {self.dtype}{' ' + self.config if self.config else ''}"


def _accumulation(dtype: str) -> str:
    return "tl.float64" if dtype == "float64" else "tl.float32"


def config_label(config) -> str:
    """``BLOCK_MxBLOCK_NxBLOCK_K s<stages> w<warps>``."""
    block = config.kwargs
    return "x".join(str(block[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")) + (
        f" s{config.num_stages} w{config.num_warps}")


def dense_variants(arch: int):
    import torch

    from torchblocks.kernels import dense

    for dtype in ("float16", "bfloat16", "float32", "float32-tf32", "float64"):
        base = dtype.split("-")[0]
        torch_dtype = getattr(torch, base)
        kind = dense.operand_kind(torch_dtype, "tf32" if dtype.endswith("tf32") else "ieee")
        for config in dense.launchable_configs(dense._configs(interpreter=False), arch, kind, torch_dtype.itemsize,
                                               MAX_SHARED_MEMORY[arch]):
            block = config.kwargs
            grad_weight = dict(stride_am=1, stride_ak=4096, stride_bk=4096, stride_bn=1, stride_bias=0)
            products = [
                # forward: A = x (M, K), B = W^T (W is (N, K)), bias and ReLU
                ("forward", dict(HAS_BIAS=True, RELU=True, ROW_SUM=False, ACCUMULATE=False),
                 dict(stride_am=4096, stride_ak=1, stride_bk=1, stride_bn=4096, stride_bias=1)),
                # dx: A = g (M, N), B = W (N, K)
                ("grad_input", dict(HAS_BIAS=False, RELU=False, ROW_SUM=False, ACCUMULATE=False),
                 dict(stride_am=4096, stride_ak=1, stride_bk=4096, stride_bn=1, stride_bias=0)),
                # dW with db: A = g^T (g is (M, N)), B = x, the row sums of A
                ("grad_weight", dict(HAS_BIAS=False, RELU=False, ROW_SUM=True, ACCUMULATE=False), grad_weight),
            ]
            accumulating = dense.launchable_configs([config], arch, kind, torch_dtype.itemsize,
                                                    MAX_SHARED_MEMORY[arch], accumulate=True)
            if base in ("float16", "bfloat16") and accumulating:
                # the fused head's dW and db, added to float32 accumulators (the tiles a launch may choose)
                products.append(("grad_weight accumulate", dict(HAS_BIAS=False, RELU=False, ROW_SUM=True,
                                                                ACCUMULATE=True), grad_weight))
            for epilogue, flags, strides in products:
                accumulator = "fp32" if flags["ACCUMULATE"] else TYPE_NAMES[base]
                yield Variant(
                    f"dense_matmul {epilogue}", "dense", "dense_matmul_kernel", dtype,
                    pointers=dict(a_ptr=TYPE_NAMES[base], b_ptr=TYPE_NAMES[base], bias_ptr=TYPE_NAMES[base],
                                  c_ptr=accumulator, row_sum_ptr=accumulator),
                    integers=dict(M=4096, N=4096, K=4096, stride_cm=4096, stride_cn=1, M_BUCKET=4096, **strides),
                    constants=dict(flags, INPUT_PRECISION="tf32" if dtype.endswith("tf32") else "ieee",
                                   ACC_DTYPE=_accumulation(base), **block),
                    num_warps=config.num_warps, num_stages=config.num_stages, config=config_label(config),
                )


def relu_variants(arch: int):
    import torch

    from torchblocks.kernels._launch import ELEMENTWISE_BLOCK, elementwise_warps

    contiguous = dict(n_elements=1 << 24, size1=1, size2=1, size3=1)
    for dtype in DTYPES:
        launch = dict(constants=dict(CONTIGUOUS=True, BLOCK_SIZE=ELEMENTWISE_BLOCK),
                      num_warps=elementwise_warps(getattr(torch, dtype)), wide_accesses=True)
        yield Variant("relu forward", "relu", "relu_forward_kernel", dtype,
                      pointers={"input_ptr": TYPE_NAMES[dtype], "output_ptr": TYPE_NAMES[dtype]},
                      integers=dict(contiguous, **{f"{t}_stride{i}": 0 for t in ("in", "out") for i in range(4)}),
                      **launch)
        yield Variant("relu backward", "relu", "relu_backward_kernel", dtype,
                      pointers={p: TYPE_NAMES[dtype] for p in ("grad_output_ptr", "output_ptr", "grad_input_ptr")},
                      integers=dict(contiguous, **{f"{t}_stride{i}": 0 for t in ("go", "out", "gi") for i in range(4)}),
                      **launch)


def cross_entropy_variants(arch: int):
    import torch

    from torchblocks.kernels.cross_entropy import launch_meta

    for dtype in DTYPES:
        acc = "fp64" if dtype == "float64" else "fp32"
        for classes in (10, 32, 300, 1000, 128256):  # the book's digits ... a large vocabulary
            launch = launch_meta(classes, getattr(torch, dtype))
            rows = dict(R=4096, C=classes, stride_row=classes, stride_col=1, stride_target=1, stride_weight=1,
                        ignore_index=-100)
            warps = launch["num_warps"]
            for weighted in (False, True):  # weighted: also smoothed, the longest code path
                meta = dict(HAS_WEIGHT=weighted, SMOOTHING=weighted, ACC_DTYPE=_accumulation(dtype),
                            BLOCK_R=launch["BLOCK_R"], BLOCK_C=launch["BLOCK_C"])
                yield Variant(
                    f"cross_entropy forward C={classes}{' weighted, smoothed, grad in place' if weighted else ''}",
                    "cross_entropy", "cross_entropy_forward_kernel", dtype,
                    pointers=dict(logits_ptr=TYPE_NAMES[dtype], target_ptr="i64", weight_ptr=TYPE_NAMES[dtype],
                                  weight_total_ptr=acc, loss_ptr=acc, lse_ptr=acc, row_weight_ptr=acc,
                                  grad_ptr=TYPE_NAMES[dtype]),
                    integers=dict(rows, grad_stride_row=classes if weighted else 0, grad_stride_col=int(weighted)),
                    constants=dict(meta, WRITE_GRAD=weighted), num_warps=warps)
                yield Variant(
                    f"cross_entropy backward C={classes}{' weighted, smoothed' if weighted else ''}",
                    "cross_entropy", "cross_entropy_backward_kernel", dtype,
                    pointers=dict(logits_ptr=TYPE_NAMES[dtype], target_ptr="i64", weight_ptr=TYPE_NAMES[dtype],
                                  weight_total_ptr=acc, lse_ptr=acc, scale_ptr=acc, grad_ptr=TYPE_NAMES[dtype]),
                    integers=dict(rows, grad_stride_row=classes, grad_stride_col=1, stride_lse=1, stride_scale=0),
                    constants=meta, num_warps=warps)


def optimizer_variants(arch: int):
    import torch

    from torchblocks.kernels._launch import ELEMENTWISE_BLOCK, elementwise_warps
    from torchblocks.kernels.optim import AdamFlags, RMSpropFlags, SGDFlags

    table = dict(pointers_ptr="i64", scalars_ptr="fp64", numel_ptr="i64", first_chunk_ptr="i64",
                 chunk_tensor_ptr="i32")
    every_option = {  # the chunk update and every switch on
        "sgd": ("_sgd_chunk", SGDFlags(WEIGHT_DECAY=True, MOMENTUM=True, NESTEROV=True, MAXIMIZE=True)),
        "rmsprop": ("_rmsprop_chunk", RMSpropFlags(WEIGHT_DECAY=True, MOMENTUM=True, CENTERED=True, MAXIMIZE=True)),
        "adam": ("_adam_chunk", AdamFlags(WEIGHT_DECAY=True, DECOUPLED=True, AMSGRAD=True, MAXIMIZE=True,
                                          CAPTURABLE=False, STEP_DTYPE="tl.float32")),
        "adam capturable": ("_adam_chunk", AdamFlags(WEIGHT_DECAY=True, DECOUPLED=True, AMSGRAD=True, MAXIMIZE=True,
                                                     CAPTURABLE=True, STEP_DTYPE="tl.float32")),
    }
    for name, (update, flags) in every_option.items():
        for dtype in DTYPES:
            yield Variant(f"{name} step", "optim", "multi_tensor_kernel", dtype, pointers=table, integers=dict(T=200),
                          constants=dict(UPDATE=update, FLAGS=flags, DTYPE=f"tl.{dtype}", ACC_DTYPE=_accumulation(dtype),
                                         ALIGNED=True, BLOCK=ELEMENTWISE_BLOCK),
                          num_warps=elementwise_warps(getattr(torch, dtype)), wide_accesses=True)


def variants(arch: int):
    yield from dense_variants(arch)
    yield from relu_variants(arch)
    yield from cross_entropy_variants(arch)
    yield from optimizer_variants(arch)


def _constant(value, module):
    """A constexpr's value: a triton dtype by name ("tl.float32"), a function
    of the kernel's module by name ("_sgd_chunk"), a record of those (a
    NamedTuple), or the value itself."""
    import triton.language as tl

    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_constant(field, module) for field in value))
    if isinstance(value, str) and value.startswith("tl."):
        return getattr(tl, value[3:])
    if isinstance(value, str) and hasattr(module, value):
        return getattr(module, value)
    return value


def _ptxas(arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


def compile_variant(arch: int, variant: Variant) -> dict:
    """Compile one variant for ``arch``; its row: shared memory, registers,
    spills, tensor-core instructions, 128-bit accesses, or the error."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    row = {"arch": arch, "id": variant.id, "name": variant.name, "module": variant.module, "kernel": variant.kernel,
           "dtype": variant.dtype, "config": variant.config, "wide_accesses": variant.wide_accesses}
    module = importlib.import_module(f"torchblocks.kernels.{variant.module}")
    fn = getattr(module, variant.kernel)
    while not isinstance(fn, JITFunction):  # an autotuned kernel wraps the JIT function
        fn = fn.fn
    signature, constants, hints = {}, {}, []
    for index, name in enumerate(fn.arg_names):
        if name in variant.constants:
            signature[name], constants[name] = "constexpr", _constant(variant.constants[name], module)
        elif name in variant.pointers:
            signature[name] = "*" + variant.pointers[name]
            hints.append(index)
        elif fn.params[index].annotation_type:  # a scalar typed in the kernel's signature ("fp64")
            signature[name] = fn.params[index].annotation_type
        elif variant.integers[name] == 1:
            signature[name], constants[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if variant.integers[name] % 16 == 0:
                hints.append(index)
    source = ASTSource(fn, signature, constexprs=constants, attrs={(i,): [["tt.divisibility", 16]] for i in hints})
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options=dict(num_warps=variant.num_warps, num_stages=variant.num_stages))
    except Exception as error:  # noqa: BLE001  (the row reports it)
        row["error"] = f"{type(error).__name__}: {' '.join(str(error).split())[-400:]}"
        return row
    ptx = compiled.asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as file:
        file.write(ptx)
        file.flush()
        report = subprocess.run([_ptxas(arch), f"-arch=sm_{arch}a" if arch >= 90 else f"-arch=sm_{arch}", "-v",
                                 file.name, "-o", os.devnull], capture_output=True, text=True).stderr
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", report)
    expected = TENSOR_CORE_INSTRUCTIONS[arch].get(variant.dtype) if variant.module == "dense" else None
    row.update(
        shared=compiled.metadata.shared,
        registers=int(registers.group(1)) if registers else None,
        spill_bytes=sum(map(int, spills)) if spills else None,
        tensor_core=expected if expected and expected in ptx else ("wgmma" if "wgmma" in ptx else
                                                                    "mma.sync" if "mma.sync" in ptx else None),
        expected_tensor_core=expected,
        wide_loads=bool(WIDE_LOAD.search(ptx)),
        wide_stores=bool(WIDE_STORE.search(ptx)),
    )
    return row


def _compile_all(job):
    arch, variant = job
    return compile_variant(arch, variant)


def compile_all(archs=(90, 80), workers=None) -> list:
    """Every variant for every arch, compiled in ``workers`` processes."""
    jobs = [(arch, variant) for arch in archs for variant in variants(arch)]
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        return list(pool.map(_compile_all, jobs))


def format_rows(rows) -> str:
    """The rows as an aligned table."""
    from torchblocks.cli import _table

    header = ("arch", "kernel", "dtype", "config", "shared KB", "registers", "spills", "tensor cores", "128-bit")
    body = [(f"sm_{r['arch']}", r["name"], r["dtype"], r["config"] or "-",
             f"{r['shared'] / 1024:.0f}" if "shared" in r else "-", str(r.get("registers", "-")),
             str(r.get("spill_bytes", "-")), r.get("tensor_core") or "-",
             ("yes" if r.get("wide_loads") and r.get("wide_stores") else "no") if "shared" in r else r["error"])
            for r in rows]
    return _table.format_table(header, body)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(MAX_SHARED_MEMORY))
    parser.add_argument("--json", metavar="FILE", help="write the rows as JSON to FILE instead of a table")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("gpu_compile.py: unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    rows = compile_all(args.arch)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(rows, file)
    else:
        print(format_rows(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
