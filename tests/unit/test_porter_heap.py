"""porter's start-up heap is out of the garbage collector's reach (bench/api.py's GET tail)."""

from __future__ import annotations

import gc
from pathlib import Path

from fastapi.testclient import TestClient

from cloudhpc.config import PorterConfig, Settings
from cloudhpc.porter.app import create_app


def test_porter_freezes_its_start_up_heap(tmp_path: Path) -> None:
    """Full collections rescanned every module, route and model alive after start-up (up to 180 ms
    each, 20 per bench run, stopping the loop and every thread); young ones ran every 700
    allocations. After porter starts, those objects are frozen and young collections are rarer."""
    settings = Settings(
        porter=PorterConfig(
            database=f"sqlite:///{tmp_path}/state.db", object_store=f"file://{tmp_path / 'objects'}"
        )
    )
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200
        assert gc.get_freeze_count() > 10_000
        assert gc.get_threshold()[0] >= 10_000
