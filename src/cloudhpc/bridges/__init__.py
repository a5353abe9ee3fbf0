"""Bridges between a running job and the cloud: the job's tunnel, porter's probes and publishers."""
