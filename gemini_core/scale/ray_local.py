"""Ray start-up, shared by data curation (Ray Data) and sweeps (Ray Tune): a cluster when
RAY_ADDRESS names one, else a local Ray of this process with no dashboard."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Callable


def init_ray(log: Callable[[str], None], num_cpus: int | None = None) -> None:
    """Starts (or connects to) Ray once per process; a no-op when Ray is already up."""
    import ray
    if ray.is_initialized():
        return
    logging.getLogger("ray").setLevel(logging.ERROR)  # Ray Data logs every dataset it runs
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's boxes would break up our live lines
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log(f"ray: connecting to {address}")
        ray.init(address=address, log_to_driver=False, configure_logging=False)
        return
    # a short temp path: Ray's unix sockets live under it and have a ~100-character limit;
    # GX_RAY_TEMP_DIR gives a command a local cluster of its own
    temp = Path(os.environ.get("GX_RAY_TEMP_DIR") or
                Path(tempfile.gettempdir()) / f"gx-ray-{os.getuid()}")
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False, _temp_dir=str(temp))
