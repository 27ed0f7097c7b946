"""What the launchers share: block sizes, the grid, the device guard, dtype
tables, and the host-side description of a strided layout that
``element_offsets`` reads. Under the Triton interpreter, importing it makes
the interpreter compute bfloat16 as a GPU does and patch the language once per
launch (``_interpreter``)."""

import contextlib

import torch
import triton
import triton.language as tl

from ._common import INTERPRETER, accumulation_dtype
from ._interpreter import install_bfloat16, install_patch_once

if INTERPRETER:  # every launcher imports this module, so the interpreter is fixed before any launch
    install_bfloat16()
    install_patch_once()

# One block of an elementwise kernel: 1024 elements. Shared by every elementwise kernel.
ELEMENTWISE_BLOCK = 1024


def elementwise_warps(dtype: torch.dtype) -> int:
    """Warps per elementwise block: 4 (8 elements per thread, two 128-bit
    accesses in float32), 8 for 8-byte dtypes (4 per thread: float64
    optimizer steps spill registers at 8)."""
    return 8 if dtype.itemsize == 8 else 4


# torch dtype -> Triton dtype, for the dtypes the kernels take.
TRITON_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def triton_accumulation_dtype(dtype: torch.dtype):
    """``accumulation_dtype`` as a Triton dtype, for an ``ACC_DTYPE`` meta-parameter."""
    return TRITON_DTYPES[accumulation_dtype(dtype)]


# The strided path addresses up to this many (collapsed) dimensions.
MAX_STRIDED_RANK = 4


def device_guard(tensor: torch.Tensor):
    """Make ``tensor``'s GPU the current one for a launch (a tensor on cuda:1
    would otherwise launch on the current device); nothing for other devices."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def elementwise_grid(n_elements: int, block: int = ELEMENTWISE_BLOCK) -> tuple:
    """A 1-D launch grid covering ``n_elements`` in blocks of ``block``."""
    return (triton.cdiv(n_elements, block),)


def _is_dense(tensor: torch.Tensor) -> bool:
    """True when ``tensor`` covers one gap-free range of memory, in any dim order."""
    expected = 1
    for size, stride in sorted(zip(tensor.shape, tensor.stride()), key=lambda d: d[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def readable(*tensors):
    """The tensors as a kernel reads their memory: one with a lazy negation
    (``torch._neg_view``'s negative bit, which no pointer carries) copied
    with the negation applied; any other, and None, as it is.

    Example::

        >>> x, w = readable(torch._neg_view(torch.ones(2)), None)
        >>> x.is_neg(), x.tolist(), w
        (False, [-1.0, -1.0], None)
    """
    return tuple(t.resolve_neg() if t is not None and t.is_neg() else t for t in tensors)


def shares_flat_layout(*tensors: torch.Tensor) -> bool:
    """True when all ``tensors`` are dense with the same strides, so element i
    of one sits at memory offset i of each: one flat index serves them all."""
    first = tensors[0]
    return _is_dense(first) and all(t.stride() == first.stride() for t in tensors[1:])


def collapse_dims(shape, *strides):
    """Merge neighbouring dims that are contiguous in every stride tuple and
    drop dims of size 1. Returns ``(sizes, [strides per tensor])``."""
    dims = [d for d in range(len(shape)) if shape[d] != 1]
    sizes = [shape[d] for d in dims[:1]]
    merged = [[s[d] for d in dims[:1]] for s in strides]
    for d in dims[1:]:
        if all(m[-1] == s[d] * shape[d] for m, s in zip(merged, strides)):
            sizes[-1] *= shape[d]
            for m, s in zip(merged, strides):
                m[-1] = s[d]
        else:
            sizes.append(shape[d])
            for m, s in zip(merged, strides):
                m.append(s[d])
    return sizes, merged


def padded_layout(sizes, strides):
    """Left-pad a collapsed layout to ``MAX_STRIDED_RANK`` dims: the sizes of
    dims 1..3 (dim 0 is implied by the element count) and all four strides."""
    pad = MAX_STRIDED_RANK - len(sizes)
    sizes = [1] * pad + list(sizes)
    strides = [0] * pad + list(strides)
    return sizes[1:], strides


@triton.jit
def element_offsets(index, size1, size2, size3, stride0, stride1, stride2, stride3, CONTIGUOUS: tl.constexpr):
    """Memory offset (in elements) of logical element ``index`` (int64) of a
    4-D strided view with sizes (-, size1, size2, size3): ``index`` itself
    under CONTIGUOUS (every tensor of the launch dense with one layout)."""
    if CONTIGUOUS:
        offsets = index
    else:
        i3 = index % size3
        index = index // size3
        i2 = index % size2
        index = index // size2
        i1 = index % size1
        i0 = index // size1
        offsets = i0 * stride0 + i1 * stride1 + i2 * stride2 + i3 * stride3
    return offsets


def launch_elementwise(kernel, *tensors: torch.Tensor) -> None:
    """Launch an elementwise ``kernel`` over same-shaped ``tensors``.

    The kernel's arguments, in order: one pointer per tensor, ``n_elements``,
    ``size1, size2, size3``, then four strides per tensor, and the
    meta-parameters ``CONTIGUOUS`` and ``BLOCK_SIZE``. When every tensor is
    dense with the same strides, one flat index addresses them all
    (``CONTIGUOUS=True``, strides unused); otherwise each tensor is addressed
    through its own strides over the collapsed shape.
    """
    n_elements = tensors[0].numel()
    if n_elements == 0:
        return
    contiguous = shares_flat_layout(*tensors)
    if contiguous:
        sizes, strides = [1, 1, 1], [[0, 0, 0, 1]] * len(tensors)
    else:
        collapsed, per_tensor = collapse_dims(tensors[0].shape, *(t.stride() for t in tensors))
        if len(collapsed) > MAX_STRIDED_RANK:
            for slices in zip(*(t.unbind(0) for t in tensors)):
                launch_elementwise(kernel, *slices)
            return
        padded = [padded_layout(collapsed, s) for s in per_tensor]
        sizes, strides = padded[0][0], [s for _, s in padded]
    with device_guard(tensors[0]):
        kernel[elementwise_grid(n_elements)](
            *tensors,
            n_elements,
            *sizes,
            *(s for tensor_strides in strides for s in tensor_strides),
            CONTIGUOUS=contiguous,
            BLOCK_SIZE=ELEMENTWISE_BLOCK,
            num_warps=elementwise_warps(tensors[0].dtype),
        )
