"""Attention: the kernels per backend (Triton, Gluon, CUDA launchers), the launcher, op registration, the
PyTorch reference, and the table of what each backend takes (``support``)."""
