"""Building nnjax's C++ kernels with the machine's compiler and registering them with XLA.

A kernel is a ``.cc`` file beside this module, written against XLA's FFI headers
(``jax.ffi.include_dir()``). On first use it is compiled with ``-O3 -march=native``
into a shared library under the cache folder (``$NNJAX_CACHE_DIR``, else
``$XDG_CACHE_HOME/nnjax``, else ``~/.cache/nnjax``), named by a hash of the source,
the compiler and its version, the flags, jaxlib's version and the CPU's feature
flags: a later process (or another machine sharing the folder) loads the build that
matches it, or builds its own. The library is written under a temporary name and
renamed into place, so processes building at once never read a half-written file.

Where there is no C++ compiler, or the build fails, :func:`ffi_target` returns
``None`` once per process with a warning naming the cause, and the callers use XLA's
own operations (slower, the same results). ``NNJAX_NATIVE_KERNELS=0`` turns the
kernels off; ``CXX`` names the compiler.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from importlib import resources
from pathlib import Path

import jax

from nnjax.core.errors import BuildError

__all__ = ["ffi_target", "enabled", "cache_dir", "build"]

_FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c++17", "-w")
_BUILD_SECONDS = 600


def enabled() -> bool:
    """Whether native kernels may be used: not turned off by ``NNJAX_NATIVE_KERNELS=0``."""
    return os.environ.get("NNJAX_NATIVE_KERNELS", "1").strip().lower() not in ("0", "false", "no")


def cache_dir() -> Path:
    """Where built kernels are kept (see the module docstring)."""
    if os.environ.get("NNJAX_CACHE_DIR"):
        return Path(os.environ["NNJAX_CACHE_DIR"]) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nnjax" / "kernels"


def _compiler() -> str | None:
    name = os.environ.get("CXX")
    if name:
        return shutil.which(name) or name
    return next((p for p in map(shutil.which, ("c++", "g++", "clang++")) if p), None)


def _jaxlib_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("jaxlib")
    except PackageNotFoundError:
        return "unknown"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def build(name: str, directory: Path | None = None) -> Path:
    """The shared library of kernel ``name`` (``nnjax/kernels/<name>.cc``), built if needed.

    Args:
        name: the kernel's file name without ``.cc``.
        directory: where to keep the build; :func:`cache_dir` by default.

    Returns:
        The library's path.

    Raises:
        BuildError: no C++ compiler, or the compiler failed (its output is in the
            message).
    """
    compiler = _compiler()
    if compiler is None:
        raise BuildError("no C++ compiler found (looked for $CXX, c++, g++, clang++)")
    source = resources.files("nnjax.kernels").joinpath(f"{name}.cc").read_bytes()
    try:
        version = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"the C++ compiler {compiler!r} does not run: {e}") from e
    flags = (*_FLAGS, f"-I{jax.ffi.include_dir()}")
    digest = hashlib.sha256()
    for part in (
        source,
        compiler,
        version,
        " ".join(flags),
        f"jax {jax.__version__} jaxlib {_jaxlib_version()}",
        _cpu_flags(),
    ):
        digest.update(part if isinstance(part, bytes) else part.encode())
    directory = directory or cache_dir()
    library = directory / f"{name}-{digest.hexdigest()[:16]}.so"
    if library.exists():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as work:
        src = Path(work) / f"{name}.cc"
        src.write_bytes(source)
        out = Path(work) / library.name
        try:
            run = subprocess.run(
                [compiler, *flags, str(src), "-o", str(out)],
                capture_output=True,
                text=True,
                timeout=_BUILD_SECONDS,
            )
        except (OSError, subprocess.SubprocessError) as e:
            raise BuildError(f"{compiler} could not build {name}.cc: {e}") from e
        if run.returncode != 0 or not out.exists():
            raise BuildError(f"{compiler} could not build {name}.cc:\n{run.stderr[-2000:]}")
        os.replace(out, library)
    return library


@functools.cache
def ffi_target(name: str, symbol: str) -> str | None:
    """The XLA FFI target ``nnjax_<name>`` (CPU) for ``symbol`` in kernel ``name``'s library,
    built and registered on first use; ``None`` when kernels are off or cannot be built.

    Example:
        >>> from nnjax.kernels.native import ffi_target
        >>> ffi_target("small_matmul", "NnjaxSmallMatmul") in (None, "nnjax_small_matmul")
        True
    """
    if not enabled():
        return None
    try:
        library = ctypes.cdll.LoadLibrary(str(build(name)))
    except (OSError, BuildError) as e:
        warnings.warn(
            f"nnjax: the native kernel {name!r} is unavailable, XLA's operations are used "
            f"instead (slower): {e}",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    target = f"nnjax_{name}"  # ctypes never unloads a library: the handler stays valid
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    return target
