"""The web UI in a real browser: Debian's headless Chromium, driven by Playwright.

Playwright never downloads a browser here: it is given /usr/bin/chromium
(`.ci/run` installs Debian's `chromium`). Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from playwright.sync_api import Page, expect, sync_playwright

from attune_sse.storage.embedded import free_port
from attune_sse.testing import ServerProcess
from conftest import server_config
from helpers import every_worker, grant, make_pack, new_execution, pack_grants, touch

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"



@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    # Not a skip: without the browser these tests fail, saying what to install.
    assert Path(CHROMIUM).exists(), "Debian's chromium is missing: apt-get install chromium (scripts/bootstrap.sh does)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def ui_server(database: Any, tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Starts a server of the UI's own (on a port that survives its restart); stops it after the test."""
    started: list[ServerProcess] = []

    def start(**sections: Any) -> ServerProcess:
        sections["server"] = {"sse_retry_ms": 300, "sse_reconnect_spread_ms": 300, **sections.get("server", {})}
        srv = ServerProcess(server_config(database, **sections), tmp_path, port=free_port()).start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture
def page(browser: Any) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def open_ui(page: Page, ui_server: Callable[..., ServerProcess], user: dict[str, Any],
            **sections: Any) -> ServerProcess:
    """A fresh server, and the page logged in to it with its stream live."""
    srv = ui_server(**sections)
    page.goto(srv.base_url + "/")
    page.fill("input[name=login]", user["login"])
    page.fill("input[name=password]", user["password"])
    page.click("button[type=submit]")
    expect(page.locator("#connection")).to_have_attribute("data-status", "live", timeout=10_000)
    return srv


def row(page: Page, execution_id: int) -> Any:
    return page.locator(f"#executions tr[data-id='{execution_id}']")


def test_live_table_shows_an_update_made_in_sql_within_a_second(
    page: Page, ui_server: Any, user: dict[str, Any],
    new_execution: Any, set_status: Any,
) -> None:
    earlier = new_execution()
    open_ui(page, ui_server, user)
    expect(row(page, earlier)).to_be_visible()  # from the initial load
    execution_id = new_execution()
    expect(row(page, execution_id).locator(".status")).to_have_text("requested", timeout=1000)
    set_status(execution_id, "running")
    expect(row(page, execution_id).locator(".status")).to_have_text("running", timeout=1000)
    expect(row(page, execution_id).locator(".status")).to_have_class("status status-running")
    set_status(execution_id, "completed")
    expect(row(page, execution_id).locator(".status")).to_have_text("completed", timeout=1000)

    # Filters: by status, then by action.
    page.select_option("#filter-status", "completed")
    expect(row(page, execution_id)).to_be_visible()
    expect(row(page, earlier)).to_be_hidden()
    page.select_option("#filter-status", "")
    page.fill("#filter-action", "no-such-action")
    expect(row(page, execution_id)).to_be_hidden()
    page.fill("#filter-action", "")

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui-live.png"), full_page=True)


def test_indicator_follows_a_server_restart_and_no_update_is_lost(
    page: Page, ui_server: Any, user: dict[str, Any], db: Any,
    new_execution: Any, set_status: Any,
) -> None:
    srv = open_ui(page, ui_server, user)
    executions = [new_execution() for _ in range(3)]
    for execution_id in executions:
        expect(row(page, execution_id)).to_be_visible()

    srv.stop()
    expect(page.locator("#connection")).to_have_attribute("data-status", "reconnecting", timeout=10_000)
    # Changes while the server is down are in the event record; the browser resumes
    # from its Last-Event-ID when the server is back.
    for execution_id in executions:
        set_status(execution_id, "running")
        set_status(execution_id, "completed")
    srv.start()
    expect(page.locator("#connection")).to_have_attribute("data-status", "live", timeout=15_000)
    for execution_id in executions:
        expect(row(page, execution_id).locator(".status")).to_have_text("completed", timeout=5000)

    # Every event of these executions reached the page, the missed ones included.
    with db.cursor() as cur:
        cur.execute("SELECT id FROM attune.execution_event WHERE execution = ANY(%s) ORDER BY id",
                    (executions,))
        expected = [event_id for (event_id,) in cur.fetchall()]
    page.wait_for_function(
        "ids => ids.every(id => window.attuneState.recentIds.includes(id))", arg=expected, timeout=5000)


def test_detail_view_streams_one_execution_and_collapses_a_large_result(
    page: Page, ui_server: Any, user: dict[str, Any], db: Any,
    new_execution: Any, set_status: Any,
) -> None:
    open_ui(page, ui_server, user)
    execution_id = new_execution()
    other = new_execution()
    row(page, execution_id).click()
    expect(page.locator("#detail-id")).to_have_text(str(execution_id))
    expect(page.locator("#connection")).to_have_attribute("data-status", "live", timeout=10_000)
    with db.cursor() as cur:
        cur.execute("UPDATE attune.execution SET status = 'completed', result = %s WHERE id = %s",
                    (json.dumps({"lines": ["x" * 100] * 200}), execution_id))
    expect(page.locator("#detail-fields .status")).to_have_text("completed", timeout=2000)
    summary = page.locator("#detail-result details summary")
    expect(summary).to_contain_text("Large result")
    summary.click()
    expect(page.locator("#detail-result pre")).to_contain_text('"lines"')
    # Meanwhile another execution changed; back on the table, it shows (resumed, not lost).
    set_status(other, "failed")
    page.click("#back")
    expect(row(page, other).locator(".status")).to_have_text("failed", timeout=5000)
    expect(row(page, execution_id).locator(".status")).to_have_text("completed")


def test_expired_token_is_refreshed_and_the_stream_resumes(
    page: Page, ui_server: Any, user: dict[str, Any],
    new_execution: Any, set_status: Any,
) -> None:
    # Access tokens of 3 s: the server ends the stream with token_expired; the page
    # refreshes its token and reconnects from its last event.
    open_ui(page, ui_server, user, security={"jwt_access_expiration": 3})
    first_token = page.evaluate("window.attuneState.access")
    page.wait_for_function("t => window.attuneState.access !== t", arg=first_token, timeout=15_000)
    expect(page.locator("#connection")).to_have_attribute("data-status", "live", timeout=10_000)
    execution_id = new_execution()
    set_status(execution_id, "running")
    expect(row(page, execution_id).locator(".status")).to_have_text("running", timeout=5000)


def test_a_thousand_rows_and_a_hundred_updates_a_second(
    page: Page, ui_server: Any, user: dict[str, Any], db: Any, action: Any,
) -> None:
    with db.cursor() as cur:
        cur.execute("""INSERT INTO attune.execution (action, action_ref, status)
                       SELECT %s, %s, 'requested' FROM generate_series(1, 1000) RETURNING id""",
                    (action["id"], action["ref"]))
        ids = [row_id for (row_id,) in cur.fetchall()]
    open_ui(page, ui_server, user)
    page.wait_for_function("n => window.attuneState.rows.size >= n", arg=1000, timeout=20_000)
    # Frame gaps while 300 updates arrive at 100 per second.
    page.evaluate("""() => {
        window.gaps = []; let last = performance.now();
        const tick = (now) => {
            window.gaps.push(now - last); last = now; window.raf = requestAnimationFrame(tick);
        };
        window.raf = requestAnimationFrame(tick);
    }""")
    started = time.monotonic()
    with db.cursor() as cur:
        for i in range(300):
            cur.execute("UPDATE attune.execution SET status = 'running' WHERE id = %s", (ids[i],))
            time.sleep(max(0.0, started + (i + 1) / 100 - time.monotonic()))
    expect(row(page, ids[299]).locator(".status")).to_have_text("running", timeout=2000)
    stats = page.evaluate("""() => { cancelAnimationFrame(window.raf);
        const g = window.gaps.slice(1).sort((a, b) => a - b);
        return {frames: g.length, p95: g[Math.floor(g.length * 0.95)], max: g[g.length - 1]}; }""")
    running = page.locator("#executions tr[data-status=running]").count()
    assert running >= 300
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "ui-load.json").write_text(json.dumps({"rows": 1000, "updates": 300, **stats}, indent=2))
    assert stats["max"] < 500, f"the page stalled for {stats['max']:.0f} ms while updates came in"


def test_the_page_shows_only_what_the_identity_may_read_and_says_what_it_may_not_do(
    page: Page, ui_server: Any, database: Any,
) -> None:
    tag = uuid.uuid4().hex[:6]
    mine, theirs = make_pack(database, f"ui-a-{tag}"), make_pack(database, f"ui-b-{tag}")
    srv = ui_server()
    login = f"viewer-{tag}"
    registered = requests.post(srv.base_url + "/auth/register", json={"login": login, "password": "viewer-password"},
                               timeout=10)
    viewer = {**registered.json()["data"], "login": login, "password": "viewer-password"}
    viewer["id"] = viewer["user"]["id"]
    grant(database, viewer, f"ui.view{tag}", pack_grants(f"ui-a-{tag}", ("read",)))
    visible, hidden = new_execution(database, mine), new_execution(database, theirs)
    ((now,),) = database.query("SELECT generation FROM attune.access_generation")
    every_worker(srv, lambda ready: (ready["access"]["generation"] or 0) >= now, "it has seen the assignment")

    page.goto(srv.base_url + "/")
    page.fill("input[name=login]", login)
    page.fill("input[name=password]", viewer["password"])
    page.click("button[type=submit]")
    expect(page.locator("#connection")).to_have_attribute("data-status", "live", timeout=10_000)
    expect(row(page, visible)).to_be_visible()
    touch(database, hidden, "running")
    touch(database, visible, "running")
    expect(row(page, visible).locator(".status")).to_have_text("running", timeout=2000)
    expect(row(page, hidden)).to_have_count(0)  # neither from the table's load nor from the stream

    # An action it may not take: a message, and the page goes on.
    row(page, visible).click()
    expect(page.locator("#detail-fields")).to_contain_text(mine)
    page.click("#cancel")
    expect(page.locator("#detail-error")).to_have_text(f"You may not change execution {visible}.")
    touch(database, visible, "completed")
    expect(page.locator("#detail-fields .status")).to_have_text("completed", timeout=2000)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui-forbidden.png"), full_page=True)

    # Frozen: the server ends the stream with "signed out", and the page signs out.
    database.query("UPDATE attune.identity SET frozen = true WHERE id = %s", (viewer["id"],))
    expect(page.locator("#login-view")).to_be_visible(timeout=3000)
    expect(page.locator("#login-error")).to_have_text("Signed out: this identity was frozen or deleted.")
