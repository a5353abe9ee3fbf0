"""#15 item 4: porter's web view in a real browser. porter and the submitter run as processes against
the testbed's SLURM; Debian's headless `chromium` is driven over the DevTools protocol (a websocket,
with websocket-client, which the kubernetes client of the test extra brings).

Chromium runs as root with `--no-sandbox`, its DevTools bound to 127.0.0.1 on a port it picks
itself, its profile in the test's temporary directory, and is stopped by its PID. Screenshots of the
main pages go to `$CLOUDHPC_WEB_SCREENSHOTS` when it is set (`docs/images/` for the docs), to the
temporary directory otherwise, so an ordinary run leaves the tree unchanged.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import websocket
import yaml

from cloudhpc.client import Client
from cloudhpc.domain.jobs import Job
from cloudhpc.domain.states import JobState
from cloudhpc.store import Store
from tests.e2e.harness import Deployment, bridged_deployment, running
from tests.e2e.ray_jobs import ray_spec
from tests.testbed import Testbed

TIMEOUT = 120.0
DEBUG_RATE = 1.0
"""BU per CPU hour on the testbed's `debug` partition (the web view's deployment)."""
NO_SUCH_PARTITION = "gpu"
"""A partition the configuration rates and SLURM does not have: its estimate is a refusal."""
HOSTILE_LOG = (
    """<script>document.title="pwned-log"</script><img src=x onerror="document.title='pwned-img'">"""
)
HOSTILE_FILE = """<img src=x onerror="document.title='pwned-file'">.txt"""
SCRIPT = (
    "#!/bin/bash\n"
    '# <script>document.title="pwned-script"</script>\n'
    'echo "web view test start"\n'
    "cat -- *.txt\n"
    "echo\n"
    'for i in 1 2 3 4 5 6 7 8; do echo "tick $i"; sleep 1; done\n'
    'echo "web view test done"\n'
)


class Chromium:
    """One headless Chromium and one page of it, driven over the DevTools protocol."""

    def __init__(self, profile: Path) -> None:
        chromium = shutil.which("chromium")
        assert chromium, "Debian's chromium is not installed (apt-get install chromium)"
        profile.mkdir(parents=True, exist_ok=True)
        self.log = (profile.parent / "chromium.log").open("ab")
        self.proc = subprocess.Popen(
            [
                chromium,
                "--headless",
                "--no-sandbox",  # as root, Chromium refuses to start with its sandbox
                "--disable-gpu",
                "--no-first-run",
                "--no-default-browser-check",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile}",
                "--window-size=1280,900",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=self.log,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            assert self.proc.poll() is None, f"chromium exited {self.proc.returncode}"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(t for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.ids = itertools.count(1)
        self.send("Page.enable")
        self.send("Runtime.enable")

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        call = next(self.ids)
        self.ws.send(json.dumps({"id": call, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == call:
                assert "error" not in message, (method, message["error"])
                result: dict[str, Any] = message["result"]
                return result

    def eval(self, expression: str) -> Any:
        answer = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in answer, (expression, answer["exceptionDetails"])
        return answer["result"].get("value")

    def goto(self, url: str) -> None:
        self.send("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'")

    def wait_for(self, expression: str, timeout: float = 30) -> Any:
        """The expression's value once it is truthy (it is evaluated in whatever page is loaded)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.eval(expression)
            except AssertionError:
                value = None  # the page is between two documents
            if value:
                return value
            if time.monotonic() > deadline:
                where = self.eval("location.href + ': ' + (document.body ? document.body.innerText : '')")
                raise AssertionError(f"not true after {timeout}s: {expression}; at {where[:2000]}")
            time.sleep(0.2)

    def text(self, selector: str) -> str:
        value: str = self.eval(f"(document.querySelector({json.dumps(selector)}) || {{}}).textContent || ''")
        return value

    def screenshot(self, name: str, fallback: Path) -> Path:
        folder = Path(os.environ.get("CLOUDHPC_WEB_SCREENSHOTS") or fallback)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        size = self.send("Page.getLayoutMetrics")["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        shot = self.send("Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def close(self) -> None:
        self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)
        self.log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    chromium = Chromium(tmp_path_factory.mktemp("chromium") / "profile")
    try:
        yield chromium
    finally:
        chromium.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots go unless $CLOUDHPC_WEB_SCREENSHOTS says otherwise."""
    return tmp_path_factory.mktemp("screenshots")


@pytest.fixture(scope="module")
def web(
    tmp_path_factory: pytest.TempPathFactory, testbed: Testbed, browser: Chromium, shots: Path
) -> Iterator[dict[str, Any]]:
    """porter and the submitter on the testbed (alice's token, and bob's), and the browser."""
    root = tmp_path_factory.mktemp("web")
    dep = Deployment(root / "deploy", testbed, f"sqlite:///{root / 'state.db'}")
    # rates for the estimate page: the testbed's `debug`, and a partition SLURM does not have
    config = yaml.safe_load(dep.config.read_text())
    config["clusters"]["testbed"]["billing"] = {
        "unit": "BU",
        "partitions": {"debug": {"cpu_hour": DEBUG_RATE}, NO_SUCH_PARTITION: {"cpu_hour": 4 * DEBUG_RATE}},
    }
    dep.config.write_text(yaml.safe_dump(config))
    store = Store(dep.database)
    try:
        bob_token = store.create_token("bob", "user")
        store.create_token("bob", "agent", ["testbed"])  # bob may use the cluster too
    finally:
        store.close()
    with running(dep):
        yield {"dep": dep, "bob": bob_token, "browser": browser, "shots": shots}


def _login(browser: Chromium, url: str, token: str) -> None:
    """Log in through the form, after the header's "Log out" when someone is logged in already
    (the module's tests share one browser, and one test may log in as alice, then as bob)."""
    browser.goto(f"{url}/ui/")
    logout = "document.querySelector('header form[action$=\"logout\"]')"
    if browser.eval(f"{logout} !== null"):
        browser.eval(f"{logout}.submit()")
    browser.wait_for("location.pathname === '/ui/login' && document.readyState === 'complete'")
    browser.eval(
        f"document.querySelector('input[name=token]').value = {json.dumps(token)};"
        "document.querySelector('form[action=login]').submit()"
    )
    browser.wait_for("location.pathname === '/ui/' && document.readyState === 'complete'")


def _wait_state(client: Client, job: Job, done: Callable[[Job], bool]) -> Job:
    deadline = time.monotonic() + TIMEOUT
    while not done(current := client.get(job)):
        assert time.monotonic() < deadline, current
        time.sleep(0.3)
    return current


def test_web_view_in_chromium(web: dict[str, Any]) -> None:
    dep: Deployment = web["dep"]
    browser: Chromium = web["browser"]
    shots: Path = web["shots"]
    with dep.client() as alice, Client(dep.url, web["bob"]) as bob:
        job = alice.submit(
            {
                "name": "web-hostile",
                "cluster": "testbed",
                "script": SCRIPT,
                "files": {HOSTILE_FILE: HOSTILE_LOG + "\n"},
                "resources": {"time": "5"},
            }
        )
        array = alice.submit(
            {
                "name": "web-array",
                "cluster": "testbed",
                "script": '#!/bin/bash\n#SBATCH --array=0-2\n[ "$SLURM_ARRAY_TASK_ID" = 1 ] && exit 3\nexit 0\n',
                "resources": {"time": "5"},
            }
        )
        theirs = bob.submit(
            {"name": "bob-private", "cluster": "testbed", "script": "#!/bin/bash\necho bob\n"}
        )

        # the login page sets the cookie; scripts cannot read it (HttpOnly)
        _login(browser, dep.url, dep.user_token)
        assert browser.eval("document.cookie") == ""

        # the job list: alice's job with its state, live; bob's job nowhere
        assert browser.wait_for(f"document.querySelector('tr[data-job=\"{job.id}\"]') !== null")
        assert browser.text(f'tr[data-job="{job.id}"] a') == "web-hostile"
        assert str(theirs.id) not in browser.eval("document.documentElement.outerHTML")
        assert "bob-private" not in browser.eval("document.body.textContent")
        _wait_state(alice, job, lambda j: j.state == JobState.RUNNING)
        # no navigation from here: the page's own polling shows the new state
        browser.wait_for(f"document.querySelector('tr[data-job=\"{job.id}\"]').dataset.state === 'running'")

        # the job page while it runs: its log follows live, then completes
        browser.goto(f"{dep.url}/ui/jobs/{job.id}")
        assert browser.text("#job-name") == "web-hostile"
        seen_partial = False
        deadline = time.monotonic() + TIMEOUT
        while True:
            log = browser.text("#log")
            seen_partial = seen_partial or ("tick" in log and "web view test done" not in log)
            if (
                browser.eval(
                    "document.getElementById('log') && document.getElementById('log').dataset.complete"
                )
                == "true"
            ):
                break
            assert time.monotonic() < deadline, log
            time.sleep(0.3)
        assert seen_partial, "the log was only ever seen whole: it did not follow the running job"
        log = browser.text("#log")
        assert "web view test start" in log
        assert "tick 8" in log
        assert log.rstrip().endswith("web view test done")
        assert HOSTILE_LOG in log  # shown as text

        # accounting and artifacts arrive after the end: reload until they are shown
        deadline = time.monotonic() + TIMEOUT
        while not browser.eval(
            "document.getElementById('accounting') !== null && document.getElementById('artifacts') !== null"
        ):
            assert time.monotonic() < deadline, browser.text("main")
            time.sleep(1)
            browser.goto(f"{dep.url}/ui/jobs/{job.id}")
        browser.wait_for("document.getElementById('log').dataset.complete === 'true'")
        timeline = browser.text("#timeline")
        for stage in ("pending", "queued", "running", "completed"):
            assert stage in timeline
        assert "cpu efficiency" in browser.text("#accounting")
        names = browser.eval("[...document.querySelectorAll('#artifacts a')].map(a => a.textContent)")
        assert "output.log" in names
        assert f"files/{HOSTILE_FILE}" in names  # an artifact named like markup, shown as its name
        downloaded = browser.eval(
            "(async () => { const a = [...document.querySelectorAll('#artifacts a')]"
            ".find(a => a.textContent === 'output.log'); return await (await fetch(a.href)).text(); })()"
        )
        assert "web view test done" in downloaded
        hostile = (
            browser.eval(  # a name to quote in the link (spaces, quotes, `=`, `<`): the view's route too
                "(async () => { const a = [...document.querySelectorAll('#artifacts a')]"
                f".find(a => a.textContent === {json.dumps('files/' + HOSTILE_FILE)});"
                " const r = await fetch(a.href); return [r.status, new URL(a.href).pathname]; })()"
            )
        )
        assert hostile[0] == 200, hostile
        assert hostile[1].startswith("/ui/"), hostile

        # nothing of the job's own text ran or became markup
        assert browser.eval("document.title") == "web-hostile · cloudhpc"
        assert browser.eval("document.querySelectorAll('main img, main script').length") == 0
        assert browser.eval("document.getElementById('log').childElementCount") == 0
        assert '<script>document.title="pwned-script"</script>' in browser.text("details pre")
        browser.screenshot("web-job.png", shots)

        browser.goto(f"{dep.url}/ui/")
        browser.wait_for(f"document.querySelector('tr[data-job=\"{job.id}\"]').dataset.state === 'completed'")
        browser.screenshot("web-jobs.png", shots)

        # an array job's page lists its tasks, each with its own state and exit code
        _wait_state(alice, array, lambda j: j.state.terminal)
        browser.goto(f"{dep.url}/ui/jobs/{array.id}")
        rows = browser.eval(
            "[...document.querySelectorAll('#tasks tbody tr')].map(r => [...r.cells].map(c => c.textContent))"
        )
        assert [(r[0], r[1], r[3]) for r in rows] == [
            ("0", "completed", "0"),
            ("1", "failed", "3"),
            ("2", "completed", "0"),
        ]

        # another user's job: a 404 page, and the polled API mirror says 404 as well
        browser.goto(f"{dep.url}/ui/jobs/{theirs.id}")
        assert browser.text("h1") == "404"
        assert "bob-private" not in browser.eval("document.body.textContent")
        status = browser.eval(f"fetch('/ui/api/jobs/{theirs.id}').then(r => r.status)")
        assert status == 404
        status = browser.eval(f"fetch('/ui/api/jobs/{theirs.id}/logs').then(r => r.status)")
        assert status == 404


def test_login_cookie_and_refusals(web: dict[str, Any]) -> None:
    dep: Deployment = web["dep"]
    with httpx.Client(base_url=dep.url, timeout=30) as http:
        # no token: to the login page; a bad token: 401 and no cookie
        answer = http.get("/ui/", follow_redirects=False)
        assert answer.status_code == 303
        assert answer.headers["location"] == "./login"
        answer = http.post("/ui/login", data={"token": "chpc_not-a-token"}, follow_redirects=False)
        assert answer.status_code == 401
        assert "set-cookie" not in answer.headers
        assert "invalid or revoked token" in answer.text
        # a page asked for before the login is where the login goes back to
        wanted = "jobs/00000000-0000-4000-8000-000000000000"
        answer = http.get(f"/ui/{wanted}", follow_redirects=False)
        assert answer.status_code == 303
        assert answer.headers["location"] == f"../login?next={wanted}"
        form = http.get(f"/ui/login?next={wanted}").text
        assert f'name="next" value="{wanted}"' in form
        answer = http.post(
            "/ui/login", data={"token": dep.user_token, "next": wanted}, follow_redirects=False
        )
        assert answer.headers["location"] == f"./{wanted}"
        # a login posted from another site's page (login CSRF)
        answer = http.post(
            "/ui/login",
            data={"token": dep.user_token},
            headers={"Origin": "http://elsewhere.example"},
            follow_redirects=False,
        )
        assert answer.status_code == 403
        assert "set-cookie" not in answer.headers
        # the cookie: the token only, HttpOnly, SameSite=Strict, not Secure over http, no Path
        answer = http.post(
            "/ui/login",
            data={"token": dep.user_token, "next": "https://evil.example/"},
            follow_redirects=False,
        )
        assert answer.status_code == 303
        assert answer.headers["location"] == "./"
        cookie = answer.headers["set-cookie"]
        attributes = [a.strip().lower() for a in cookie.split(";")]
        assert attributes[0] == f"cloudhpc_ui={dep.user_token}".lower()
        assert "httponly" in attributes
        assert "samesite=strict" in attributes
        assert not any(a.startswith(("secure", "path=", "domain=", "max-age", "expires")) for a in attributes)
        # pages carry a CSP that only lets their own nonce'd scripts run
        page = http.get("/ui/", headers={"Authorization": f"Bearer {dep.user_token}"})
        assert page.status_code == 200
        assert "script-src 'nonce-" in page.headers["content-security-policy"]
        # an agent token is not for the web view
        store = Store(dep.database)
        try:
            agent = store.create_token("carol", "agent", ["testbed"])
        finally:
            store.close()
        answer = http.post("/ui/login", data={"token": agent}, follow_redirects=False)
        assert answer.status_code == 403
        assert "set-cookie" not in answer.headers


def test_estimate_page_in_chromium(web: dict[str, Any]) -> None:
    """The job page's estimate link: per partition SLURM's predicted start (or its refusal) and the
    cost at the configured rate, the earliest partition marked so that it shows; bob gets no page."""
    dep: Deployment = web["dep"]
    browser: Chromium = web["browser"]
    with dep.client() as alice:
        job = alice.submit(
            {
                "name": "web-estimate",
                "cluster": "testbed",
                "script": "#!/bin/bash\ntrue\n",
                "resources": {"time": "00:30:00", "cpus_per_task": 2},
            }
        )
        # ended first: a running job's page reloads itself on its state's change, which would
        # cut the navigation short
        _wait_state(alice, job, lambda j: j.state.terminal)
        _login(browser, dep.url, dep.user_token)
        browser.goto(f"{dep.url}/ui/jobs/{job.id}")
        asked = datetime.now(UTC)
        browser.eval("document.getElementById('estimate-link').click()")
        browser.wait_for(
            f"location.pathname === '/ui/jobs/{job.id}/estimate' && document.readyState === 'complete'"
            " && document.getElementById('estimate') !== null",
            timeout=TIMEOUT,
        )
        assert browser.text("#job-name") == "web-estimate"
        assert browser.eval("document.title") == "web-estimate: estimate · cloudhpc"
        rows = browser.eval(
            "[...document.querySelectorAll('#estimate tbody tr')].map(r => ({"
            "cells: [...r.cells].map(c => c.textContent), earliest: r.classList.contains('earliest'),"
            "look: getComputedStyle(r.cells[0]).backgroundColor + ' ' + getComputedStyle(r.cells[0]).fontWeight"
            "}))"
        )
        shown = {r["cells"][0]: r for r in rows}
        assert list(shown) == ["debug", NO_SUCH_PARTITION], rows  # the configuration's order

        # debug: a predicted start (SLURM's, asked just now) and 2 CPUs x 0.5 h at its rate
        debug = shown["debug"]["cells"]
        start = datetime.strptime(debug[1], "%Y-%m-%d %H:%M:%S UTC").replace(tzinfo=UTC)
        assert start >= asked - timedelta(minutes=1), (start, asked)
        assert debug[2] == f"{2 * 0.5 * DEBUG_RATE:g} BU"
        assert debug[3] == ""
        # the partition SLURM does not have: no start, its cost, and SLURM's refusal
        other = shown[NO_SUCH_PARTITION]["cells"]
        assert other[1] == "—"
        assert other[2] == f"{2 * 0.5 * 4 * DEBUG_RATE:g} BU"
        assert "invalid partition" in other[3].lower(), other

        # the earliest is debug, marked in the table and said under it, and it looks different
        assert [r["cells"][0] for r in rows if r["earliest"]] == ["debug"]
        assert browser.text("#earliest") == "debug"
        assert shown["debug"]["look"] != shown[NO_SUCH_PARTITION]["look"], rows
        browser.screenshot("web-estimate.png", web["shots"])

        # the page submitted nothing, and links back to the job
        assert [j.id for j in alice.list(name="web-estimate")] == [job.id]
        browser.eval(
            "[...document.querySelectorAll('main a')].find(a => a.textContent === 'Back to the job').click()"
        )
        browser.wait_for(f"location.pathname === '/ui/jobs/{job.id}' && document.readyState === 'complete'")
        assert browser.text("#job-name") == "web-estimate"

    # bob, logged in: alice's job's estimate is the same 404 page as a job that does not exist
    _login(browser, dep.url, web["bob"])
    browser.goto(f"{dep.url}/ui/jobs/{job.id}/estimate")
    assert browser.text("h1") == "404"
    assert "web-estimate" not in browser.eval("document.body.textContent")
    assert browser.eval("document.getElementById('estimate')") is None


RAY_START = 900.0
"""Seconds for the Ray cluster's dashboard: may include building the Ray environment (as test_ray)."""


@pytest.mark.timeout(RAY_START + 300)
def test_ray_dashboard_link_works(tmp_path: Path, testbed: Testbed, browser: Chromium, shots: Path) -> None:
    """A ray-cluster's bridge on its job page: once it answers, the page shows it ready (without a
    reload by the user) and its link opens Ray's own dashboard in the browser."""
    dep = bridged_deployment(tmp_path, testbed)
    with running(dep), dep.client() as alice:
        job = alice.submit(ray_spec("web-ray", "ray-cluster", expose=["dashboard"]))
        try:
            _login(browser, dep.url, dep.user_token)
            browser.goto(f"{dep.url}/ui/jobs/{job.id}")
            assert browser.text("#bridges td") == "dashboard"
            ready = "[...document.querySelectorAll('#bridges td')].some(td => td.textContent === 'ready')"
            browser.wait_for(ready, timeout=RAY_START)
            link = browser.eval("document.querySelector('#bridges a').href")
            assert link.rstrip("/") == alice.ray_dashboard_url(job, timeout=10).rstrip("/")
            browser.screenshot("web-job-ray.png", shots)
            browser.goto(link)
            browser.wait_for("document.title.includes('Ray')", timeout=60)
        finally:
            alice.cancel(job)
            _wait_state(alice, job, lambda j: j.state.terminal)
