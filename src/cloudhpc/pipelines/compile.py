"""Compile the example pipelines into `deploy/pipelines/<name>.yaml` (or check they are current).

    python -m cloudhpc.pipelines.compile            # write the YAML files
    python -m cloudhpc.pipelines.compile --check    # exit 1 when a committed file is out of date

The YAML is what a Kubeflow user uploads (UI, `kfp.Client().upload_pipeline`); a test keeps it in
sync with the code, so the committed files never describe a pipeline the code no longer builds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

__all__ = ["compile_all", "main", "same_pipeline"]

DEFAULT_DIR = Path(__file__).resolve().parents[3] / "deploy" / "pipelines"


def same_pipeline(a: Path, b: Path) -> bool:
    """Equal as YAML documents. The text may differ: KFP's header comment prints dict defaults
    in an order that changes from one process to the next."""
    import yaml

    if not a.exists() or not b.exists():
        return False
    return list(yaml.safe_load_all(a.read_text())) == list(yaml.safe_load_all(b.read_text()))


def compile_all(directory: Path) -> dict[str, Path]:
    """Write every example pipeline as `<name>.yaml` in `directory` (a file whose content is
    unchanged is left alone); return the paths by name."""
    from kfp import compiler

    from cloudhpc.pipelines.fmnist.pipeline import PIPELINES

    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, pipeline in PIPELINES.items():
            fresh = Path(tmp) / f"{name}.yaml"
            compiler.Compiler().compile(pipeline, str(fresh))
            path = directory / fresh.name
            if not same_pipeline(fresh, path):
                path.write_text(fresh.read_text())
            out[name] = path
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="where the YAML files live")
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    if not args.check:
        for path in compile_all(args.dir).values():
            print(f"wrote {path}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        stale = [
            name
            for name, fresh in compile_all(Path(tmp)).items()
            if not same_pipeline(fresh, args.dir / fresh.name)
        ]
    for name in stale:
        print(
            f"{args.dir / name}.yaml is out of date: run `python -m cloudhpc.pipelines.compile`",
            file=sys.stderr,
        )
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
