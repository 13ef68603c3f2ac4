"""envmgr: locked, reproducible, GPU-ready environments for ML training methods."""

__version__ = "0.1.0"
