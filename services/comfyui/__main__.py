"""`python -m services.comfyui`: run the ComfyUI runs service until SIGTERM."""

from common.main import run

from .config import ComfyUIConfig
from .server import build

if __name__ == "__main__":
    run("comfyui", ComfyUIConfig, build)
