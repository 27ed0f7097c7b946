"""Hand-written optimizers, drop-ins for their ``torch.optim`` twins.

``SGD``, ``RMSprop``, ``Adam`` and ``AdamW`` take the twins' arguments and keep
the twins' state, so a state dict saved by one loads into the other. Each
step updates every parameter of a group in a handful of Triton launches on
CUDA (one per device and dtype) and with ``torch._foreach_*`` ops elsewhere;
``torchblocks.set_backend`` chooses, as for the blocks. As in torch.optim,
complex parameters are stepped as their real view, SGD takes sparse
gradients (``nn.Embedding(sparse=True)``), and differentiable=True lets
autograd record the step (on the foreach reference, whatever the backend).

Example::

    >>> optimizer = torchblocks.optim.RMSprop(model.parameters(), lr=1e-3, alpha=0.9, eps=1e-7)
    >>> loss.backward(); optimizer.step(); optimizer.zero_grad()
"""

from torchblocks.optim.adam import Adam, AdamW
from torchblocks.optim.rmsprop import RMSprop
from torchblocks.optim.sgd import SGD

__all__ = ["SGD", "RMSprop", "Adam", "AdamW"]
