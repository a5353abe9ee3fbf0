"""Process startup: the only package that knows every part and wires the roles together.

`serve porter`, `serve submitter` and `serve all` start here. porter (`cloudhpc.porter`) and the
agent (`cloudhpc.submitter`) never import each other; this package builds them from settings,
gives them their store, object stores, channels and SSH backends, serves them with one uvicorn
helper (`servers`) and stops them together on SIGINT/SIGTERM.

- `servers`: binding a listen address and serving an ASGI app next to other work;
- `backends`: a cluster's configuration to its SLURM or local backend;
- `agents`: the agents of every configured cluster and their `/healthz` + `/metrics`;
- `tokens`: the tokens `serve all` makes for itself;
- `porter`, `submitter`, `all_in_one`: the three `serve` roles.
"""

from __future__ import annotations

from cloudhpc.runtime.agents import open_agents
from cloudhpc.runtime.all_in_one import serve_all
from cloudhpc.runtime.porter import serve_porter
from cloudhpc.runtime.submitter import serve_submitter
from cloudhpc.runtime.tokens import ensure_tokens

__all__ = ["ensure_tokens", "open_agents", "serve_all", "serve_porter", "serve_submitter"]
