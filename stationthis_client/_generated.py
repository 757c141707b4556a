"""Makes the generated code (``gen/``, written by ``make protos``) importable as ``stationthis.*``.

The services run with ``PYTHONPATH=.:gen``; a bot or a script importing this package from the
repository may not have ``gen`` on its path, so it is added here, once, when (and only when) the
generated modules cannot be found otherwise. Nothing else is imported around the generated code.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

GEN = Path(__file__).resolve().parent.parent / "gen"


def ensure_importable() -> None:
    try:
        found = importlib.util.find_spec("stationthis.comfyui.v1.comfyui_service_pb2") is not None
    except ModuleNotFoundError:
        found = False
    if not found and GEN.is_dir() and str(GEN) not in sys.path:
        sys.path.append(str(GEN))


ensure_importable()
