"""Test helpers shared by the test files."""

import struct
import zlib

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
