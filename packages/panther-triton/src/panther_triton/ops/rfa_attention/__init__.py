"""Random-feature (FAVOR+) attention: forward.py and backward.py (kernels and launchers), common.py (the
feature maps and block sizes they share), op.py (torch.library registration, autograd). The math and
its reference are :mod:`panther.ops.rfa_attention` and the torch backend."""
