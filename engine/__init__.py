"""fastpo.engine: training entry points built on fastpo.kernels."""
