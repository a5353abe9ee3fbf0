#!/usr/bin/env bash
# Regenerates deploy/docker/cloudhpc-requirements.txt, the hash-pinned dependencies of the porter and
# submitter image (cloudhpc.Dockerfile: `pip install --require-hashes`), from pyproject.toml: the
# light install, the server, postgres and kubernetes extras, and the build backend (setuptools,
# wheel), so that the image installs the project itself with --no-build-isolation and fetches
# nothing unpinned. Resolved for CPython 3.11 on Linux x86_64, the image's platform; run it on such
# a machine, with pip-tools installed (`pip install pip-tools`), after any change to those
# dependencies (tests/unit/test_docker_lock.py fails until then). Only PyPI is asked: local pip
# configuration (find-links, extra indexes) is ignored so that every hash is PyPI's.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=deploy/docker/cloudhpc-requirements.txt
CUSTOM_COMPILE_COMMAND=deploy/docker/lock-requirements.sh \
    PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS="" PIP_EXTRA_INDEX_URL="" pip-compile --quiet \
    --generate-hashes --allow-unsafe --strip-extras --all-build-deps \
    --extra server --extra postgres --extra kubernetes \
    --index-url https://pypi.org/simple --no-emit-index-url \
    --output-file "$out" pyproject.toml
# The postgres and kubernetes extras name cloudhpc[server] itself: pip-compile lists the checkout as
# an unhashable `cloudhpc @ file://...` entry. The image installs the project from its sources, so
# that entry (and the warning about it) goes.
python3 - "$out" <<'PY'
import re
import sys
from pathlib import Path

path = Path(sys.argv[1])
text = path.read_text()
text = re.sub(r"# WARNING: pip install will require.*\n# Consider using a hashable URL.*\n", "", text)
text = re.sub(r"cloudhpc @ file://\S+\n(    # via .*\n)*", "", text)
path.write_text(text)
PY
echo "wrote $out"
