"""The pure rules of job files (#13 item 8): which `outputs` patterns and files-query paths are
accepted, how a pattern segment matches a name, and how an output's path becomes an artifact name
that any object store takes and that gives the name back."""

from __future__ import annotations

import re
from urllib.parse import unquote

import pytest
from pydantic import ValidationError

from cloudhpc.domain.job_files import (
    check_browse_path,
    check_output_pattern,
    name_matches,
    output_artifact_name,
)
from cloudhpc.domain.jobs import JobSpec
from cloudhpc.storage.base import check_key


@pytest.mark.parametrize(
    "pattern", ["*.txt", "results/*.csv", "**/*.pt", "-rf", "a..b", "with space/[ab]?.log", "ünï/✓*"]
)
def test_patterns_accepted(pattern: str) -> None:
    assert check_output_pattern(pattern) == pattern


@pytest.mark.parametrize(
    ("pattern", "words"),
    [
        ("", "empty"),
        ("/etc/*", "absolute"),
        ("../x", "'..'"),
        ("a/../b", "'..'"),
        ("a//b", "empty"),
        ("./a", "'.'"),
        (".cloudhpc/env", ".cloudhpc/"),
        ("a**b/c", "whole segment"),
        ("a/**", "file name pattern"),
        ("new\nline", "control character"),
        ("a\\b", "backslash"),
        ("x" * 1025, "longer than 1024"),
    ],
)
def test_patterns_refused(pattern: str, words: str) -> None:
    with pytest.raises(ValueError, match=re.escape(words)):
        check_output_pattern(pattern)


def test_outputs_are_bounded_and_named_in_the_spec() -> None:
    base = {"name": "j", "cluster": "c", "script": "x"}
    assert JobSpec.model_validate(base | {"outputs": ["*.csv"] * 64}).outputs == ["*.csv"] * 64
    with pytest.raises(ValidationError) as too_many:
        JobSpec.model_validate(base | {"outputs": ["*.csv"] * 65})
    assert too_many.value.errors()[0]["loc"] == ("outputs",)
    with pytest.raises(ValidationError) as bad:
        JobSpec.model_validate(base | {"outputs": ["ok", "../x"]})
    assert bad.value.errors()[0]["loc"] == ("outputs", 1)


def test_browse_paths_take_any_file_name_but_stay_inside() -> None:
    assert check_browse_path("") == ""
    assert check_browse_path("results/") == "results"
    assert check_browse_path("new\nline.txt") == "new\nline.txt"  # a file name may hold a newline
    assert check_browse_path("-rf") == "-rf"
    for bad in ("/", "/etc", "..", "a/..", "a//b", "a\x00b", ".cloudhpc", ".cloudhpc/env"):
        with pytest.raises(ValueError, match="path"):
            check_browse_path(bad)


def test_segments_match_as_a_shell_glob() -> None:
    assert name_matches("*.txt", "a b.txt")
    assert not name_matches("*.txt", ".hidden.txt")  # a leading dot only when the pattern spells it
    assert name_matches(".*.txt", ".hidden.txt")
    assert name_matches("r?.csv", "r1.csv")
    assert name_matches("[ab].log", "b.log")
    assert not name_matches("*.TXT", "a.txt")  # case matters, as on the cluster's file system


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("with space.txt", "outputs/with space.txt"),
        ("new\nline.txt", "outputs/new%0Aline.txt"),
        ("100%.txt", "outputs/100%25.txt"),
        ("back\\slash", "outputs/back%5Cslash"),
        ("tab\there/ünï ✓", "outputs/tab%09here/ünï ✓"),
        ("-rf", "outputs/-rf"),
        ("a..b/c", "outputs/a..b/c"),
    ],
)
def test_artifact_names_round_trip(path: str, name: str) -> None:
    assert output_artifact_name(path) == name
    assert check_key(f"jobs/alice/x/{name}")
    assert unquote(name.removeprefix("outputs/")) == path
