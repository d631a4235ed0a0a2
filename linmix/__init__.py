"""linmix: linear-time sequence mixers with reference ops, fast kernels, training and benchmarks."""

__version__ = "0.1.0"
