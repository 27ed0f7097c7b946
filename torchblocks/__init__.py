"""torchblocks: the mathematical building blocks of a neural network, by hand.

Each block is a ``torch.autograd.Function`` with a hand-derived backward, Triton
kernels for the GPU and a plain-PyTorch fallback, tested against its native
twin. See ``torchblocks.functional``, ``torchblocks.nn`` and ``torchblocks.optim``.
The command line and its tools (check, bench, the MNIST job and its data) live
in ``torchblocks.cli``, which the library never imports.
"""

from torchblocks import functional, nn, optim
from torchblocks.backend import get_backend, set_backend, use_backend
from torchblocks.override import disable, enable, enabled
from torchblocks.patching import patch

__all__ = ["functional", "nn", "optim", "disable", "enable", "enabled", "get_backend", "patch",
           "set_backend", "use_backend"]
__version__ = "0.1.0"
