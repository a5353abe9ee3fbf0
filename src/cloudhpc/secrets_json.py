"""The original submitter's `secrets.json`, accepted as is and turned into a cluster named `mahti`.

Keys: CSC_USER, MAHTI_NODE_ADDRESS, MAHTI_PRIVATE_KEY_PATH, MAHTI_PRIVATE_KEY_PASSPHRASE and
BRIDGE_PRIVATE_KEY_PATH (the bridge key jobs use to reach the bridge VM: it becomes
`porter.bridge.key_file` when the configuration has a `porter.bridge` section).
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import SecretStr

from cloudhpc.config import ClusterConfig, Settings, SSHConfig
from cloudhpc.exceptions import ConfigError

__all__ = ["apply_secrets_json"]

REQUIRED = ("CSC_USER", "MAHTI_NODE_ADDRESS", "MAHTI_PRIVATE_KEY_PATH")


def apply_secrets_json(settings: Settings, path: Path, *, cluster: str = "mahti") -> Settings:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"--secrets: {path} does not exist") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--secrets: {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"--secrets: {path} must hold a JSON object")
    missing = [k for k in REQUIRED if not data.get(k)]
    if missing:
        raise ConfigError(f"--secrets: {path} lacks {', '.join(missing)}")
    passphrase = data.get("MAHTI_PRIVATE_KEY_PASSPHRASE") or None
    existing = settings.clusters.get(cluster)
    ssh = SSHConfig(
        host=str(data["MAHTI_NODE_ADDRESS"]),
        user=str(data["CSC_USER"]),
        key_file=Path(str(data["MAHTI_PRIVATE_KEY_PATH"])).expanduser(),
        passphrase=SecretStr(str(passphrase)) if passphrase else None,
        known_hosts=existing.ssh.known_hosts if existing and existing.ssh else None,
    )
    base = existing.model_dump(exclude={"ssh"}) if existing else {"backend": "slurm"}
    clusters = dict(settings.clusters)
    clusters[cluster] = ClusterConfig.model_validate({**base, "backend": "slurm", "ssh": ssh})
    update: dict[str, object] = {"clusters": clusters}
    bridge_key = data.get("BRIDGE_PRIVATE_KEY_PATH")
    if bridge_key and settings.porter.bridge is not None:
        # the bridge VM itself (host, user, known_hosts) comes from porter.bridge in the configuration
        bridge = settings.porter.bridge.model_copy(update={"key_file": Path(str(bridge_key)).expanduser()})
        update["porter"] = settings.porter.model_copy(update={"bridge": bridge})
    return settings.model_copy(update=update)
