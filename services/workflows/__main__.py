"""`python -m services.workflows`: run the workflows service until SIGTERM."""

from common.main import run

from .config import WorkflowsConfig
from .server import build

if __name__ == "__main__":
    run("workflows", WorkflowsConfig, build)
