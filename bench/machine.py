"""What sets a benchmark's figures, printed by every bench: CPU model, usable cores, AVX-512 or
not, load, JAX and its devices. Imported by the bench scripts (bench/ is on their sys.path)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu() -> dict:
    info = {"cpu": platform.machine(), "cores": len(os.sched_getaffinity(0)), "avx512": False,
            "avx2": False}
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return info
    fields = {k.strip(): v.strip() for k, v in
              (line.split(":", 1) for line in lines if ":" in line)}  # every CPU lists the same
    flags = fields.get("flags", "").split()
    info.update(cpu=fields.get("model name", info["cpu"]), avx512="avx512f" in flags,
                avx2="avx2" in flags)
    return info


def describe() -> str:
    import jax
    c = cpu()
    simd = "AVX-512" if c["avx512"] else "no AVX-512" + (" (AVX2)" if c["avx2"] else "")
    return (f"{c['cpu']}, {c['cores']} cores usable, {simd}; load {os.getloadavg()[0]:.1f}; "
            f"jax {jax.__version__} on {jax.devices()[0].platform} x {jax.device_count()}")
