"""Host memory the compiler leaves behind: returned to the operating system after compiling.

Compiling a large step (XLA's passes and LLVM) allocates and frees a few hundred MB on
the host. glibc's ``malloc`` keeps much of that freed memory mapped, so the process
stays that much larger for the whole run: the steps' own buffers are then allocated
beside it instead of in it. :func:`release_host_memory` asks ``malloc`` to give back
what it holds free (``malloc_trim(0)``); :func:`nnjax.fit` calls it once, after the
first step (the one that compiled). Elsewhere (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

__all__ = ["release_host_memory"]


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or ``None`` where the C library has none."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def release_host_memory() -> bool:
    """Return the host memory ``malloc`` holds free to the operating system.

    Call it after compiling a large program (the first call of a jitted train step);
    arrays in use are untouched. Returns ``True`` where glibc's ``malloc_trim`` ran
    and released memory, ``False`` otherwise (nothing to release, or another C library).

    Example:
        >>> isinstance(nj.release_host_memory(), bool)
        True
    """
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
