"""Side-by-side training-step benchmarks: nnjax, hand-written JAX, Flax, Equinox, Haiku, PyTorch.

Run ``python -m benchmarks --help``. Not part of the installed library.
"""

__all__: list[str] = []
