"""The dense layer's GEMM: C = act(A @ B + bias), with float32 accumulation.

One tiled kernel serves all three products of a dense layer through strides:
    forward  y  = act(x @ W^T + b)   A = x   (M, K),  B = W^T (K, N): W's strides swapped
    backward dx = g @ W              A = g   (M, N),  B = W   (N, K)
             dW = g^T @ x            A = g^T (N, M),  B = x   (M, K), with ROW_SUM: db = sum_m g
The row sum of A over the reduction dimension comes from the A tiles the GEMM
loads anyway, so the bias gradient costs no extra pass over g.
"""

import os

import torch
import triton
import triton.language as tl

from ._launch import triton_accumulation_dtype

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _configs():
    """Tile shapes to autotune over on a GPU; one under the interpreter, which
    cannot run an autotuner with more."""
    if INTERPRETER:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    shapes = [  # BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps
        (128, 256, 64, 3, 8),
        (256, 128, 64, 3, 8),
        (128, 128, 64, 4, 4),
        (128, 128, 32, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 32, 32, 5, 2),
    ]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_stages=stages, num_warps=warps)
        for m, n, k, stages, warps in shapes
    ]


@triton.autotune(configs=_configs(), key=["M", "N", "K", "HAS_BIAS", "RELU", "ROW_SUM", "INPUT_PRECISION"])
@triton.jit
def dense_matmul_kernel(
    # pointers
    a_ptr,  # *T, A (M, K)
    b_ptr,  # *T, B (K, N)
    c_ptr,  # *T, C (M, N), written
    bias_ptr,  # *T, bias (N,), added to every row of C; read only if HAS_BIAS
    row_sum_ptr,  # *T, (M,) sums over k of A[m, k]; written only if ROW_SUM
    # dimensions
    M, N, K,
    stride_am, stride_ak,  # A[m, k] at a_ptr + m * stride_am + k * stride_ak
    stride_bk, stride_bn,  # B[k, n] at b_ptr + k * stride_bk + n * stride_bn
    stride_cm, stride_cn,  # C[m, n] at c_ptr + m * stride_cm + n * stride_cn
    stride_bias,  # bias[n] at bias_ptr + n * stride_bias
    # meta-parameters
    HAS_BIAS: tl.constexpr,  # add bias in the epilogue
    RELU: tl.constexpr,  # max(., 0) in the epilogue, after the bias
    ROW_SUM: tl.constexpr,  # also write the row sums of A
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
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        if ROW_SUM:
            row_sum += tl.sum(a.to(ACC_DTYPE), axis=1)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    mask_m = offs_m < M
    mask_n = offs_n < N
    if ROW_SUM:
        if block_n == 0:  # one column of programs writes the row sums
            tl.store(row_sum_ptr + offs_m, row_sum.to(row_sum_ptr.dtype.element_ty), mask=mask_m)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0).to(ACC_DTYPE)[None, :]
    if RELU:
        acc = tl.where(acc < 0, 0, acc)  # NaN passes through, as in torch.relu
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _input_precision(dtype: torch.dtype, device: torch.device) -> str:
    """TF32 for float32 only where the user allowed it for native matmuls."""
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def dense_matmul(a, b, bias=None, relu=False, row_sum=False):
    """C = act(A @ B + bias) for 2-D ``a`` (M, K) and ``b`` (K, N) of any strides.

    Every argument is read through its strides (``bias`` (N,) too); none is
    copied. Returns ``C`` (M, N), contiguous, the dtype of ``a``, and, when
    ``row_sum``, also the sums of each row of ``a`` (M,).
    """
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty((M, N), dtype=a.dtype, device=a.device)
    row_sums = torch.empty(M, dtype=a.dtype, device=a.device) if row_sum else None
    if M * N == 0:
        # no tile of C to compute; the row sums (over K) may still be wanted
        return (c, a.sum(dim=1)) if row_sum else c
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    dense_matmul_kernel[grid](
        a, b, c,
        bias if bias is not None else c,
        row_sums if row_sum else c,
        M, N, K,
        a.stride(0), a.stride(1),
        b.stride(0), b.stride(1),
        c.stride(0), c.stride(1),
        bias.stride(0) if bias is not None else 0,
        HAS_BIAS=bias is not None,
        RELU=relu,
        ROW_SUM=row_sum,
        INPUT_PRECISION=_input_precision(a.dtype, a.device),
        ACC_DTYPE=triton_accumulation_dtype(a.dtype),
    )
    return (c, row_sums) if row_sum else c
