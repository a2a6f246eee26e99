"""Compiling ahead: a jitted function compiled on another thread before its first call.

XLA compiles a program on one core. Where a run compiles several programs one after
the other (the train step, then its evaluation at the first evaluation, then the
checkpoint's finite check at the first save), the later ones can compile on another
core while the train step compiles: JAX keeps compiled programs in one cache, so the
first call finds its program there.
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["compile_beside"]


def compile_beside(jitted: Any, *args: Any, **kwargs: Any) -> threading.Thread:
    """Compile ``jitted`` for ``args`` on a daemon thread; returns the started thread.

    The function is traced and lowered on the calling thread (so ``args`` may be
    donated to another computation as soon as this returns), compiled on the new one.
    A call before the compilation ends compiles again (it does not wait).

    Args:
        jitted: a ``jax.jit`` function (or a trainer's ``step``/``evaluate``).
        *args, **kwargs: arrays (or ``jax.ShapeDtypeStruct``) as the call will pass them:
            the same shapes, dtypes and shardings.

    Returns:
        The thread; ``join()`` it to wait for the compilation.

    Example:
        >>> from nnjax.training.ahead import compile_beside
        >>> f = jax.jit(lambda x: jnp.sin(x) * 2)
        >>> compile_beside(f, jnp.ones(3)).join()
        >>> f(jnp.ones(3)).shape
        (3,)
    """
    lowered = jitted.lower(*args, **kwargs)
    thread = threading.Thread(target=lowered.compile, name="nnjax-compile", daemon=True)
    thread.start()
    return thread
