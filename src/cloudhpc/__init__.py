"""cloudhpc: run SLURM batch jobs, Ray clusters and Ray jobs from a cloud MLOps platform."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
