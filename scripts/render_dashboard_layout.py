"""Draw each generated Grafana dashboard's panel layout (from `gridPos`) as a PNG for the docs.

Grafana cannot run here, so the picture in docs/monitoring.md is the layout Grafana would use:
one box per panel, with its title, type and first query. Needs matplotlib (`pip install
'.[docs]'`). Run from the project root: `python scripts/render_dashboard_layout.py`.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
matplotlib.rcParams["text.parse_math"] = False  # PromQL is full of `$`
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the backend)
from matplotlib.patches import FancyBboxPatch  # noqa: E402

from cloudhpc.metrics.dashboards import OUT_DIR  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
COLOURS = {
    "row": "#d9d9d9",
    "stat": "#cfe8ff",
    "gauge": "#d7f5d1",
    "timeseries": "#ffe7c2",
    "histogram": "#f3d6ff",
    "bargauge": "#ffd6d6",
    "table": "#eeeeee",
}


def draw(board: dict[str, object], out: Path) -> None:
    panels = board["panels"]
    assert isinstance(panels, list)
    height = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    fig, ax = plt.subplots(figsize=(14, 14 * height / 24 * 0.42))
    ax.set_xlim(0, 24)
    ax.set_ylim(height, 0)
    ax.axis("off")
    for panel in panels:
        pos = panel["gridPos"]
        kind = panel["type"]
        box = FancyBboxPatch(
            (pos["x"] + 0.08, pos["y"] + 0.08),
            pos["w"] - 0.16,
            pos["h"] - 0.16,
            boxstyle="round,pad=0,rounding_size=0.15",
            facecolor=COLOURS.get(kind, "#ffffff"),
            edgecolor="#555555",
            linewidth=0.8,
        )
        ax.add_patch(box)
        if kind == "row":
            ax.text(pos["x"] + 0.3, pos["y"] + 0.55, panel["title"], fontsize=9, weight="bold", va="center")
            continue
        ax.text(pos["x"] + 0.3, pos["y"] + 0.5, panel["title"], fontsize=8, weight="bold", va="top")
        ax.text(
            pos["x"] + pos["w"] - 0.3,
            pos["y"] + 0.5,
            kind,
            fontsize=6.5,
            va="top",
            ha="right",
            color="#555555",
        )
        targets = panel.get("targets") or []
        if targets:
            expr = targets[0]["expr"]
            width = max(20, int(pos["w"] * 5.2))
            lines = textwrap.wrap(expr, width)[: max(1, pos["h"] - 2)]
            ax.text(
                pos["x"] + 0.3,
                pos["y"] + 1.4,
                "\n".join(lines),
                fontsize=5.5,
                family="monospace",
                va="top",
                color="#333333",
            )
    ax.set_title(f"{board['title']}  (uid {board['uid']})", fontsize=11, loc="left")
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> int:
    images = ROOT / "docs" / "images"
    images.mkdir(parents=True, exist_ok=True)
    for path in sorted((ROOT / OUT_DIR / "dashboards").glob("*.json")):
        out = images / f"dashboard-{path.stem}.png"
        draw(json.loads(path.read_text()), out)
        print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
