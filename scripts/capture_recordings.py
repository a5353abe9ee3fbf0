"""Re-capture tests/recordings/*.json from the real testbed.

Usage (as root on the testbed machine, after `scripts/testbed.sh up`):

    .venv/bin/python scripts/capture_recordings.py            # everything (~2 min: a job must time out)
    .venv/bin/python scripts/capture_recordings.py squeue_unknown sbatch_ok   # only these

Every recorded command is built by the same `cloudhpc.hpc.slurm` classes the backend uses and run
through the plain `ssh` client as the testbed user, so a recording is exactly what our parsers meet.
Setup steps (staging scripts, waiting for jobs) are not recorded. The quota rejections need root:
the script makes a limit, captures the refusal, and restores the limit at once (even on errors).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from tests.testbed import read_env_file  # noqa: E402

from cloudhpc.domain.jobs import Resources  # noqa: E402
from cloudhpc.hpc.backend import JobPaths  # noqa: E402
from cloudhpc.hpc.slurm import Sacct, Sbatch, Scancel, Seff, Squeue  # noqa: E402
from cloudhpc.hpc.slurm.estimate import STUB_SCRIPT, SbatchTestOnly  # noqa: E402
from cloudhpc.hpc.slurm.restarts import SqueueRestarts  # noqa: E402

OUT = ROOT / "tests" / "recordings"
ENV = read_env_file()
QUOTA_QOS = "cloudhpc_quota_test"


def ssh_base() -> list[str]:
    return [
        "ssh",
        "-i",
        ENV["TESTBED_SSH_KEY"],
        "-o",
        f"UserKnownHostsFile={ENV['TESTBED_KNOWN_HOSTS']}",
        "-o",
        "BatchMode=yes",
        "-p",
        ENV["TESTBED_SSH_PORT"],
        f"{ENV['TESTBED_SSH_USER']}@{ENV['TESTBED_SSH_HOST']}",
    ]


def remote(argv: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run an argument list on the login node, quoted once, the way hpc/ssh/ does."""
    return subprocess.run(
        [*ssh_base(), "--", shlex.join(argv)], input=stdin, capture_output=True, text=True, check=False
    )


def local(*argv: str) -> str:
    return subprocess.run(list(argv), capture_output=True, text=True, check=True).stdout


SLURM_VERSION = remote(["sbatch", "--version"]).stdout.strip().split()[-1]
HOME = remote(["printenv", "HOME"]).stdout.strip()
WORKDIR = f"{HOME}/.cloudhpc-recordings"


def record(
    name: str, argv: Sequence[str], description: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    proc = remote(argv, stdin=stdin)
    data = {
        "description": description,
        "argv": list(argv),
        **({"stdin": stdin} if stdin is not None else {}),
        "stdout": proc.stdout,
        "stderr": proc.stderr,
        "exit_status": proc.returncode,
        "captured_with": "python scripts/capture_recordings.py: "
        + shlex.join([*ssh_base(), "--", shlex.join(argv)]),
        "slurm_version": SLURM_VERSION,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    print(f"recorded {name}: exit {proc.returncode}, {len(proc.stdout)} bytes of stdout", flush=True)
    return proc


def stage(script: str) -> tuple[uuid.UUID, JobPaths]:
    job_id = uuid.uuid4()
    paths = JobPaths(WORKDIR, job_id)
    wrapper = "#!/bin/bash\n" + script + "\n"
    remote(["mkdir", "-p", paths.control])
    proc = remote(["sh", "-c", 'cat > "$1" && chmod 700 "$1"', "stage", paths.batch_script], stdin=wrapper)
    proc.check_returncode()
    return job_id, paths


def submit(script: str, **resources: object) -> tuple[uuid.UUID, str]:
    job_id, paths = stage(script)
    argv = Sbatch(job_id, paths, Resources.model_validate(resources)).argv()
    proc = remote(argv)
    proc.check_returncode()
    return job_id, proc.stdout.strip()


def raw_sbatch(*args: str) -> str:
    proc = remote(["sbatch", "--parsable", *args])
    proc.check_returncode()
    return proc.stdout.strip().split(";")[0]


def wait_for(ids: Sequence[str], done: Callable[[str], bool], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = local("sacct", "-n", "-P", "-X", "-S", "now-1days", "-o", "JobID,State", "-j", ",".join(ids))
        states = {}
        for line in out.splitlines():
            if "|" in line:
                job, state = line.split("|", 1)
                states[job.split("_[")[0]] = state  # a pending array's row is 123_[2-4]
        if all(i in states and done(states[i].split()[0]) for i in ids):
            return
        time.sleep(1)
    raise TimeoutError(f"jobs {ids} did not reach the wanted state in {timeout} s")


def finished(state: str) -> bool:
    return state not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING")


def require_limits_enforced() -> None:
    """Limits bite only with AccountingStorageEnforce, which needs a slurmctld restart to change:
    this script never restarts daemons it did not start, so it asks for the setting instead."""
    config = local("scontrol", "show", "config")
    if not re.search(r"^AccountingStorageEnforce\s*=\s*\S*limits", config, re.M):
        raise RuntimeError(
            "quota recordings need `AccountingStorageEnforce=associations,limits,qos` in slurm.conf "
            "(scripts/testbed.sh) and a slurmctld restart; the testbed has: "
            + next((line for line in config.splitlines() if "AccountingStorageEnforce" in line), "?")
        )


def capture_quota() -> None:
    """QOS and association limits, each set for the shortest possible time and always restored."""
    require_limits_enforced()
    job_id, paths = stage("true")
    argv = Sbatch(job_id, paths, Resources()).argv()
    local("sacctmgr", "-i", "add", "qos", QUOTA_QOS, "MaxSubmitJobsPerUser=0")
    try:
        local("sacctmgr", "-i", "modify", "user", "hpcuser", "set", f"qos+={QUOTA_QOS}")
        with_qos = [*argv[:-1], f"--qos={QUOTA_QOS}", argv[-1]]
        retry_until_refused("sbatch_quota_qos", with_qos, "sbatch refused by a QOS MaxSubmitJobsPerUser=0")
    finally:
        local("sacctmgr", "-i", "modify", "user", "hpcuser", "set", f"qos-={QUOTA_QOS}")
        local("sacctmgr", "-i", "delete", "qos", QUOTA_QOS)
    before = local("sacctmgr", "-n", "-P", "show", "assoc", "where", "user=hpcuser", "format=maxsubmit")
    restore = f"MaxSubmitJobs={before.strip() or -1}"
    try:
        local("sacctmgr", "-i", "modify", "user", "hpcuser", "set", "MaxSubmitJobs=0")
        retry_until_refused("sbatch_quota_assoc", argv, "sbatch refused by an association MaxSubmitJobs=0")
    finally:
        local("sacctmgr", "-i", "modify", "user", "hpcuser", "set", restore)


def retry_until_refused(name: str, argv: Sequence[str], description: str) -> None:
    """slurmdbd pushes a new limit to slurmctld asynchronously: retry until it bites."""
    for _ in range(25):
        proc = remote(argv)
        if proc.returncode != 0:
            record(name, argv, description)
            return
        remote(Scancel(proc.stdout.strip().split(";")[0]).argv())
        time.sleep(0.2)
    raise RuntimeError(f"{name}: sbatch was never refused")


def capture_just_ended() -> None:
    """Right after a job ends, 22.05's sacct prints ReqMem with an unknown unit (`16?`) for about a
    second, until slurmdbd has the job's TRES: catch that moment."""
    for _ in range(5):
        _, native_id = submit("exit 3")
        argv = Sacct(jobs=[native_id]).argv()
        for _ in range(100):
            proc = remote(argv)
            if "FAILED" in proc.stdout:
                if "?" in proc.stdout:
                    record("sacct_just_ended", argv, "sacct right after the end: ReqMem has an unknown unit")
                    return
                break
            time.sleep(0.05)
    raise RuntimeError("sacct_just_ended: never saw the unknown ReqMem unit right after a job ended")


def capture_short_jobs() -> None:
    """Jobs shorter than the gather interval (testbed: `JobAcctGatherFrequency=task=2`): what sacct
    shows at the first answer in which the allocation has ended (`_t0`), then 5, 15 and 40 s later.
    Both jobs run at once; each snapshot is taken on its own job's clock."""
    jobs = {"sacct_short_half_second": "sleep 0.5", "sacct_short_3s": "sleep 3"}
    native = {name: submit(script)[1] for name, script in jobs.items()}
    ended: dict[str, float] = {}
    taken: dict[str, set[int]] = {name: set() for name in jobs}
    deadline = time.monotonic() + 120
    while any(len(t) < 4 for t in taken.values()) and time.monotonic() < deadline:
        for name, job in native.items():
            argv = Sacct(jobs=[job]).argv()
            if name not in ended:
                proc = remote(argv)
                rows = [line.split("|") for line in proc.stdout.splitlines()[1:]]
                if any(r[0] == job and finished(r[2].split()[0]) for r in rows):
                    ended[name] = time.monotonic()
                    record(f"{name}_t0", argv, f"{jobs[name]!r}: the first sacct answer after the end")
                    taken[name].add(0)
                continue
            for after in (5, 15, 40):
                if after not in taken[name] and time.monotonic() - ended[name] >= after:
                    record(f"{name}_t{after}", argv, f"{jobs[name]!r}: sacct {after} s after the end")
                    taken[name].add(after)
        time.sleep(0.1)
    if any(len(t) < 4 for t in taken.values()):
        raise TimeoutError(f"short jobs {native}: not all snapshots taken ({taken})")


def capture_preemption() -> None:
    """A job of the default partition preempted by one of the testbed's `urgent` partition
    (PreemptMode=REQUEUE, GraceTime 15 s) that needs its memory: what squeue shows in the grace
    time, the first answer after SLURM requeued it, its restart count, and sacct's records."""
    memory = int(
        local("sinfo", "--noheader", "--format=%m", "--partition=" + ENV["TESTBED_SLURM_PARTITION"]).split()[
            0
        ]
    )
    _, native = submit("sleep 300", mem=f"{memory * 40 // 100}M", time="5")
    wait_for([native], lambda state: state == "RUNNING", timeout=60)
    urgent = raw_sbatch(
        "--partition=" + ENV["TESTBED_SLURM_URGENT_PARTITION"],
        f"--mem={memory * 85 // 100}M",
        "--time=1",
        "--wrap=sleep 2",
    )
    argv = Squeue(jobs=[native]).argv()
    first = remote(argv).stdout
    grace = False
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        proc = remote(argv)
        row = proc.stdout.splitlines()[1].split("|")
        if not grace and row[2] == "RUNNING" and proc.stdout != first:
            record(
                "squeue_preempted_grace",
                argv,
                "squeue of a preempted job in its grace time: RUNNING, end time now + GraceTime",
            )
            grace = True
        if row[2] != "RUNNING":
            record(
                "squeue_preempted_requeued",
                argv,
                f"squeue's first answer after SLURM requeued the preempted job: {row[2]}",
            )
            break
        time.sleep(0.2)
    else:
        raise TimeoutError(f"job {native} was not requeued within 90 s of urgent job {urgent}")
    record(
        "squeue_restarts_preempted",
        SqueueRestarts([native]).argv(),
        "RestartCnt of the requeued preempted job",
    )
    wait_for([native], lambda state: state == "PENDING", timeout=30)
    remote(Scancel(native).argv())
    wait_for([native, urgent], finished, timeout=60)
    record(
        "sacct_duplicates_preempted",
        Sacct(jobs=[native], duplicates=True).argv(),
        "sacct --duplicates of a job preempted (its run PREEMPTED), then cancelled while pending again",
    )


def main(selected: set[str]) -> None:
    def want(name: str) -> bool:
        return not selected or any(name.startswith(s) for s in selected)

    jobs: dict[str, str] = {}
    # Long-running parts first, so they run while the rest is captured.
    if want("sacct_timeout"):
        _, jobs["timeout"] = submit("sleep 600", time="1")
    standalone = (
        "sbatch_",
        "squeue_unknown",
        "sacct_unknown",
        "seff_unknown",
        "sacct_timeout",
        "sacct_just_ended",
        "sacct_short",
        "squeue_preempted",
        "sacct_duplicates_preempted",
    )
    if not selected or any(not s.startswith(standalone) for s in selected):
        mem_script = (
            'python3 -c \'import time; x = bytearray(150 * 2**20); x[::4096] = b"x" * len(x[::4096]);'
            " time.sleep(6)'"
        )
        _, jobs["completed"] = submit(mem_script, mem="400M")
        _, jobs["failed"] = submit("echo failing; sleep 3; exit 3")
        _, jobs["multistep"] = submit("srun sleep 3\nsrun --ntasks=1 true\necho done", cpus_per_task=2)
        jobs["array"] = raw_sbatch("--hold", "--array=2-4%25", "--wrap=sleep 1")
        _, jobs["running"] = submit("sleep 300")
        jobs["held"] = raw_sbatch("--hold", "--wrap=sleep 1")
        _, jobs["cancelled"] = submit("sleep 300")
        time.sleep(2)
        remote(Scancel(jobs["cancelled"]).argv()).check_returncode()

    find_id = uuid.uuid4()
    if want("sbatch_ok") or want("squeue_by_name") or want("sacct_by_name"):
        job_id, paths = stage("echo hello")
        record("sbatch_ok", Sbatch(job_id, paths, Resources(time="00:05:00")).argv(), "sbatch accepted a job")
        find_id = job_id
    if want("sbatch_rejected"):
        job_id, paths = stage("true")
        record(
            "sbatch_rejected_partition",
            Sbatch(job_id, paths, Resources(partition="nosuchpartition")).argv(),
            "sbatch refused an unknown partition",
        )
    if want("sbatch_test_only"):
        job_id = uuid.uuid4()  # no job directory: --test-only reads the stub script from stdin
        sbatch = Sbatch(job_id, JobPaths(WORKDIR, job_id), Resources(time="00:05:00", cpus_per_task=2))
        for name, partition, description in (
            ("sbatch_test_only", None, "sbatch --test-only: when the job would start, nothing submitted"),
            ("sbatch_test_only_refused", "nosuchpartition", "sbatch --test-only on an unknown partition"),
        ):
            record(name, SbatchTestOnly(sbatch, partition).argv(), description, stdin=STUB_SCRIPT)
    if want("sbatch_quota"):
        capture_quota()
    if want("squeue_unknown"):
        record("squeue_unknown", Squeue(jobs=["999999"]).argv(), "squeue for one id slurmctld does not know")
    if want("sacct_unknown"):
        record("sacct_unknown", Sacct(jobs=["999999"]).argv(), "sacct for an id slurmdbd does not know")
    if want("squeue_by_name_none"):
        record(
            "squeue_by_name_none",
            Squeue(job_name=f"chpc-{uuid.uuid4()}").argv(),
            "squeue by a name no job has",
        )
    if want("seff_unknown"):
        record("seff_unknown", Seff("999999").argv(), "seff for an id slurmdbd does not know")

    if jobs:
        wait_for([jobs["failed"], jobs["completed"], jobs["multistep"]], finished)
        wait_for([jobs["running"]], lambda s: s == "RUNNING")
        ids = [jobs[k] for k in ("running", "held", "array", "completed", "failed", "cancelled")]
        if want("squeue_states"):
            record("squeue_states", Squeue(jobs=ids).argv(), "squeue for jobs in several states")
            record(
                "squeue_states_with_unknown",
                Squeue(jobs=[*ids, "999999"]).argv(),
                "squeue for several jobs, one of them unknown",
            )
        if want("squeue_by_name"):
            record("squeue_by_name", Squeue(job_name=f"chpc-{find_id}").argv(), "squeue by derived job name")
        if want("sacct_completed"):
            record(
                "sacct_completed", Sacct(jobs=[jobs["completed"]]).argv(), "a completed job with its steps"
            )
        if want("sacct_failed"):
            record("sacct_failed", Sacct(jobs=[jobs["failed"]]).argv(), "a job whose script exited 3")
        if want("sacct_cancelled"):
            record("sacct_cancelled", Sacct(jobs=[jobs["cancelled"]]).argv(), "a job cancelled while running")
        if want("sacct_multistep"):
            record("sacct_multistep", Sacct(jobs=[jobs["multistep"]]).argv(), "a job with two srun steps")
        if want("sacct_running"):
            record(
                "sacct_running_pending",
                Sacct(jobs=[jobs["running"], jobs["held"], jobs["array"]], allocations_only=True).argv(),
                "running, held and array (pending) jobs, allocation rows only",
            )
        if want("sacct_by_name"):
            record(
                "sacct_by_name",
                Sacct(job_name=f"chpc-{find_id}", allocations_only=True).argv(),
                "sacct by derived job name",
            )
        if want("seff_completed"):
            record(
                "seff_completed", Seff(jobs["completed"]).argv(), "seff of a completed job that used memory"
            )
        if want("seff_failed"):
            record("seff_failed", Seff(jobs["failed"]).argv(), "seff of a job whose script exited 3")
        if want("scancel_finished"):
            record("scancel_finished", Scancel(jobs["failed"]).argv(), "scancel of a job that already ended")
        for key in ("running", "held", "array"):
            remote(Scancel(jobs[key]).argv())
        if want("sacct_array"):
            wait_for([jobs["array"]], finished)
            record("sacct_array", Sacct(jobs=[jobs["array"]]).argv(), "an array job cancelled while held")
    if want("sacct_just_ended"):
        capture_just_ended()
    if want("sacct_short"):
        capture_short_jobs()
    if want("squeue_preempted") or want("sacct_duplicates_preempted"):
        capture_preemption()
    if "timeout" in jobs:
        wait_for([jobs["timeout"]], finished)
        record(
            "sacct_timeout", Sacct(jobs=[jobs["timeout"]]).argv(), "a job killed at its 1-minute time limit"
        )


if __name__ == "__main__":
    main(set(sys.argv[1:]))
