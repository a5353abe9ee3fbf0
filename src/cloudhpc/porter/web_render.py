"""The web view's HTML, as plain functions of the data (no template engine: porter has none).

Every value is escaped by `html()` unless it is already `Html`, so that a job's log, script,
reason or artifact name can never become markup: the only markup is written here. Links are
relative to the page (`base`: "./" on `/ui/`, "../" on `/ui/jobs/{id}`), so the view works behind
a path prefix it does not know (the Kubeflow gateway's `/cloudhpc/`, docs/web.md).
"""

from __future__ import annotations

import html as _html
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from cloudhpc.domain.arrays import TaskObservation
from cloudhpc.domain.billing import Estimate
from cloudhpc.domain.jobs import Bridge, Job, JobSummary
from cloudhpc.domain.states import JobState

__all__ = [
    "MAX_TASK_ROWS",
    "STAGES",
    "Html",
    "error_page",
    "estimate_page",
    "html",
    "job_list_page",
    "job_page",
    "login_page",
]


class Html(str):
    """Markup written by this module: `html()` passes it through unescaped."""

    __slots__ = ()


def html(template: str, /, **values: object) -> Html:
    """`template` with `{name}` replaced by each value, escaped unless it is `Html`."""
    return Html(template.format(**{k: _escaped(v) for k, v in values.items()}))


def _escaped(value: object) -> str:
    if isinstance(value, Html):
        return value
    return _html.escape("" if value is None else str(value), quote=True)


def _join(parts: Iterable[Html]) -> Html:
    return Html("".join(parts))


STAGES: tuple[JobState, ...] = (JobState.PENDING, JobState.PREPARING, JobState.QUEUED, JobState.RUNNING)
"""The timeline's stages before the end (whichever terminal state it is)."""

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1b1f24;background:#f6f8fa}
header{background:#24292f;color:#fff;padding:8px 16px;display:flex;gap:16px;align-items:center}
header a{color:#fff;text-decoration:none;font-weight:600}header form{margin-left:auto}
main{padding:16px;max-width:1200px}h1{font-size:20px;margin:4px 0 12px}h2{font-size:16px;margin:20px 0 8px}
table{border-collapse:collapse;background:#fff;width:100%}th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eaeef2}.state{padding:1px 6px;border-radius:8px;font-weight:600;font-size:12px;white-space:nowrap}
.pending,.preparing,.queued{background:#fff8c5}.running{background:#ddf4ff}.completed{background:#dafbe1}
.failed,.timeout{background:#ffebe9}.cancelled{background:#eaeef2}.muted{color:#6e7781}
pre{background:#0d1117;color:#e6edf3;padding:8px;max-height:480px;overflow:auto;white-space:pre-wrap;word-break:break-all}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 12px;margin:0}dt{font-weight:600}dd{margin:0}
ol.timeline{display:flex;gap:0;padding:0;list-style:none}ol.timeline li{flex:1;border-top:4px solid #d0d7de;padding:4px}
ol.timeline li.reached{border-color:#0969da}.error{color:#cf222e}
tr.earliest td{background:#dafbe1;font-weight:600}
"""

_LIST_SCRIPT = """
(function(){
  var rows=document.querySelectorAll('tr[data-job]');var seen={};
  rows.forEach(function(r){seen[r.dataset.job]=r.dataset.state;});
  function poll(){
    fetch(document.body.dataset.poll,{credentials:'same-origin',headers:{Accept:'application/json'}})
      .then(function(r){if(r.status===401){location.reload();throw 0;}return r.json();})
      .then(function(page){
        var changed=page.jobs.length!==Object.keys(seen).length||
          page.jobs.some(function(j){return seen[j.id]!==j.state;});
        if(changed){location.reload();}else{setTimeout(poll,5000);}
      }).catch(function(){setTimeout(poll,10000);});
  }
  setTimeout(poll,5000);
})();
"""

_JOB_SCRIPT = """
(function(){
  var d=document.body.dataset,out=document.getElementById('log'),offset=0,dec=new TextDecoder();
  function follow(){
    fetch(d.logs+'?offset='+offset,{credentials:'same-origin'}).then(function(r){
      if(!r.ok){throw r.status;}
      var next=Number(r.headers.get('X-Next-Offset')),done=r.headers.get('X-Complete')==='true';
      return r.arrayBuffer().then(function(b){
        var atEnd=out.scrollTop+out.clientHeight>=out.scrollHeight-4;
        out.textContent+=dec.decode(b,{stream:!done});offset=next;
        if(atEnd){out.scrollTop=out.scrollHeight;}
        out.dataset.complete=String(done);
        if(!done){setTimeout(follow,b.byteLength?200:1500);}
      });
    }).catch(function(){setTimeout(follow,5000);});
  }
  function watch(){
    fetch(d.job+'?wait=30&since_state='+d.state,{credentials:'same-origin'})
      .then(function(r){if(!r.ok){throw r.status;}return r.json();})
      .then(function(j){if(j.state!==d.state){location.reload();}else{watch();}})
      .catch(function(){setTimeout(watch,5000);});
  }
  function bridges(){
    fetch(d.job,{credentials:'same-origin'})
      .then(function(r){if(!r.ok){throw r.status;}return r.json();})
      .then(function(j){
        if(j.bridges.length&&j.bridges.every(function(b){return b.ready;})){location.reload();}
        else{setTimeout(bridges,3000);}
      }).catch(function(){setTimeout(bridges,5000);});
  }
  follow();
  if(d.terminal!=='true'){watch();}
  if(d.bridgesPending==='true'){setTimeout(bridges,3000);}
})();
"""


def _page(
    title: str,
    body: Html,
    *,
    nonce: str,
    base: str,
    user: str | None,
    data: Mapping[str, str] | None = None,
    script: str = "",
) -> str:
    """A whole page: the header (with the user and a logout button when logged in), `body`, and
    `script` allowed by the page's CSP nonce; `data` becomes the body's data- attributes (how the
    scripts learn their URLs without any value being spliced into JavaScript)."""
    attrs = _join(html(' data-{k}="{v}"', k=Html(k), v=v) for k, v in (data or {}).items())
    who = (
        html(
            '<span>{user}</span><form method="post" action="{base}logout">'
            '<button type="submit">Log out</button></form>',
            user=user,
            base=base,
        )
        if user
        else Html("")
    )
    scripts = html('<script nonce="{nonce}">{s}</script>', nonce=nonce, s=Html(script)) if script else ""
    return html(
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        '<title>{title} · cloudhpc</title><style nonce="{nonce}">{css}</style></head>'
        '<body{attrs}><header><a href="{base}">cloudhpc jobs</a>{who}</header>'
        "<main>{body}</main>{scripts}</body></html>",
        title=title,
        nonce=nonce,
        css=Html(_CSS),
        attrs=attrs,
        base=base,
        who=who,
        body=body,
        scripts=Html(scripts),
    )


def _time(at: datetime | None) -> str:
    return at.strftime("%Y-%m-%d %H:%M:%S UTC") if at is not None else "—"


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def _state(state: JobState) -> Html:
    return html('<span class="state {s}">{s}</span>', s=state.value)


def login_page(*, nonce: str, error: str | None = None, next_path: str = "") -> str:
    """The token form: the token goes in a POST body, never in a URL (where logs would keep it)."""
    body = html(
        "<h1>Log in</h1><p>Paste a porter token (<code>cloudhpc tokens create --user NAME</code>, "
        "or the one your notebook uses).</p>{error}"
        '<form method="post" action="login"><input type="hidden" name="next" value="{next}">'
        '<input type="password" name="token" autocomplete="off" size="60" aria-label="token" autofocus> '
        '<button type="submit">Log in</button></form>',
        error=html('<p class="error">{e}</p>', e=error) if error else Html(""),
        next=next_path,
    )
    return _page("Log in", body, nonce=nonce, base="./", user=None)


def error_page(status: int, message: str, *, nonce: str, base: str, user: str | None) -> str:
    body = html(
        '<h1>{status}</h1><p>{message}</p><p><a href="{base}">Your jobs</a></p>',
        status=status,
        message=message,
        base=base,
    )
    return _page(str(status), body, nonce=nonce, base=base, user=user)


def job_list_page(
    jobs: Sequence[JobSummary], *, next_cursor: str | None, nonce: str, user: str, poll: str
) -> str:
    """`/ui/`: the user's jobs, newest first; the script reloads the page when a state changes."""
    rows = _join(
        html(
            '<tr data-job="{id}" data-state="{state}"><td><a href="jobs/{id}">{name}</a></td>'
            "<td>{state_badge}</td><td>{cluster}</td><td>{kind}</td><td>{slurm}</td>"
            "<td>{created}</td><td>{started}</td><td>{ended}</td><td>{exit}</td></tr>",
            id=str(job.id),
            state=job.state.value,
            state_badge=_state(job.state),
            name=job.name,
            cluster=job.cluster,
            kind=job.kind.value,
            slurm=job.slurm_job_id or "—",
            created=_time(job.created_at),
            started=_time(job.started_at),
            ended=_time(job.ended_at),
            exit="—" if job.exit_code is None else job.exit_code,
        )
        for job in jobs
    )
    table = (
        html(
            "<table><thead><tr><th>Name</th><th>State</th><th>Cluster</th><th>Kind</th><th>SLURM id</th>"
            "<th>Created</th><th>Started</th><th>Ended</th><th>Exit</th></tr></thead>"
            '<tbody id="jobs">{rows}</tbody></table>',
            rows=rows,
        )
        if jobs
        else Html('<p class="muted">No jobs yet.</p>')
    )
    more = html('<p><a href="?cursor={c}">Older jobs</a></p>', c=quote(next_cursor)) if next_cursor else ""
    body = html("<h1>Jobs</h1>{table}{more}", table=table, more=Html(more))
    return _page("Jobs", body, nonce=nonce, base="./", user=user, data={"poll": poll}, script=_LIST_SCRIPT)


def _timeline(job: Job, reached: Mapping[JobState, datetime], now: datetime) -> Html:
    """pending -> preparing -> queued -> running -> end, each with when it was entered and how long
    the job stayed (an observer may skip a stage: a job that starts and ends between two polls).
    The job's own times come first (SLURM's submit, start and end: what sacct says too), the
    recorded transitions (when porter heard of each) where the job has none (preparing)."""
    end_state = job.state if job.state.terminal else None
    own = {
        JobState.PENDING: job.created_at,
        JobState.QUEUED: job.submitted_at,
        JobState.RUNNING: job.started_at,
    }
    stages: list[tuple[str, datetime | None]] = [(s.value, own.get(s) or reached.get(s)) for s in STAGES]
    end_at = (job.ended_at or reached.get(end_state)) if end_state else None
    stages.append((end_state.value if end_state else "end", end_at))
    items = []
    for i, (label, at) in enumerate(stages):
        later = next((t for _, t in stages[i + 1 :] if t is not None), None)
        stayed = ""
        if at is not None and later is not None:
            stayed = _duration((later - at).total_seconds())
        elif at is not None and label == job.state.value and not job.state.terminal:
            stayed = _duration((now - at).total_seconds()) + " so far"
        items.append(
            html(
                '<li class="{cls}"><b>{label}</b><br><span>{at}</span><br><span class="muted">{stayed}</span></li>',
                cls="reached" if at is not None else "",
                label=label,
                at=_time(at) if at is not None else "—",
                stayed=stayed,
            )
        )
    return html('<ol class="timeline" id="timeline">{items}</ol>', items=_join(items))


def _link(url: str | None, text: str) -> Html:
    """A link only to http(s) URLs and the view's own relative ones: anything else (a `javascript:`
    URL) is shown as text."""
    if url and url.startswith(("https://", "http://", "./", "../")):
        return html(
            '<a href="{url}" rel="noopener noreferrer" target="_blank">{text}</a>', url=url, text=text
        )
    return html("{text}", text=text)


def _bridges(bridges: Sequence[Bridge]) -> Html:
    if not bridges:
        return Html('<p class="muted">No bridges (the job exposes no ports, or it has ended).</p>')
    rows = _join(
        html(
            "<tr><td>{name}</td><td>{port}</td><td>{where}</td><td>{dns}</td><td>{ready}</td></tr>",
            name=b.name,
            port=b.remote_port,
            where=_link(b.url, b.url or f"{b.bridge_host}:{b.bridge_port}"),
            dns=f"{b.service_dns}:{b.remote_port}" if b.service_dns else "—",
            ready="ready" if b.ready else "not yet",
        )
        for b in bridges
    )
    return html(
        '<table id="bridges"><thead><tr><th>Name</th><th>Port</th><th>Link</th><th>In the cluster</th>'
        "<th>Ready</th></tr></thead><tbody>{rows}</tbody></table>",
        rows=rows,
    )


def _artifacts(artifacts: Sequence[Mapping[str, str]]) -> Html:
    if not artifacts:
        return Html('<p class="muted">No artifacts yet (they are stored when the job ends).</p>')
    return html(
        '<ul id="artifacts">{items}</ul>',
        items=_join(html("<li>{link}</li>", link=_link(a["url"], a["name"])) for a in artifacts),
    )


_PERCENT_KEYS = ("cpu_efficiency", "memory_efficiency")
_RECORD_COLUMNS = (
    "step",
    "state",
    "elapsed_seconds",
    "total_cpu_seconds",
    "alloc_cpus",
    "max_rss_bytes",
    "billing",
)


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def _value(key: str, value: Any) -> str:
    if value is None:
        return "—"
    if key in _PERCENT_KEYS and isinstance(value, int | float):
        return f"{value * 100:.1f} %"
    if key.endswith("_bytes") and isinstance(value, int | float):
        return _size(value)
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def _accounting(record: Mapping[str, Any] | None, job: Job) -> Html:
    if record is None:
        return html('<p class="muted">Collected when the job ends (state {s}).</p>', s=job.state.value)
    pending = (
        Html('<p class="muted" id="provisional">Provisional: SLURM has not recorded all of the job yet.</p>')
        if record.get("final") is False
        else html("")
    )
    efficiency = record.get("efficiency") or {}
    eff = _join(
        html("<dt>{k}</dt><dd>{v}</dd>", k=k.replace("_", " "), v=_value(k, v))
        for k, v in efficiency.items()
        if isinstance(efficiency, dict)
    )
    rows = [r for r in record.get("records") or [] if isinstance(r, dict)]
    table = _join(
        html(
            "<tr>{cells}</tr>",
            cells=_join(html("<td>{v}</td>", v=_value(c, r.get(c))) for c in _RECORD_COLUMNS),
        )
        for r in rows
    )
    head = _join(html("<th>{c}</th>", c=c.replace("_", " ")) for c in _RECORD_COLUMNS)
    billed = record.get("billed")
    units = (
        html(
            '<h3>Billed</h3><p id="billed">{n} {unit} <span class="muted">({source})</span></p>',
            n=f"{billed.get('units', 0):g}",
            unit=billed.get("unit", ""),
            source="sacct's billing TRES" if billed.get("source") == "sacct" else "the cluster's rates",
        )
        if isinstance(billed, dict)
        else html("")
    )
    return html(
        '<div id="accounting">{pending}{units}<h3>Efficiency</h3><dl>{eff}</dl><h3>sacct</h3>'
        "<table><thead><tr>{head}</tr></thead><tbody>{table}</tbody></table></div>",
        pending=pending,
        units=units,
        eff=eff,
        head=head,
        table=table,
    )


MAX_TASK_ROWS = 1000
"""An array job's page lists at most this many tasks (the API pages through the rest)."""


def _tasks(job: Job, tasks: Sequence[TaskObservation] | None) -> Html:
    """An array job's tasks, each with its state, SLURM's word, exit code, times and reason (each
    task's output is the artifact `tasks/<index>/output.log`, once stored)."""
    if tasks is None:
        return Html("")
    if not tasks:
        return Html('<h2>Tasks</h2><p class="muted">No task reported yet.</p>')
    rows = _join(
        html(
            "<tr><td>{index}</td><td>{state}</td><td>{native}</td><td>{exit}</td><td>{started}</td>"
            "<td>{ended}</td><td>{reason}</td></tr>",
            index=t.index,
            state=_state(t.state),
            native=t.native_state,
            exit="—" if t.exit_code is None else t.exit_code,
            started=_time(t.started_at),
            ended=_time(t.ended_at),
            reason=t.reason or "—",
        )
        for t in tasks[:MAX_TASK_ROWS]
    )
    more = (
        html(
            '<p class="muted">More tasks: GET /api/v1/jobs/{id}/tasks?cursor={c}</p>',
            id=str(job.id),
            c=tasks[MAX_TASK_ROWS].index,
        )
        if len(tasks) > MAX_TASK_ROWS
        else Html("")
    )
    return html(
        '<h2>Tasks</h2><table id="tasks"><thead><tr><th>Task</th><th>State</th><th>SLURM state</th>'
        "<th>Exit</th><th>Started</th><th>Ended</th><th>Reason</th></tr></thead><tbody>{rows}</tbody></table>{more}",
        rows=rows,
        more=more,
    )


def job_page(
    job: Job,
    *,
    reached: Mapping[JobState, datetime],
    tasks: Sequence[TaskObservation] | None,
    accounting: Mapping[str, Any] | None,
    artifacts: Sequence[Mapping[str, str]],
    nonce: str,
    user: str,
) -> str:
    """`/ui/jobs/{id}`: the job's facts, timeline, live log, accounting, bridges and artifacts."""
    facts = html(
        "<dl><dt>State</dt><dd>{state}</dd><dt>Id</dt><dd>{id}</dd><dt>Owner</dt><dd>{owner}</dd>"
        "<dt>Cluster</dt><dd>{cluster}</dd><dt>Kind</dt><dd>{kind}</dd><dt>SLURM id</dt><dd>{slurm}</dd>"
        "<dt>Exit code</dt><dd>{exit}</dd><dt>Reason</dt><dd>{reason}</dd></dl>",
        state=_state(job.state),
        id=str(job.id),
        owner=job.owner,
        cluster=job.cluster,
        kind=job.kind.value,
        slurm=job.slurm_job_id or "—",
        exit="—" if job.exit_code is None else job.exit_code,
        reason=job.reason or "—",
    )
    script = (
        html("<details><summary>Script</summary><pre>{s}</pre></details>", s=job.spec.script)
        if job.spec.script
        else Html("")
    )
    body = html(
        '<h1 id="job-name">{name}</h1>{facts}{ask}<h2>Timeline</h2>{timeline}{tasks}<h2>Output</h2>'
        '<pre id="log" data-complete="false"></pre>{script}<h2>Accounting and efficiency</h2>{accounting}'
        "<h2>Bridges</h2>{bridges}<h2>Artifacts</h2>{artifacts}",
        name=job.name,
        facts=facts,
        # a link, not part of the page: an estimate is a round trip to the cluster's agent
        ask=html(
            '<p><a id="estimate-link" href="{id}/estimate">When would it start if submitted now, and '
            "what would it cost?</a></p>",
            id=str(job.id),
        ),
        timeline=_timeline(job, reached, datetime.now(UTC)),
        tasks=_tasks(job, tasks),
        script=script,
        accounting=_accounting(accounting, job),
        bridges=_bridges(job.bridges),
        artifacts=_artifacts(artifacts),
    )
    data = {
        "job": f"../api/jobs/{job.id}",
        "logs": f"../api/jobs/{job.id}/logs",
        "state": job.state.value,
        "terminal": "true" if job.state.terminal else "false",
        # the page reloads once every bridge answers (readiness is no state change)
        "bridges-pending": "true" if any(not b.ready for b in job.bridges) else "false",
    }
    return _page(job.name, body, nonce=nonce, base="../", user=user, data=data, script=_JOB_SCRIPT)


def estimate_page(job: Job, estimate: Estimate, *, nonce: str, user: str) -> str:
    """`/ui/jobs/{id}/estimate`: per partition the job may go to, when SLURM predicts it would start
    if submitted now (`sbatch --test-only`) or why it would not take it, and its cost to its time
    limit in the site's units; the earliest partition (what `partition: auto` would choose) marked."""
    unit = estimate.unit or ""
    rows = _join(
        html(
            "<tr{mark}><td>{partition}</td><td>{start}</td><td>{cost}</td><td>{error}</td></tr>",
            mark=Html(' class="earliest"') if e.partition == estimate.earliest else Html(""),
            partition=e.partition or "(the cluster's default)",
            start=_time(e.start),
            cost="—" if e.cost is None else f"{e.cost:g} {unit}".strip(),
            error=e.error or "",
        )
        for e in estimate.partitions
    )
    body = html(
        '<h1 id="job-name">{name}</h1><h2>If it were submitted now</h2><p class="muted">SLURM\'s '
        "prediction on cluster {cluster}, asked just now; a cost assumes the job runs to its time "
        'limit.</p><table id="estimate"><thead><tr><th>Partition</th><th>Predicted start</th>'
        "<th>Cost</th><th>SLURM would not take it</th></tr></thead><tbody>{rows}</tbody></table>"
        '<p>Earliest: <strong id="earliest">{earliest}</strong></p><p><a href="../{id}">Back to the '
        "job</a></p>",
        name=job.name,
        cluster=estimate.cluster,
        rows=rows,
        earliest=estimate.earliest or "none (SLURM would start it on no partition)",
        id=str(job.id),
    )
    return _page(f"{job.name}: estimate", body, nonce=nonce, base="../../", user=user)
