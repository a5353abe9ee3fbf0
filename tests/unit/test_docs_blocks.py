"""The marks of the runnable documents (tests/docs_blocks.py, tests/e2e/test_docs_runnable.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.docs_blocks import DocBlockError, check_marked, load, parse

DOCS = Path(__file__).resolve().parents[2] / "docs"
RUNNABLE_DOCS = ("platform.md", "submitter.md", "bridge-vm.md", "hpc-site.md")


@pytest.mark.parametrize("name", RUNNABLE_DOCS)
def test_every_shell_block_of_the_runnable_docs_is_run_or_skipped_with_a_reason(name: str) -> None:
    blocks = load(DOCS / name)
    shell = [b for b in blocks if b.is_shell]
    assert shell, name
    for block in shell:
        assert block.verb in ("run", "skip"), block.where
        if block.verb == "skip":
            assert block.reason, block.where
    assert any(b.verb == "run" for b in blocks), f"{name}: nothing runs"


def test_a_list_item_block_loses_its_indentation_and_keeps_its_mark() -> None:
    text = (
        "1. step\n\n"
        "   <!-- run: host=laptop retry=30 -->\n"
        "   ```bash\n"
        "   echo one\n"
        "     echo two\n"
        "   ```\n"
        "<!-- skip: needs kubernetes -->\n"
        "```sh\nkubectl get pods\n```\n"
        "<!-- file: host=laptop path=~/c.yaml mode=600 -->\n"
        "```yaml\na: 1\n```\n"
        "```\na diagram\n```\n"
    )
    run, skip, file, diagram = parse(text, "x.md")
    assert (run.line, run.verb, run.host, run.options["retry"]) == (4, "run", "laptop", "30")
    assert run.text == "echo one\n  echo two\n"
    assert (skip.verb, skip.reason, skip.is_shell) == ("skip", "needs kubernetes", True)
    assert (file.verb, file.options["path"], file.is_shell) == ("file", "~/c.yaml", False)
    assert (diagram.verb, diagram.language, diagram.is_shell) == (None, "", False)
    check_marked([run, skip, file, diagram])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("```bash\nls\n```\n", "without <!-- run"),
        ("<!-- skip: -->\n```bash\nls\n```\n", "needs a reason"),
        ("<!-- run: host=moon -->\n```bash\nls\n```\n", "host= must be"),
        ("<!-- run: host=laptop sudo -->\n```bash\nls\n```\n", "unknown option"),
        ("<!-- file: host=laptop -->\n```yaml\na: 1\n```\n", "needs path="),
        ("<!-- run: host=laptop -->\n```bash\nls\n", "never closed"),
        ("<!-- file: host=laptop path=x -->\n```bash\nls\n```\n", "marked file"),
    ],
)
def test_wrong_marks_are_refused_naming_the_line(text: str, message: str) -> None:
    with pytest.raises(DocBlockError, match=message) as info:
        check_marked(parse(text, "x.md"))
    assert "x.md:" in str(info.value)
