"""bfloat16 under the Triton interpreter, computed as a GPU computes it.

triton's interpreter (``TRITON_INTERPRET=1``; 3.6 and 3.9 alike) holds a
bfloat16 value in numpy as its raw uint16 bits and hands those integers to
numpy: a bf16 add adds bit patterns, -1.0 (0xBF80) compares greater than 0, a
dot multiplies integers, a cast to bf16 truncates. ``install_bfloat16``
changes the one choice behind all of it, bf16's numpy form, to a float32 array
holding values that bf16 represents exactly:
  - a load widens the 16 bits exactly: float32 bits = bf16 bits << 16;
  - every bf16 value an op makes (+, -, *, a cast, a dot into a bf16
    accumulator) is rounded to nearest even, as a GPU's bf16 instructions
    round each result (float32 arithmetic rounded again to bf16 is correctly
    rounded for + - * /: 24 >= 2 * 8 + 2 bits);
  - a store, bitcast, compare-and-swap or atomic add writes the 16 bits of
    that rounded value (atomics lane after lane, each add rounded);
  - a bf16 x bf16 ``tl.dot`` multiplies exact values into its float32
    accumulator, as tensor cores do; ``tl.sum`` of bf16 adds pairwise, each
    level rounded, as a GPU's reduction tree does.
Not emulated: bf16 <-> fp8 conversions and rounding modes other than to
nearest even raise; a bf16 ``tl.cumsum`` adds in float32 and rounds each
prefix once. Only the interpreter's builder and helpers change: a kernel
compiled for a GPU never meets them, and ``_launch`` installs this only under
the interpreter.

``install_patch_once`` spares the interpreter a cost it pays on every call of
a ``@triton.jit`` helper: re-patching all of ``triton.language`` (``inspect``
over hundreds of members, about 2 ms), although the launch has patched it
already; half the time of an optimizer step under the interpreter.
"""

import inspect

import numpy as np
import triton.language as tl

BF16 = tl.bfloat16


def round_to_bfloat16(values: np.ndarray) -> np.ndarray:
    """``values`` (a float array, any shape) rounded to nearest even
    bfloat16, as float32. float64 goes to float32 rounding to odd first (an
    inexact result keeps a set last bit), so that the one rounding to nearest
    even is correct, not a double rounding. A NaN keeps its sign and high
    payload, made quiet where dropping the low half would leave an infinity.

    Example::

        >>> round_to_bfloat16(np.array([1 + 2**-8, 1 + 3 * 2**-8]))  # ties to even
        array([1.      , 1.015625], dtype=float32)
    """
    values = np.asarray(values)
    with np.errstate(over="ignore"):  # past float32's range: inf, which rounds to inf below
        narrow = values.astype(np.float32)
    bits = narrow.view(np.uint32)
    if values.dtype == np.float64:
        inexact = narrow != values
        bits = (bits - (inexact & (np.abs(narrow) > np.abs(values)))) | inexact
    # half to even at bit 16: add 0x7FFF plus the lowest bit kept, drop the low half
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    nan = (bits & 0xFFFF0000) | np.where(bits & 0x007F0000, 0, 0x00400000).astype(np.uint32)
    return np.where(np.isnan(narrow), nan, rounded).view(np.float32)


def _widen(bits: np.ndarray) -> np.ndarray:
    """bf16 bits (uint16) as float32 values, exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _narrow(values: np.ndarray) -> np.ndarray:
    """Float values as the uint16 bits of their bf16 rounding."""
    return (round_to_bfloat16(values).view(np.uint32) >> 16).astype(np.uint16)


def install_bfloat16() -> None:
    """Make triton's interpreter compute bfloat16 as a GPU does (the
    module's docstring), for every kernel it runs in this process; a second
    call does nothing.

    Example::

        >>> install_bfloat16()  # then launch any kernel under TRITON_INTERPRET=1
    """
    from triton.runtime import interpreter

    builder, handle, native = interpreter.InterpreterBuilder, interpreter.TensorHandle, interpreter._interpreter
    if getattr(builder, "computes_bfloat16", False):
        return
    builder.computes_bfloat16 = True
    np_dtype, fits, made = interpreter._get_np_dtype, interpreter._validate_np_data_size, handle.__post_init__
    load, store, cast, to_fp = builder.create_masked_load, builder.create_masked_store, builder.cast_impl, \
        builder.create_fp_to_fp
    bitcast, fabs, rmw, cas = builder.create_bitcast, builder.create_fabs, builder.create_atomic_rmw, \
        builder.create_atomic_cas
    reduce_sum = interpreter.ReduceOps.sum

    # bf16's numpy form: float32 (the interpreter looks these up at each call)
    interpreter._get_np_dtype = lambda dtype: np.dtype(np.float32) if dtype.scalar == BF16 else np_dtype(dtype)
    interpreter._validate_np_data_size = lambda data, dtype: dtype == BF16 or fits(data, dtype)

    def post_init(self):  # every bf16 value made, rounded; a comparison's bool result is typed like its operands
        if self.dtype == BF16 and self.data.dtype.kind == "f":
            self.data = round_to_bfloat16(self.data)
        made(self)

    def masked_load(self, ptrs, mask, other, *options):  # options: cache and volatility, by triton version
        if ptrs.get_element_ty() != BF16:
            return load(self, ptrs, mask, other, *options)
        other = np.zeros(ptrs.data.shape, np.uint16) if other is None else _narrow(other.data)
        return handle(_widen(native.load(ptrs.data, mask.data, other, np.dtype(np.uint16))), BF16)

    def masked_store(self, ptrs, value, mask, *options):
        if ptrs.get_element_ty() != BF16:
            return store(self, ptrs, value, mask, *options)
        return native.store(ptrs.data, _narrow(value.data), mask.data)

    def cast_impl(self, src, dst_type):  # an integer goes through float64: exact up to 2^53
        if BF16 not in (src.dtype.scalar, dst_type.scalar):
            return cast(self, src, dst_type)
        data = src.data if src.data.dtype.kind == "f" else src.data.astype(np.float64)
        return handle(data if dst_type.scalar == BF16 else data.astype(interpreter._get_np_dtype(dst_type)),
                      dst_type.scalar)

    def fp_to_fp(self, src, dst_type, rounding_mode):  # triton 3.9 casts bf16 <-> fp16 here, through cast_impl
        if BF16 in (src.dtype.scalar, dst_type.scalar) and tl.float16 not in (src.dtype.scalar, dst_type.scalar):
            raise NotImplementedError("the interpreter's bfloat16 has no fp8 conversions nor rounding modes but RTNE")
        return to_fp(self, src, dst_type, rounding_mode)

    def create_bitcast(self, src, dst_type):
        if src.dtype.scalar == BF16:
            return handle(_narrow(src.data).view(interpreter._get_np_dtype(dst_type)), dst_type.scalar)
        if dst_type.scalar == BF16:
            return handle(_widen(src.data.view(np.uint16)), BF16)
        return bitcast(self, src, dst_type)

    def create_fabs(self, arg):
        return handle(np.abs(arg.data), BF16) if arg.dtype.scalar == BF16 else fabs(self, arg)

    def atomic_rmw(self, op, ptr, val, mask, sem, scope):  # triton offers atomic_add alone on bf16
        if ptr.get_element_ty() != BF16:
            return rmw(self, op, ptr, val, mask, sem, scope)
        assert op == interpreter._ir.ATOMIC_OP.FADD, op
        old = np.zeros(ptr.data.shape, np.float32)
        values, one = np.broadcast_to(val.data, old.shape), np.ones(1, bool)
        for lane in zip(*np.nonzero(np.broadcast_to(mask.data, old.shape))):  # lane after lane, as on a GPU
            address = ptr.data[lane].reshape(1)
            old[lane] = _widen(native.load(address, one, np.zeros(1, np.uint16), np.dtype(np.uint16)))[0]
            with np.errstate(over="ignore", invalid="ignore"):
                native.store(address, _narrow(np.array([old[lane] + values[lane]])), one)
        return handle(old, BF16)

    def atomic_cas(self, ptr, cmp, val, sem, scope):  # compares and swaps the 16 bits
        if ptr.get_element_ty() != BF16:
            return cas(self, ptr, cmp, val, sem, scope)
        bits = cas(self, ptr, handle(_narrow(cmp.data), tl.uint16), handle(_narrow(val.data), tl.uint16), sem, scope)
        return handle(_widen(bits.data), BF16)

    def pairwise_sum(self, input):
        if input.dtype.scalar != BF16:
            return reduce_sum(self, input)
        data = input.handle.data
        axes = self.axis if self.axis is not None else tuple(range(data.ndim))
        data = np.moveaxis(data, self.axis, -1) if self.axis is not None else data.reshape(-1)
        while data.shape[-1] > 1:  # -0.0 pads an odd level: x + -0.0 = x, for x = -0.0 too
            data = np.concatenate([data, np.full(data.shape[:-1] + (data.shape[-1] % 2,), -0.0, np.float32)], -1)
            with np.errstate(over="ignore", invalid="ignore"):
                data = round_to_bfloat16(data[..., 0::2] + data[..., 1::2])
        total = data[..., 0]
        return self.to_tensor(np.expand_dims(total, axes) if self.keep_dims else total, input.dtype)

    handle.__post_init__ = post_init
    builder.create_masked_load, builder.create_masked_store, builder.cast_impl = masked_load, masked_store, cast_impl
    builder.create_fp_to_fp, builder.create_bitcast, builder.create_fabs = fp_to_fp, create_bitcast, create_fabs
    builder.create_atomic_rmw, builder.create_atomic_cas = atomic_rmw, atomic_cas
    interpreter.ReduceOps.sum = pairwise_sum


def install_patch_once() -> None:
    """Make triton's interpreter patch ``triton.language`` once per launch:
    a helper called from a running kernel, whose globals see only language
    modules the launch has patched, gets an empty patch scope instead of a
    second patching of the same attributes (the patches are global, keyed by
    the modules alone, and the launch's scope restores them when the grid is
    done). A second call does nothing.

    Example::

        >>> install_patch_once()  # then launch any kernel under TRITON_INTERPRET=1
    """
    from triton.runtime import interpreter

    patch_lang = interpreter._patch_lang
    if getattr(patch_lang, "once_per_launch", False):
        return
    patched = set()  # ids of the language modules the running launch has patched
    languages = {}  # a function -> the ids of the language modules its globals see

    def patch_lang_once(fn):
        wanted = languages.get(fn)
        if wanted is None:
            wanted = languages[fn] = {id(value) for value in fn.__globals__.values()
                                      if inspect.ismodule(value) and value in (tl, tl.core)}
        if patched and wanted <= patched:
            return interpreter._LangPatchScope()
        scope = patch_lang(fn)
        if not patched:  # the launch's own scope: restoring it ends the launch
            restore = scope.restore

            def restore_and_forget() -> None:
                patched.clear()
                restore()

            scope.restore = restore_and_forget
        patched.update(wanted)
        return scope

    patch_lang_once.once_per_launch = True
    interpreter._patch_lang = patch_lang_once
