"""Layer norm and RMSNorm: Triton kernels, launcher, CUDA launcher, op registration and reference."""
