"""Triton device code for torchblocks, installed as ``torchblocks.kernels``.

Every module here holds ``@triton.jit`` kernels and the small launchers that
size their grids and allocate their outputs. Nothing here knows autograd or
imports ``torchblocks``: the host side (``torchblocks._ops``) calls in.
Every module but ``_common`` (what the host side shares with the launchers)
imports triton.
"""

if __name__ != "torchblocks.kernels":
    # Found under another name: a script, `python -c` or `python -m` run from a
    # checkout's root puts the root first on sys.path, where this folder would
    # shadow the top-level `kernels` that belongs to Hugging Face's kernel hub
    # (transformers imports it). Hand the name to whichever `kernels` the rest
    # of sys.path holds, or to none, exactly as if this folder were not there.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _checkout]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _path)
    if _spec is None:
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    _owner = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _owner  # the import statement returns what sys.modules holds
    _spec.loader.exec_module(_owner)
