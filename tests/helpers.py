"""Test helpers shared by the test files."""

import re
import struct
import zlib

import pytest
import torch

from torchblocks.testing import assert_close


def assert_compiled_matches_eager(module, inputs, reduce=lambda output: output.sum()):
    """``torch.compile(module, fullgraph=True)`` (so any graph break fails)
    gives eager's output and parameter gradients; ``reduce`` turns the output
    into the scalar to differentiate."""
    eager = module(*inputs)
    reduce(eager).backward()
    eager_grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True)(*inputs)
    reduce(compiled).backward()
    assert_close(compiled, eager)
    for param, expected in zip(module.parameters(), eager_grads):
        assert_close(param.grad, expected, what="parameter gradient")


def read_png(path):
    """(width, height) of a PNG, after checking its signature and every chunk's CRC."""
    blob = open(path, "rb").read()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    offset, chunks = 8, []
    while offset < len(blob):
        (length,) = struct.unpack(">I", blob[offset:offset + 4])
        kind, body = blob[offset + 4:offset + 8], blob[offset + 8:offset + 8 + length]
        (crc,) = struct.unpack(">I", blob[offset + 8 + length:offset + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in chunk {kind!r}"
        chunks.append(kind)
        offset += 12 + length
    assert chunks[0] == b"IHDR" and chunks[-1] == b"IEND" and b"IDAT" in chunks
    return struct.unpack(">II", blob[16:24])


LAYOUTS = ["contiguous", "sliced", "transposed", "expanded", "offset"]


def with_layout(values: torch.Tensor, layout: str) -> torch.Tensor:
    """``values`` in a tensor of the given memory layout:
    contiguous; sliced (every other element of a wider last dimension);
    transposed (dims reversed in memory; for 1-D, a column of a row-major
    matrix); expanded (stride 0 along the last dim: the first value of each
    row, repeated); offset (contiguous from storage offset 5)."""
    shape = values.shape
    if layout == "contiguous":
        return values.contiguous()
    if layout == "expanded":
        return values[..., :1].expand(shape)
    if layout == "sliced":
        view = values.new_empty(*shape[:-1], 2 * shape[-1])[..., ::2]
    elif layout == "transposed" and values.dim() == 1:
        view = values.new_empty(shape[0], 3)[:, 1]
    elif layout == "transposed":
        view = values.new_empty(shape[::-1]).permute(*reversed(range(values.dim())))
    elif layout == "offset":
        view = values.new_empty(values.numel() + 5)[5:].view(shape)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    return view.copy_(values)


def assert_rejected_like_native(ours, native, error, message):
    """``native()`` raises exactly ``error``; ``ours()`` raises the same type
    with ``message``, which names the argument and what was expected."""
    with pytest.raises(error) as native_error:
        native()
    assert type(native_error.value) is error, f"native raised {type(native_error.value).__name__}"
    with pytest.raises(error, match=re.escape(message)) as ours_error:
        ours()
    assert type(ours_error.value) is error, f"ours raised {type(ours_error.value).__name__}"
