"""Prometheus metrics and Grafana dashboards as code.

- `catalog`: every metric's name, type, labels and help text (one table, checked by tests);
- `porter`: porter's `/metrics`, computed from the job store at scrape time;
- `agent`: the submitter's `/metrics` (SLURM commands over SSH, reconnects);
- `dashboards`: the Grafana dashboards, built with grafana-foundation-sdk; their JSON and Grafana
  provisioning files are generated into `deploy/kustomize/monitoring/grafana/` (`python -m cloudhpc.metrics.dashboards`).
"""

from __future__ import annotations
