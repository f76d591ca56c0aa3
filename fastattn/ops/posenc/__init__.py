"""Positional encodings (sinusoidal, rotary): Triton kernels, launcher, CUDA launcher, op registration and reference."""
