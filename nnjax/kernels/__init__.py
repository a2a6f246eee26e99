"""nnjax's own CPU kernels, called through XLA's FFI where XLA's operations leave speed
behind: :mod:`nnjax.kernels.small_matmul` (decoding's products with few rows).
:mod:`nnjax.kernels.native` builds them with the machine's C++ compiler."""

from nnjax.kernels import native, small_matmul

__all__ = ["native", "small_matmul"]
