"""One file per block: the custom ops (forward and backward pieces, each with
a Triton and a reference implementation and a fake for torch.compile) and the
``torch.autograd.Function`` that ties them together. ``_dispatch`` defines
the ops and lets plain eager calls skip the dispatcher."""
