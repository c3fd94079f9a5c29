"""qat.kernels."""
