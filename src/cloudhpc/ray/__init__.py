"""Ray on SLURM: the batch script of a Ray cluster (`ray-cluster`) or a Ray job (`ray-job`)."""

from __future__ import annotations

from cloudhpc.ray.script import RayJobScript, TunnelAccess, ray_node_count, render_ray_job

__all__ = ["RayJobScript", "TunnelAccess", "ray_node_count", "render_ray_job"]
