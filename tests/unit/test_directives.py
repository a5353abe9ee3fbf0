"""#SBATCH directives read with sbatch's rules (#13 item 1), the typed SLURM options of `Resources`
(item 2) with a refusal naming the field for each bad value, their sbatch flags, and the cluster
limits. The rules asserted here were checked against sbatch 22.05 on the testbed (the docstring of
`cloudhpc.domain.directives`); `tests/integration/test_slurm_options.py` checks the result in SLURM."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from cloudhpc.config import ClusterConfig, ClusterDefaults
from cloudhpc.domain.directives import apply_directives, parse_directives
from cloudhpc.domain.jobs import ClusterLimits, JobSpec, Resources
from cloudhpc.exceptions import StagingError
from cloudhpc.hpc.slurm.submit import resource_flags
from cloudhpc.submitter.staging import Stager
from tests.conftest import HOSTILE_STRINGS
from tests.jobs import job_from


def fields(script: str) -> dict[str, Any]:
    return {d.field: d.value for d in parse_directives(script)}


def spec(script: str, **resources: Any) -> JobSpec:
    return JobSpec(name="train", cluster="testbed", script=script, resources=Resources(**resources))


def test_long_short_attached_and_spaced_forms() -> None:
    script = (
        "#!/bin/bash\n"
        "#SBATCH --nodes=2 --time 10\n"
        "#SBATCH -c 4\n"
        "#SBATCH -n8\n"
        "#SBATCH-p debug\n"  # sbatch takes it without a blank after the magic word
        "#SBATCH --exclusive --qos=normal\n"
        "#SBATCH -G a100:2 -L matlab:1 -C 'a100&ib'\n"
    )
    assert fields(script) == {
        "nodes": "2",
        "time": "10",
        "cpus_per_task": "4",
        "ntasks": "8",
        "partition": "debug",
        "exclusive": True,
        "qos": "normal",
        "gpus": "a100:2",
        "licenses": "matlab:1",
        "constraint": "a100&ib",
    }
    assert [d.line for d in parse_directives(script)] == [2, 2, 3, 4, 5, 6, 6, 7, 7, 7]


def test_directives_stop_at_the_first_command() -> None:
    script = (
        "#!/bin/bash\n\n# a comment\n   \n  # an indented comment\n#SBATCH -t 9\necho hi\n#SBATCH -t 30\n"
    )
    assert fields(script) == {"time": "9"}
    assert fields("echo first\n#SBATCH -t 5\n") == {}


def test_indented_lowercase_and_spaced_magic_words_are_comments() -> None:
    assert fields("  #SBATCH -t 7\n\t#SBATCH -t 6\n#sbatch -t 5\n# SBATCH -t 4\n#SBATCH -t 8\n") == {
        "time": "8"
    }


def test_the_last_directive_wins_and_comments_end_a_line() -> None:
    assert fields("#SBATCH -t 17\n#SBATCH -t 18 # -t 20\n") == {"time": "18"}


def test_quotes_group_words_and_hide_a_hash() -> None:
    assert fields("#SBATCH --constraint='a|b' --mail-user \"alice@example.org\" -t1'0'\n") == {
        "constraint": "a|b",
        "mail_user": "alice@example.org",
        "time": "10",
    }
    # inside quotes a hash is text (so the value reaches the check, which refuses it)
    with pytest.raises(ValueError, match="--qos: String should match"):
        parse_directives("#SBATCH --qos 'a#b'\n")


def test_crlf_scripts_are_read_to_their_first_command() -> None:
    with pytest.raises(ValueError, match=r"line 2 .*carriage return"):
        parse_directives("#!/bin/bash\r\n#SBATCH -t 9\r\n")


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("#SBATCH --output=out.txt", "--output is set by cloudhpc"),
        ("#SBATCH -o out.txt", "--output is set by cloudhpc"),
        ("#SBATCH -e err.txt", "--error is set by cloudhpc"),
        ("#SBATCH --error=err.txt", "--error is set by cloudhpc"),
        ("#SBATCH --comment=x", "--comment is set by cloudhpc"),
        ("#SBATCH --parsable", "--parsable is set by cloudhpc"),
        ("#SBATCH --chdir=/tmp", "--chdir is set by cloudhpc"),
        ("#SBATCH -D /tmp", "--chdir is set by cloudhpc"),
        ("#SBATCH --wrap='touch /tmp/pwned'", "--wrap is set by cloudhpc"),
        ("#SBATCH -J name", "--job-name is set by cloudhpc"),
        ("#SBATCH --export=ALL", "'--export' is not an option cloudhpc takes"),
        ("#SBATCH --part=debug", "'--part' is not an option cloudhpc takes"),
        ("#SBATCH -x node1", "-x is not an option cloudhpc takes"),
        ("#SBATCH hetjob", "'hetjob' is not an option"),
        ("#SBATCH -t 5 stray", "'stray' is not an option"),
        ("#SBATCH -N", "-N needs a value"),
        ("#SBATCH --time", "--time needs a value"),
        ("#SBATCH --exclusive=user", "--exclusive takes no value"),
        ('#SBATCH -t 7 --mail-user "unterminated', 'unmatched "'),
        ("#SBATCH -t 21 --mail-user x\\ y", "backslash"),
        ("#SBATCH -N two", "--nodes: Input should be a valid integer"),
        ("#SBATCH --time=10m", "--time: Value error"),
        ("#SBATCH --signal=FOO", "--signal: Value error"),
    ],
)
def test_refused_lines_are_named(line: str, words: str) -> None:
    with pytest.raises(ValueError, match="line 3 ") as exc:
        parse_directives(f"#!/bin/bash\n#SBATCH -t 5\n{line}\nsrun hostname\n")
    assert words in str(exc.value)


@pytest.mark.parametrize("hostile", HOSTILE_STRINGS)
def test_hostile_values_are_refused_or_kept_as_one_word(hostile: str) -> None:
    """A value never leaves the parser split or with shell syntax: each field's pattern refuses it."""
    quoted = hostile.replace("'", "").replace("\n", " ")
    for option in ("--partition", "--qos", "--constraint", "--gres", "--begin", "--mail-user"):
        try:
            found = fields(f"#SBATCH {option}='{quoted}'\n")
        except ValueError:
            continue
        assert all(c not in str(v) for v in found.values() for c in "$`; \n'\"&|")


def test_many_options_are_refused() -> None:
    with pytest.raises(ValueError, match="more than 256"):
        parse_directives("#SBATCH -t 5\n" * 300)


def test_the_spec_wins_and_the_merge_is_what_is_stored() -> None:
    merged = apply_directives(spec("#SBATCH -N 2 -t 10 --qos=normal --exclusive\necho\n", nodes=1))
    assert merged.resources == Resources(nodes=1, time="10", qos="normal", exclusive=True)
    assert merged.script == "#SBATCH -N 2 -t 10 --qos=normal --exclusive\necho\n"
    # an explicit false beats the directive, and applying twice changes nothing (a stored spec)
    no = apply_directives(spec("#SBATCH --exclusive\necho\n", exclusive=False))
    assert no.resources.exclusive is False
    assert apply_directives(merged) == merged
    plain = spec("echo hi")
    assert apply_directives(plain) is plain


def test_a_merge_that_does_not_go_together_is_refused() -> None:
    with pytest.raises(ValueError, match="mem and mem_per_cpu exclude each other"):
        apply_directives(spec("#SBATCH --mem-per-cpu=2G\necho\n", mem="4G"))


GOOD: dict[str, Any] = {
    "ntasks": 8,
    "gpus": "a100:4",
    "gres": "gpu:a100:4,nvme:100",
    "mem_per_cpu": "2G",
    "qos": "normal",
    "constraint": "[rack1|rack2]&ib",
    "exclusive": True,
    "reservation": "maint-2027",
    "mail_type": "end,FAIL",
    "mail_user": "alice@example.org",
    "begin": "now+1hour",
    "signal": "B:USR1@120",
    "licenses": "matlab@lic1:2,comsol",
}

BAD: dict[str, list[Any]] = {
    "ntasks": [0, -1, 10**7, "x"],
    "gpus": ["x", "a100:", "a100:x", "-1", "4; id"],
    "gres": ["", "gpu::4", "gpu:a100:0", ":4", "gpu a100", "gpu:$(id)", ",".join(["gpu"] * 40)],
    "mem_per_cpu": ["0", "2X", "-1G", "1.5G"],
    "qos": ["", "a b", "$(id)", "x" * 65],
    "constraint": ["", "a;b", "a b", "$(id)", "x" * 257],
    "exclusive": ["maybe", 2],
    "reservation": ["", "a;b", "../x"],
    "mail_type": ["", "SOMETIMES", "END;FAIL"],
    "mail_user": ["", "a b@example.org", "alice@", "$(id)@x.org", "a@b"],
    "begin": ["", "yesterday", "2027-02-30", "25:00", "now+1fortnight", "now;id"],
    "signal": ["", "FOO", "USR1@", "X:USR1", "99", "USR1@70000", "B:USR1@1;id"],
    "licenses": ["", "a b", "lic:0", "lic:x", "$(id)"],
}


def test_good_values_of_each_option() -> None:
    resources = Resources(**GOOD)
    assert resources.mail_type == "END,FAIL"
    assert Resources(gpus=4).gpus == "4"  # a count in JSON is the count


@pytest.mark.parametrize(("field", "value"), [(f, v) for f, values in BAD.items() for v in values])
def test_each_bad_value_is_refused_naming_its_field(field: str, value: Any) -> None:
    with pytest.raises(ValidationError) as exc:
        Resources.model_validate({field: value})
    assert [e["loc"] for e in exc.value.errors()] == [(field,)]


def test_all_options_become_one_argv_element_each() -> None:
    flags = resource_flags(Resources(nodes=2, partition="debug", **GOOD))
    assert flags == [
        "--nodes=2",
        "--ntasks=8",
        "--gpus=a100:4",
        "--gres=gpu:a100:4,nvme:100",
        "--mem-per-cpu=2G",
        "--partition=debug",
        "--qos=normal",
        "--constraint=[rack1|rack2]&ib",
        "--exclusive",
        "--reservation=maint-2027",
        "--mail-type=END,FAIL",
        "--mail-user=alice@example.org",
        "--begin=now+1hour",
        "--signal=B:USR1@120",
        "--licenses=matlab@lic1:2,comsol",
    ]
    assert resource_flags(Resources(exclusive=False)) == []


def test_a_default_memory_request_yields_to_the_jobs_other_one() -> None:
    defaults = Resources(mem="4G", time="10")
    assert Resources(mem_per_cpu="1G").with_defaults(defaults) == Resources(mem_per_cpu="1G", time="10")
    assert Resources().with_defaults(defaults) == defaults


def test_cluster_limits() -> None:
    limits = ClusterLimits(
        max_time="1-00:00:00",
        max_nodes=100,
        partitions={"small": {"max_time": "3-00:00:00", "max_nodes": 1}, "test": {"max_time": "15"}},
        qos=["normal", "long"],
    )
    assert limits.problems(Resources(partition="test", time="15", qos="long", nodes=1)) == []
    assert limits.problems(Resources(time="2-00:00:00")) == [
        ("resources.time", "2-00:00:00 is over the limit of the cluster: 1-00:00:00")
    ]
    assert limits.problems(Resources(partition="test", time="16")) == [
        ("resources.time", "16 is over the limit of partition test: 15")
    ]
    assert limits.problems(Resources(partition="small", nodes=2)) == [
        ("resources.nodes", "2 nodes is over the limit of partition small: 1")
    ]
    assert [f for f, _ in limits.problems(Resources(partition="large", qos="high"))] == [
        "resources.partition",
        "resources.qos",
    ]
    assert ClusterLimits().problems(Resources(nodes=10_000, time="365-0", qos="x")) == []


async def test_the_agent_fails_a_job_over_its_clusters_limits() -> None:
    """A porter without the cluster's configuration could not check: the agent does, before sbatch."""
    cluster = ClusterConfig(
        backend="local",
        defaults=ClusterDefaults(partition="test"),
        limits={"partitions": {"test": {"max_time": "15"}}},
    )
    stager = Stager(cluster, envs=None, workdir="/w", bridge=None, fetch_file=None)
    with pytest.raises(StagingError, match=r"resources\.time: 16 is over the limit of partition test: 15"):
        await stager.prepare(job_from(spec("echo", time="16")))
    staged = await stager.prepare(job_from(spec("echo", time="15")))
    assert staged.resources.partition == "test"


# ---- requeue options: refused with a pointer to `checkpoint`


@pytest.mark.parametrize("line", ["#SBATCH --requeue", "#SBATCH --no-requeue", "#SBATCH --open-mode=append"])
def test_requeue_options_point_to_checkpoint(line: str) -> None:
    with pytest.raises(ValueError, match="line 2 ") as exc:
        parse_directives(f"#!/bin/bash\n{line}\nsrun hostname\n")
    message = str(exc.value)
    assert "is not taken" in message
    assert "`checkpoint: {warn_before:" in message
    assert "--requeue" in message
    assert "CLOUDHPC_CHECKPOINT_DIR" in message


def checkpointed(script: str, **fields: object) -> JobSpec:
    body: dict[str, object] = {
        "name": "c",
        "cluster": "c",
        "script": script,
        "checkpoint": {"warn_before": 30},
    }
    return JobSpec.model_validate(body | fields)


def test_a_script_signal_beside_checkpoint_is_refused_with_its_line() -> None:
    spec = checkpointed("#!/bin/bash\n#SBATCH -t 5\n#SBATCH --signal=B:USR1@60\nsrun x\n")
    with pytest.raises(ValueError, match="line 3 ") as exc:
        apply_directives(spec)
    assert "checkpoint.signal" in str(exc.value)


def test_the_time_limit_of_a_checkpointed_job_may_come_from_its_script() -> None:
    spec = checkpointed("#!/bin/bash\n#SBATCH --time=5\nsrun x\n")
    assert apply_directives(spec).resources.time == "5"
    with pytest.raises(ValidationError, match="shorter than the time limit"):
        checkpointed("#!/bin/bash\n#SBATCH --time=0:20\nsrun x\n")
    with pytest.raises(ValidationError, match=r"or the script's #SBATCH --time"):
        checkpointed("#!/bin/bash\nsrun x\n#SBATCH --time=5\n")  # after a command: a comment


def test_merged_directives_are_checked_against_the_spec_rules() -> None:
    """`#SBATCH --array` in the script of a checkpointed job: refused as the spec field would be."""
    spec = checkpointed("#!/bin/bash\n#SBATCH -t 5\n#SBATCH --array=0-3\nsrun x\n")
    with pytest.raises(ValueError, match="not arrays"):
        apply_directives(spec)
