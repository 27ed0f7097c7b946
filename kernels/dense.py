"""The dense layer's GEMM: C = act(A @ B + bias), or C += A @ B, with float32 accumulation.

One tiled kernel serves all three products of a dense layer through strides:
    forward  y  = act(x @ W^T + b)   A = x   (M, K),  B = W^T (K, N): W's strides swapped
    backward dx = g @ W              A = g   (M, N),  B = W   (N, K)
             dW = g^T @ x            A = g^T (N, M),  B = x   (M, K), with ROW_SUM: db = sum_m g
The row sum of A over the reduction dimension comes from the A tiles the GEMM
loads anyway, so the bias gradient costs no extra pass over g. With
ACCUMULATE the epilogue adds the product to C (and the row sums to theirs)
in place: a float32 C sums 16-bit products chunk after chunk, never rounded
to 16 bits in between.
"""

import inspect

import torch
import triton
import triton.language as tl

from ._common import INTERPRETER
from ._launch import device_guard, readable, triton_accumulation_dtype


# Tile shapes a GPU autotunes over, by architecture and kind of operand:
# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps). Each list holds shapes
# that spill no register in any of the three products on that architecture
# (wgmma on sm_90, mma.sync before) with triton 3.6 and 3.9
# (tests/kernels/test_gpu_compile.py compiles them all); a launch also drops those
# whose pipelines do not fit its device's shared memory (``launchable_configs``).
TILES = {
    90: {
        "16-bit": [(128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 4), (128, 128, 32, 4, 4),
                   (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (64, 32, 32, 5, 4)],
        "tf32": [(128, 128, 32, 4, 8), (128, 64, 64, 3, 8), (64, 128, 64, 3, 8), (128, 64, 32, 3, 4),
                 (64, 128, 32, 3, 4), (64, 64, 32, 3, 4), (64, 32, 32, 5, 4)],
        "ieee": [(128, 128, 32, 3, 8), (128, 128, 16, 4, 8), (64, 64, 64, 3, 4), (64, 32, 32, 4, 4),
                 (32, 64, 32, 4, 4)],
        "float64": [(64, 64, 32, 3, 4), (64, 64, 16, 4, 4), (64, 32, 32, 5, 2)],
    },
    80: {
        "16-bit": [(128, 128, 64, 4, 8), (128, 128, 64, 3, 8), (128, 128, 32, 4, 8), (128, 64, 64, 4, 4),
                   (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (64, 32, 32, 5, 4)],
        "tf32": [(128, 128, 32, 4, 8), (128, 64, 64, 3, 8), (64, 128, 64, 3, 8), (128, 64, 32, 3, 4),
                 (64, 128, 32, 3, 4), (64, 64, 32, 3, 4), (64, 32, 32, 5, 4)],
        "ieee": [(128, 128, 32, 3, 8), (128, 64, 16, 4, 8), (64, 64, 32, 4, 4), (64, 64, 16, 4, 4),
                 (64, 32, 32, 4, 4), (32, 64, 32, 4, 4)],
        "float64": [(128, 64, 32, 3, 4), (64, 64, 32, 3, 4), (64, 64, 16, 4, 4), (64, 32, 32, 5, 2)],
    },
}


def tile_architecture(capability: tuple) -> int:
    """The ``TILES`` entry for a GPU of compute capability (major, minor)."""
    return 90 if capability >= (9, 0) else 80


def operand_kind(dtype: torch.dtype, input_precision: str) -> str:
    """The ``TILES`` list that serves a GEMM on ``dtype`` tiles."""
    if dtype == torch.float64:
        return "float64"
    if dtype == torch.float32:
        return input_precision
    return "16-bit"


def _shape(config) -> tuple:
    block = config.kwargs
    return block["BLOCK_M"], block["BLOCK_N"], block["BLOCK_K"], config.num_stages, config.num_warps


def _configs(interpreter: bool = INTERPRETER):
    """The autotuner's configs: every shape in ``TILES`` (a launch keeps its
    own list's); one under the interpreter, which cannot run an autotuner with more."""
    if interpreter:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    shapes = dict.fromkeys(shape for kinds in TILES.values() for kind in kinds.values() for shape in kind)
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_stages=stages, num_warps=warps)
        for m, n, k, stages, warps in shapes
    ]


def shared_memory_bytes(config, element_size: int) -> int:
    """Shared memory of a config's software pipeline: ``num_stages`` buffers
    of an A tile (BLOCK_M, BLOCK_K) and a B tile (BLOCK_K, BLOCK_N)."""
    block_m, block_n, block_k, stages, _ = _shape(config)
    return stages * (block_m + block_n) * block_k * element_size


# C += A @ B loads a tile of C next to the accumulator: each thread then holds
# two tiles' worth, and above this many accumulator elements per thread the
# epilogue spills (sm_90: 128x128 tiles on 4 warps, 128x256 on 8).
MAX_ACCUMULATE_ELEMENTS_PER_THREAD = 64


def launchable_configs(configs, architecture: int, kind: str, element_size: int, max_shared_memory: int,
                       accumulate: bool = False):
    """The configs of the tile list for ``architecture`` and ``kind`` whose
    pipelines fit ``max_shared_memory`` bytes, and under ``accumulate`` whose
    epilogue holds two tiles without spilling."""
    def fits(config):
        block_m, block_n, _, _, warps = _shape(config)
        return not accumulate or block_m * block_n <= MAX_ACCUMULATE_ELEMENTS_PER_THREAD * 32 * warps

    return [c for c in configs if _shape(c) in TILES[architecture][kind]
            and shared_memory_bytes(c, element_size) <= max_shared_memory and fits(c)]


def _prune_to_launch(configs, named_args, **kwargs):
    """early_config_prune: keep the configs for the launch's kind of operand
    that fit its device's shared memory, before any is compiled."""
    a = named_args["a_ptr"]
    if a.device.type != "cuda":
        return configs
    properties = triton.runtime.driver.active.utils.get_device_properties(a.device.index)
    architecture = tile_architecture(torch.cuda.get_device_capability(a.device))
    kind = operand_kind(a.dtype, kwargs["INPUT_PRECISION"])
    return launchable_configs(configs, architecture, kind, a.element_size(), properties["max_shared_mem"],
                              kwargs["ACCUMULATE"])


def m_bucket(m: int) -> int:
    """The autotuner's key for M: the next power of two, so that batches of
    96 and 128 rows, or an evaluation batch, share one tuning."""
    return triton.next_power_of_2(m)


def _autotune_cache() -> dict:
    """Keep each tuning on disk (triton >= 3.2 can), keyed by the kernel's
    source, the shape bucket and the device: a training run, or the next
    process, tunes a layer shape once, not once per process."""
    return {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


@triton.autotune(
    configs=_configs(),
    key=["M_BUCKET", "N", "K", "HAS_BIAS", "RELU", "ROW_SUM", "ACCUMULATE", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune_to_launch},
    **_autotune_cache(),
)
@triton.jit
def dense_matmul_kernel(
    # pointers
    a_ptr,  # *T, A (M, K)
    b_ptr,  # *T, B (K, N)
    c_ptr,  # *T or *ACC, C (M, N), written (read first under ACCUMULATE)
    bias_ptr,  # *T, bias (N,), added to every row of C; read only if HAS_BIAS
    row_sum_ptr,  # *T or *ACC, (M,) contiguous, sums over k of A[m, k]; written only if ROW_SUM
    # dimensions
    M, N, K,
    stride_am, stride_ak,  # A[m, k] at a_ptr + m * stride_am + k * stride_ak
    stride_bk, stride_bn,  # B[k, n] at b_ptr + k * stride_bk + n * stride_bn
    stride_cm, stride_cn,  # C[m, n] at c_ptr + m * stride_cm + n * stride_cn
    stride_bias,  # bias[n] at bias_ptr + n * stride_bias
    M_BUCKET,  # m_bucket(M): the autotuner's key, not read by the kernel
    # meta-parameters
    HAS_BIAS: tl.constexpr,  # add bias in the epilogue
    RELU: tl.constexpr,  # max(., 0) in the epilogue, after the bias
    ROW_SUM: tl.constexpr,  # also write the row sums of A
    ACCUMULATE: tl.constexpr,  # C += A @ B (and row sums +=) instead of C = ...; no bias, no ReLU
    INPUT_PRECISION: tl.constexpr,  # "ieee" or "tf32", for float32 tiles
    ACC_DTYPE: tl.constexpr,  # tl.float32, or tl.float64 for float64 inputs
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # tile of C, step along K
    GROUP_M: tl.constexpr,  # row blocks visited together, so their B tiles stay in L2
):
    # Grouped ordering: consecutive programs walk GROUP_M row blocks of C
    # down one column block before moving right, reusing the B tiles they load.
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    programs_per_group = GROUP_M * blocks_n
    first_block_m = (pid // programs_per_group) * GROUP_M
    group_rows = min(blocks_m - first_block_m, GROUP_M)
    block_m = first_block_m + (pid % programs_per_group) % group_rows
    block_n = (pid % programs_per_group) // group_rows

    # int64 offsets: rows * strides can pass 2^31. Rows and columns past the
    # edge wrap around (modulo) so the loads need no mask; the store masks them.
    offs_m = block_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = block_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    a_ptrs = a_ptr + (offs_m % M)[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + (offs_n % N)[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    row_sum = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        if ROW_SUM:
            row_sum += tl.sum(a.to(ACC_DTYPE), axis=1)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    mask_m = offs_m < M
    mask_n = offs_n < N
    if ROW_SUM:
        if block_n == 0:  # one column of programs writes the row sums
            if ACCUMULATE:
                row_sum += tl.load(row_sum_ptr + offs_m, mask=mask_m).to(ACC_DTYPE)
            tl.store(row_sum_ptr + offs_m, row_sum.to(row_sum_ptr.dtype.element_ty), mask=mask_m)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0).to(ACC_DTYPE)[None, :]
    if RELU:
        acc = tl.where(acc < 0, 0, acc)  # NaN passes through, as in torch.relu
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    mask_c = mask_m[:, None] & mask_n[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=mask_c).to(ACC_DTYPE)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_c)


def tf32_allowed() -> bool:
    """Whether native float32 CUDA matmuls may use TF32. torch >= 2.9 has a
    new API (``torch.backends[.cuda.matmul].fp32_precision``) and raises on a
    read of the legacy ``allow_tf32`` once it is used; the new setting is
    read where it exists (it follows the legacy flag too)."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    return matmul.allow_tf32 if precision is None else precision == "tf32"


def _input_precision(dtype: torch.dtype, device: torch.device) -> str:
    """TF32 for float32 only where the user allowed it for native matmuls."""
    if dtype == torch.float32 and device.type == "cuda" and tf32_allowed():
        return "tf32"
    return "ieee"


def dense_matmul(a, b, bias=None, relu=False, row_sum=False, out=None, row_sums=None, accumulate=False):
    """C = act(A @ B + bias) for 2-D ``a`` (M, K) and ``b`` (K, N) of any strides.

    Every argument is read through its strides (``bias`` (N,) too); none is
    copied but a lazily negated one (``readable``). Returns ``C`` (M, N), contiguous, the dtype of ``a``, and, when
    ``row_sum``, also the sums of each row of ``a`` (M,).

    With ``out`` (M, N), of any strides and dtype (a float32 accumulator for
    16-bit ``a``), C is written there instead, and added to what it holds
    when ``accumulate``; ``row_sums`` (M,), contiguous, then receives (or
    accumulates) the row sums. Returns ``out``.
    """
    a, b, bias = readable(a, b, bias)
    M, K = a.shape
    N = b.shape[1]
    if out is None:
        c = torch.empty((M, N), dtype=a.dtype, device=a.device)
        row_sums = torch.empty(M, dtype=a.dtype, device=a.device) if row_sum else None
    else:
        c = out
    if M * N == 0:
        # no tile of C to compute; the row sums (over K) may still be wanted
        if out is None:
            return (c, a.sum(dim=1)) if row_sum else c
        if row_sums is not None and accumulate:
            row_sums.add_(a.sum(dim=1))
        elif row_sums is not None:
            row_sums.copy_(a.sum(dim=1))
        return out
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    with device_guard(a):
        dense_matmul_kernel[grid](
            a, b, c,
            bias if bias is not None else c,
            row_sums if row_sums is not None else c,
            M, N, K,
            a.stride(0), a.stride(1),
            b.stride(0), b.stride(1),
            c.stride(0), c.stride(1),
            bias.stride(0) if bias is not None else 0,
            m_bucket(M),
            HAS_BIAS=bias is not None,
            RELU=relu,
            ROW_SUM=row_sums is not None,
            ACCUMULATE=accumulate,
            INPUT_PRECISION=_input_precision(a.dtype, a.device),
            ACC_DTYPE=triton_accumulation_dtype(a.dtype),
        )
    if out is not None:
        return out
    return (c, row_sums) if row_sum else c
