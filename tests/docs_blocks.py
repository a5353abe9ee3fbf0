"""The runnable blocks of a markdown document (tests/e2e/test_docs_runnable.py).

A fenced block is marked by an HTML comment (hidden by markdown renderers) on the line right above its
opening fence:

    <!-- run: host=laptop -->                  run it on that host of the topology (laptop, cloud,
                                               login, c1, c2, or operator: the root namespace)
    <!-- run: host=cloud as=porter -->          run it in porter's container on cloud (kubectl exec)
    <!-- run: host=laptop background -->       start it and leave it running (stopped by the test)
    <!-- run: host=laptop retry=30 -->         run it again until it succeeds, for at most 30 s
    <!-- skip: needs kubernetes (why) -->       do not run it, for that reason (printed by the test)
    <!-- file: host=laptop path=~/x.yaml -->   write the block's text to that file (a config file)

Every shell block (info string bash, sh, shell or console) must carry `run` or `skip`: an unmarked
one is an error, so no step of a document is silently left out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

SHELL_LANGUAGES = frozenset({"bash", "sh", "shell", "console"})
HOSTS = frozenset({"laptop", "cloud", "login", "c1", "c2", "operator"})

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)(?P<info>[^`]*)$")
_DIRECTIVE = re.compile(r"^\s*<!--\s*(?P<verb>run|skip|file):(?P<body>.*?)-->\s*$")


class DocBlockError(ValueError):
    """A document's marks are wrong: unmarked shell block, unknown option, unterminated fence."""


@dataclass(frozen=True)
class Block:
    doc: str
    line: int
    """1-based line of the opening fence."""
    language: str
    text: str
    """The block's content, its list indentation removed."""
    verb: str | None = None
    """run, skip, file, or None when unmarked."""
    options: dict[str, str] = field(default_factory=dict)
    reason: str = ""
    """Why a `skip` block is not run."""

    @property
    def is_shell(self) -> bool:
        return self.language in SHELL_LANGUAGES

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def host(self) -> str:
        return self.options.get("host", "")


def _options(body: str, where: str) -> dict[str, str]:
    options: dict[str, str] = {}
    for word in body.split():
        key, sep, value = word.partition("=")
        options[key] = value if sep else "true"
    known = {"host", "as", "background", "retry", "path", "mode", "timeout"}
    unknown = set(options) - known
    if unknown:
        raise DocBlockError(f"{where}: unknown option(s) {sorted(unknown)} (known: {sorted(known)})")
    return options


def parse(text: str, doc: str) -> list[Block]:
    """Every fenced block of `text`, with its mark."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, info = match.group("indent"), match.group("fence"), match.group("info").strip()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not (
            lines[i].strip().startswith(fence) and lines[i].strip().strip(fence[0]) == ""
        ):
            line = lines[i]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            i += 1
        if i == len(lines):
            raise DocBlockError(f"{doc}:{start + 1}: the fence {fence} is never closed")
        i += 1
        language = info.split()[0] if info else ""
        prev = start - 1
        verb: str | None = None
        options: dict[str, str] = {}
        reason = ""
        if prev >= 0 and (directive := _DIRECTIVE.match(lines[prev])):
            verb = directive.group("verb")
            where = f"{doc}:{prev + 1}"
            if verb == "skip":
                reason = directive.group("body").strip()
                if not reason:
                    raise DocBlockError(f"{where}: a skip needs a reason")
            else:
                options = _options(directive.group("body"), where)
                if options.get("host") not in HOSTS:
                    raise DocBlockError(f"{where}: host= must be one of {sorted(HOSTS)}")
                if verb == "file" and "path" not in options:
                    raise DocBlockError(f"{where}: a file block needs path=")
                if verb == "run" and "path" in options:
                    raise DocBlockError(f"{where}: path= is for file blocks")
        text_ = "\n".join(body) + "\n"
        blocks.append(Block(doc, start + 1, language, text_, verb, options, reason))
    return blocks


def check_marked(blocks: list[Block]) -> None:
    """Every shell block is marked run or skip; `file` marks only non-shell blocks."""
    problems = []
    for block in blocks:
        if block.is_shell and block.verb not in ("run", "skip"):
            problems.append(
                f"{block.where}: a {block.language} block without <!-- run: ... --> or <!-- skip: reason -->"
            )
        if block.verb == "file" and block.is_shell:
            problems.append(f"{block.where}: a shell block marked file (run it instead)")
    if problems:
        raise DocBlockError("\n".join(problems))


def load(path: Path) -> list[Block]:
    blocks = parse(path.read_text(), path.name)
    check_marked(blocks)
    return blocks
