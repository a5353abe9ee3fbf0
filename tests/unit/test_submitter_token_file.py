"""submitter.token_file as docs/submitter.md writes it: `~/.config/cloudhpc/agent-token`."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloudhpc.config import Settings
from cloudhpc.exceptions import ConfigError
from cloudhpc.runtime.submitter import _agent_token


def test_a_token_file_under_home_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    token = tmp_path / ".config" / "cloudhpc" / "agent-token"
    token.parent.mkdir(parents=True)
    token.write_text("chpc_agent_secret\n")
    settings = Settings.model_validate({"submitter": {"token_file": "~/.config/cloudhpc/agent-token"}})
    assert _agent_token(settings) == "chpc_agent_secret"


def test_a_missing_token_file_names_the_key_and_the_expanded_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    settings = Settings.model_validate({"submitter": {"token_file": "~/agent-token"}})
    with pytest.raises(ConfigError, match=r"submitter\.token_file: .*/agent-token does not exist") as info:
        _agent_token(settings)
    assert str(tmp_path) in str(info.value)
