"""Strict reading of IDX files, the format MNIST ships in.

An IDX file is a 4-byte magic number ``0x00 0x00 <type> <ndim>``, then
``ndim`` big-endian uint32 sizes, then the values, big-endian, in row-major
order: MNIST's images are magic 2051 (ubyte, 3 dims), its labels 2049
(ubyte, 1 dim). Nothing is guessed: a header that disagrees with the file's
length, or a file that disagrees with what the caller expects, is an error
that names the file.
"""

import gzip
import zlib
from typing import Optional

import numpy as np

__all__ = ["DataFileError", "gunzip", "parse_idx"]

# IDX type code -> numpy dtype (big-endian where it matters).
_IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class DataFileError(ValueError):
    """A data file that is missing, corrupt, truncated or not what was expected; the message names it."""


def gunzip(data: bytes, name: str) -> bytes:
    """``data`` decompressed when it starts with the gzip magic, else ``data`` itself.

    Raises:
        DataFileError: a truncated or corrupt gzip stream; the message names ``name``.

    Example::

        >>> gunzip(gzip.compress(b"idx"), "labels.gz")
        b'idx'
    """
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        return gzip.decompress(data)
    except EOFError as error:
        raise DataFileError(f"{name}: truncated gzip data ({len(data):,} bytes; {error})") from None
    except (OSError, zlib.error) as error:
        raise DataFileError(f"{name}: corrupt gzip data ({error})") from None


def parse_idx(data: bytes, name: str, ndim: Optional[int] = None) -> np.ndarray:
    """The array an IDX file holds, checked against its own header.

    Args:
        data: the file's (uncompressed) bytes.
        name: the file's name or path, for error messages.
        ndim: the number of dimensions expected (3 for images, 1 for labels), or None.

    Returns:
        a read-only numpy array of the header's shape and type (uint8 for MNIST).

    Raises:
        DataFileError: wrong magic number, unknown type, wrong number of
            dimensions, or a length that is not the header's (truncated or
            with trailing bytes).

    Example::

        >>> header = bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big")
        >>> parse_idx(header + bytes([7, 2, 1]), "labels", ndim=1)
        array([7, 2, 1], dtype=uint8)
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataFileError(f"{name}: not an IDX file: the magic number must start with two zero bytes, "
                            f"got {data[:4].hex(' ') or 'an empty file'}")
    type_code, dims = data[2], data[3]
    if type_code not in _IDX_DTYPES:
        raise DataFileError(f"{name}: unknown IDX type code 0x{type_code:02x} in magic number "
                            f"{int.from_bytes(data[:4], 'big')}; expected one of "
                            f"{', '.join(f'0x{code:02x}' for code in _IDX_DTYPES)}")
    if ndim is not None and dims != ndim:
        raise DataFileError(f"{name}: wrong magic number {int.from_bytes(data[:4], 'big')}: it declares {dims} "
                            f"dimension(s), expected {ndim} (magic {(type_code << 8) | ndim})")
    header_bytes = 4 + 4 * dims
    if len(data) < header_bytes:
        raise DataFileError(f"{name}: truncated header: {dims} dimensions need {header_bytes} bytes, "
                            f"the file has {len(data)}")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    dtype = _IDX_DTYPES[type_code]
    expected = header_bytes + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "has trailing bytes"
        raise DataFileError(f"{name}: {problem}: its header declares shape {shape} of {dtype.name}, "
                            f"{expected:,} bytes in all, but the file holds {len(data):,}")
    return np.frombuffer(data, dtype=dtype, offset=header_bytes).reshape(shape)
