"""What every result file records about where it was measured: machine and versions."""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version

import jax


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what platform reports."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """CPU model and core count, OS, and the JAX backend and devices."""
    devices = jax.devices()
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "jax_backend": jax.default_backend(),
        "jax_device_kind": devices[0].device_kind,
        "jax_device_count": len(devices),
    }


def versions() -> dict:
    """Versions of Python and of the packages the results depend on."""

    def installed(name):
        try:
            return version(name)
        except PackageNotFoundError:  # pragma: no cover
            return None

    packages = ["jax", "jaxlib", "flax", "optax", "numpy", "adambs_jax"]
    return {"python": platform.python_version(), **{name: installed(name) for name in packages}}
