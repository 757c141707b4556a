"""`python -m services.points`: run the points service until SIGTERM."""

from common.main import run

from .config import PointsConfig
from .server import build

if __name__ == "__main__":
    run("points", PointsConfig, build)
