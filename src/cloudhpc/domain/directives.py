"""The `#SBATCH` directives of a user's batch script, read with SLURM's own rules, and merged into
the job's spec.

cloudhpc never hands the user's script to sbatch (sbatch gets the wrapper, and the options on its
command line), so the directives a researcher wrote for the login node would be lost; they are
read here instead, once, when porter accepts the job, and the merged spec is what is stored and
shown. The rules are sbatch's (SLURM 22.05, checked on the testbed):

- a directive is a line that starts with `#SBATCH` in its first column (`#SBATCH-t 5` too);
  an indented `#SBATCH` line is a comment;
- directives are read until the first line that is neither blank nor a comment (its first
  non-blank character `#`); later `#SBATCH` lines are plain comments;
- a line holds one or more options, split at blanks; `'` and `"` quote (a `#` inside quotes is
  text), an unquoted `#` starts a comment; an unmatched quote is an error;
- options are given as `--long=value`, `--long value`, `-x value` or `-xvalue`; for an option
  given twice the last one wins.

Only the options that are a `Resources` field (or `--array`, the spec's `array`) are taken;
`--dependency` names SLURM ids and is refused: the spec's `after` names cloudhpc jobs. The ones cloudhpc sets itself (output,
working directory...) and any other one are refused with the line named, never passed on blindly:
a directive that had no effect would be a job that silently runs differently from what its author
wrote. Abbreviated long options (`--part`), which sbatch accepts when unambiguous, are refused too:
which ones are unambiguous depends on the SLURM version.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from cloudhpc.domain.arrays import check_array
from cloudhpc.domain.jobs import JobSpec, Resources

__all__ = ["CHECKPOINT_HINT", "Directive", "apply_directives", "parse_directives"]

MAGIC = "#SBATCH"
MAX_DIRECTIVES = 256


@dataclass(frozen=True)
class _Option:
    field: str
    short: str | None = None
    flag: bool = False
    """Takes no value (`--exclusive`)."""


_OPTIONS: dict[str, _Option] = {
    "nodes": _Option("nodes", "N"),
    "ntasks": _Option("ntasks", "n"),
    "ntasks-per-node": _Option("ntasks_per_node"),
    "cpus-per-task": _Option("cpus_per_task", "c"),
    "gpus-per-node": _Option("gpus_per_node"),
    "gpus": _Option("gpus", "G"),
    "gres": _Option("gres"),
    "mem": _Option("mem"),
    "mem-per-cpu": _Option("mem_per_cpu"),
    "time": _Option("time", "t"),
    "partition": _Option("partition", "p"),
    "account": _Option("account", "A"),
    "qos": _Option("qos", "q"),
    "constraint": _Option("constraint", "C"),
    "exclusive": _Option("exclusive", flag=True),
    "reservation": _Option("reservation"),
    "mail-type": _Option("mail_type"),
    "mail-user": _Option("mail_user"),
    "begin": _Option("begin", "b"),
    "signal": _Option("signal"),
    "licenses": _Option("licenses", "L"),
    "array": _Option("array", "a"),
}
_SPEC_FIELDS = frozenset({"array"})
"""Options that are a field of the spec itself rather than of its `resources`."""
_SHORT = {opt.short: long for long, opt in _OPTIONS.items() if opt.short}

_OWNED: dict[str, str] = {
    "comment": "cloudhpc marks its jobs with the comment",
    "output": "cloudhpc collects the job's output itself (GET /jobs/{id}/logs)",
    "error": "cloudhpc collects the job's output itself (GET /jobs/{id}/logs)",
    "input": "cloudhpc starts the job without standard input",
    "parsable": "cloudhpc reads sbatch's answer itself",
    "chdir": "the job runs in its own job directory",
    "wrap": "the job's script is the script",
    "job-name": "cloudhpc names the SLURM job; the spec's `name` is the job's name",
    "dependency": "from the spec's `after`, which names cloudhpc jobs of yours, "
    "so that a job waited for may not have reached SLURM yet",
}
_OWNED_SHORT = {"o": "output", "e": "error", "i": "input", "D": "chdir", "J": "job-name", "d": "dependency"}

CHECKPOINT_HINT = (
    "for a job warned before its time limit and run again, give the spec "
    "`checkpoint: {warn_before: 2m, signal: USR1, max_restarts: 3}`: cloudhpc then adds --signal, "
    "--requeue and --open-mode=append itself and exports CLOUDHPC_CHECKPOINT_DIR"
)
"""Why a script's requeue options are refused, and what to write instead: SLURM's options alone
would requeue a job cloudhpc does not follow as one, into a directory it does not keep."""
_REQUEUE_OPTIONS: dict[str, str] = {
    "requeue": "cloudhpc requeues a job itself, from its `checkpoint`",
    "no-requeue": "cloudhpc requeues a job only when its `checkpoint` asks for it",
    "open-mode": "cloudhpc always appends every run to the one output log",
}


_SPEC_CHECKS: dict[str, Callable[[Any], object]] = {"array": check_array}


@dataclass(frozen=True)
class Directive:
    """One option of an `#SBATCH` line: `field` of `Resources` and its value as written."""

    line: int
    """1-based line number in the script."""
    field: str
    value: str | bool


def _where(lineno: int, text: str) -> str:
    shown = text if len(text) <= 120 else text[:117] + "..."
    return f"line {lineno} ({shown!r})"


def _split(rest: str, lineno: int, text: str) -> list[str]:
    """The words of a directive line after `#SBATCH`, as sbatch splits them."""
    words: list[str] = []
    word: list[str] = []
    in_word = False
    quote = ""
    for char in rest:
        if quote:
            if char == quote:
                quote = ""
            else:
                word.append(char)
        elif char in "'\"":
            quote, in_word = char, True
        elif char.isspace():
            if in_word:
                words.append("".join(word))
                word, in_word = [], False
        elif char == "#":
            break
        else:
            word.append(char)
            in_word = True
    if quote:
        raise ValueError(f"{_where(lineno, text)}: unmatched {quote}")
    if in_word:
        words.append("".join(word))
    return words


def _is_command(line: str) -> bool:
    stripped = line.strip()
    return bool(stripped) and not stripped.startswith("#")


def _directive_lines(script: str) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    for lineno, line in enumerate(script.split("\n"), start=1):
        if _is_command(line):
            break
        if line.startswith(MAGIC):
            out.append((lineno, line))
    return out


def _owned(name: str, lineno: int, text: str) -> ValueError:
    return ValueError(
        f"{_where(lineno, text)}: --{name} is set by cloudhpc ({_OWNED[name]}); remove this line"
    )


def _options(words: list[str], lineno: int, text: str) -> list[tuple[str, str | None]]:
    """(long option name, value or None) for each option of one line."""
    out: list[tuple[str, str | None]] = []
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if word.startswith("--"):
            name, eq, value = word[2:].partition("=")
            if name in _OWNED:
                raise _owned(name, lineno, text)
            if name in _REQUEUE_OPTIONS:
                raise ValueError(
                    f"{_where(lineno, text)}: --{name} is not taken ({_REQUEUE_OPTIONS[name]}); "
                    f"{CHECKPOINT_HINT}"
                )
            option = _OPTIONS.get(name)
            if option is None:
                raise ValueError(
                    f"{_where(lineno, text)}: {'--' + name!r} is not an option cloudhpc takes "
                    f"(write options in full; taken: {', '.join('--' + o for o in sorted(_OPTIONS))})"
                )
            if option.flag:
                if eq:
                    raise ValueError(f"{_where(lineno, text)}: --{name} takes no value here")
                out.append((name, None))
                continue
            if not eq:
                if i >= len(words):
                    raise ValueError(f"{_where(lineno, text)}: --{name} needs a value")
                value = words[i]
                i += 1
            out.append((name, value))
        elif word.startswith("-") and len(word) > 1:
            letter, value = word[1], word[2:]
            if letter in _OWNED_SHORT:
                raise _owned(_OWNED_SHORT[letter], lineno, text)
            name = _SHORT.get(letter, "")
            if not name:
                raise ValueError(f"{_where(lineno, text)}: -{letter} is not an option cloudhpc takes")
            if not value:
                if i >= len(words):
                    raise ValueError(f"{_where(lineno, text)}: -{letter} needs a value")
                value = words[i]
                i += 1
            out.append((name, value))
        else:
            raise ValueError(f"{_where(lineno, text)}: {word!r} is not an option")
    return out


def parse_directives(script: str) -> list[Directive]:
    """The directives of `script` in order; ValueError naming the line for one cloudhpc refuses (an
    option it sets itself, an unknown option, a value `Resources` does not accept)."""
    directives: list[Directive] = []
    for lineno, text in _directive_lines(script):
        if "\r" in text or "\\" in text:
            raise ValueError(
                f"{_where(lineno, text)}: a carriage return or backslash (sbatch refuses DOS line "
                "breaks, and reads no escapes)"
            )
        for name, raw in _options(_split(text[len(MAGIC) :], lineno, text), lineno, text):
            option = _OPTIONS[name]
            value: str | bool = True if option.flag else (raw or "")
            try:
                if option.field in _SPEC_FIELDS:
                    _SPEC_CHECKS[option.field](value)
                else:
                    Resources.model_validate({option.field: value})
            except ValidationError as exc:
                reason = "; ".join(e["msg"] for e in exc.errors())
                raise ValueError(f"{_where(lineno, text)}: --{name}: {reason}") from None
            except ValueError as exc:  # a spec field's own check
                raise ValueError(f"{_where(lineno, text)}: --{name}: {exc}") from None
            directives.append(Directive(line=lineno, field=option.field, value=value))
            if len(directives) > MAX_DIRECTIVES:
                raise ValueError(f"more than {MAX_DIRECTIVES} #SBATCH options")
    return directives


def apply_directives(spec: JobSpec) -> JobSpec:
    """`spec` with the directives of its batch script merged into `resources`: a field the spec
    sets explicitly wins over the script's directive (as sbatch's command line wins over `#SBATCH`),
    the last directive of a field wins over earlier ones. ValueError naming the line (or, when the
    merged resources do not go together, the fields) otherwise."""
    if not spec.script:
        return spec
    directives = parse_directives(spec.script)
    if spec.checkpoint is not None:
        for d in directives:
            if d.field == "signal":
                text = spec.script.split("\n")[d.line - 1]
                raise ValueError(
                    f"{_where(d.line, text)}: --signal: the spec's `checkpoint` sends the warning "
                    f"signal (checkpoint.signal, checkpoint.warn_before); remove this line"
                )
    found: dict[str, Any] = {d.field: d.value for d in directives}
    if not found:
        return spec
    own = {k: found.pop(k) for k in _SPEC_FIELDS & found.keys()}
    update: dict[str, Any] = {k: v for k, v in own.items() if getattr(spec, k) is None}
    if found:
        explicit = spec.resources.model_dump(exclude_none=True)
        try:
            update["resources"] = Resources.model_validate(found | explicit)
        except ValidationError as exc:
            raise ValueError(
                f"the script's #SBATCH directives with the spec's resources: {_reasons(exc)}"
            ) from None
    return _revalidated(spec.model_copy(update=update))


def _reasons(exc: ValidationError) -> str:
    return "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())


def _revalidated(merged: JobSpec) -> JobSpec:
    """`merged` through the spec's own rules again (`model_copy` skips them): a directive can break
    a rule across fields, such as `#SBATCH --array` in the script of a job with `checkpoint`."""
    try:
        return JobSpec.model_validate(merged.model_dump(by_alias=True))
    except ValidationError as exc:
        raise ValueError(f"the script's #SBATCH directives with the spec: {_reasons(exc)}") from None
