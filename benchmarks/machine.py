"""What the numbers were measured on: CPU, cores, library versions, date, load.

Also a meter of how many cores *other* processes used while a block was timed
(``/proc/stat`` busy time minus this process's own CPU time), since this suite
is often run on machines shared with other jobs.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import time

__all__ = ["describe", "LoadMeter", "wait_idle"]

_PACKAGES = ("jax", "jaxlib", "optax", "flax", "equinox", "dm-haiku", "torch", "numpy")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _matrix_units() -> str:
    """The CPU's fastest bfloat16 product instructions (what the bf16 rows run on):
    ``"AMX"``, ``"AVX-512 BF16"``, ``"AVX-512"``, ``"AVX2"`` or ``""`` (unknown)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return ""
    for flag, name in (
        ("amx_bf16", "AMX"),
        ("avx512_bf16", "AVX-512 BF16"),
        ("avx512f", "AVX-512"),
        ("avx2", "AVX2"),
    ):
        if flag in flags:
            return name
    return ""


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe() -> dict:
    """A JSON-able description of this machine and the software versions."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "matrix_units": _matrix_units(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {p: v for p in _PACKAGES if (v := _version(p)) is not None},
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        import jax

        info["jax_devices"] = [str(d) for d in jax.devices()]
    except Exception as err:  # jax missing or broken: still describe the machine
        info["jax_devices"] = [f"unavailable: {err}"]
    return info


def _busy_seconds() -> float | None:
    """Seconds of CPU time all processes have used since boot (None off Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user, nice, system, irq, softirq: time this VM's processes ran (not idle, iowait, steal)
    busy = sum(fields[i] for i in (0, 1, 2, 5, 6) if i < len(fields))
    return busy / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


class LoadMeter:
    """Cores used by other processes between ``start()`` and ``stop()`` (None where unknown).

    Resolution is one clock tick (10 ms) of CPU time, so short blocks read noisily;
    ``total()`` is the average over every start/stop window so far.
    """

    def __init__(self) -> None:
        self._t = self._busy = self._own = None
        self._foreign_s = self._own_s = self._wall_s = 0.0

    def start(self) -> None:
        self._t, self._busy, self._own = time.perf_counter(), _busy_seconds(), _own_seconds()

    def stop(self) -> float | None:
        busy = _busy_seconds()
        if busy is None or self._busy is None:
            return None
        wall = time.perf_counter() - self._t
        own = _own_seconds() - self._own
        foreign = max((busy - self._busy) - own, 0.0)
        self._foreign_s += foreign
        self._own_s += own
        self._wall_s += wall
        return foreign / wall if wall > 0 else None

    def total(self) -> float | None:
        """Mean cores other processes used over all windows measured so far."""
        return self._foreign_s / self._wall_s if self._wall_s > 0 else None

    def own(self) -> float | None:
        """Mean cores this process used over all windows measured so far."""
        return self._own_s / self._wall_s if self._wall_s > 0 else None


def wait_idle(max_wait_s: float, threshold: float = 0.15, sample_s: float = 0.25) -> float | None:
    """Sleep until other processes use fewer than ``threshold`` cores, at most ``max_wait_s``.

    Returns the last load seen (None where it cannot be measured).
    """
    deadline = time.perf_counter() + max_wait_s
    meter = LoadMeter()
    while True:
        meter.start()
        time.sleep(sample_s)
        load = meter.stop()
        if load is None or load < threshold or time.perf_counter() >= deadline:
            return load
