"""Triton device code for torchblocks, installed as ``torchblocks.kernels``.

Every module here holds ``@triton.jit`` kernels and the small launchers that
size their grids and allocate their outputs. Nothing here knows autograd or
imports ``torchblocks``: the host side (``torchblocks._ops``) calls in.
Every module but ``_common`` (what the host side shares with the launchers)
imports triton.
"""
