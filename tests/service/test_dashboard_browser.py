"""The operator console in a real browser (headless Chromium through chromedriver, Debian's
packages, installed here when missing) against a real local stack: Valkey, SeaweedFS,
SQLite, the API, the scheduler and a Celery worker rendering a tiny random-weight model on
the CPU.

Jobs in every state are real: completed and running on the tiny model, failed on a copy
whose transformer weights are cut short (the worker's load fails, as in test_bulk.py),
queued on a model whose pool has no worker, cancelled through the API. The page's numbers
are checked against the database; a completed video plays inline; a queued job is cancelled
and a failed one retried from the page, and the database shows it; an operator's key sees
another tenant's job. Screenshots go to the test's tmp_path. Every wait is on a condition.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from fvb_core.api_keys import create_api_key
from fvb_core.db.models import Job, JobEvent, Worker
from fvb_core.db.session import session_scope
from fvb_tools.localstack.stack import LocalStack

pytestmark = pytest.mark.timeout(900)

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
WEIGHTS = Path("transformer") / "diffusion_pytorch_model.safetensors"
FAST = {"size": "64x64", "seconds": "1", "fps": 8, "num_inference_steps": 2}
#: Minutes on a CPU: it is seen running, then cancelled from the page,
#: which stops it at its next step.
SLOW = {"size": "256x256", "seconds": "4", "fps": 8, "num_inference_steps": 100}


def _install_chromium() -> None:
    """Debian's chromium and its matching chromedriver, unless both are there."""
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return
    if shutil.which("apt-get") is None:
        pytest.fail("chromium is missing and there is no apt-get to install it with")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends"]
    install += ["chromium", "chromium-driver"]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True, capture_output=True)
        subprocess.run(install, env=env, check=True, capture_output=True)
    assert CHROMIUM.exists() and CHROMEDRIVER.exists()


@pytest.fixture(scope="module")
def browser():
    _install_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",  # we run as root
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        "--autoplay-policy=no-user-gesture-required",
        "--mute-audio",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from fastvideo.testing.tiny_wan import TinyWanConfig, save_tiny_wan
    from fvb_core.models_config import write_models_config

    root = tmp_path_factory.mktemp("console")
    good, broken = root / "models" / "tiny", root / "models" / "broken"
    save_tiny_wan(good, TinyWanConfig(), seed=0)
    shutil.copytree(good, broken)
    (broken / WEIGHTS).write_bytes((good / WEIGHTS).read_bytes()[:100])
    config = root / "models.toml"
    entry = {"default_size": "64x64", "max_frames": 33}
    write_models_config(
        config,
        {
            "tiny-wan-t2v": {"path": good, **entry},
            "tiny-broken": {"path": broken, **entry},
            # A pool no worker serves: its jobs stay queued.
            "tiny-idle": {"path": good, "pool": "idle", **entry},
        },
    )
    local = LocalStack(data_dir=root / "stack", device="cpu", models_config=config)
    info = local.start()
    try:
        yield info
    finally:
        local.stop()


# --- helpers -----------------------------------------------------------------------------


def wait_for(condition, timeout: float, what: str, every: float = 0.1):
    """``condition()``'s first truthy value; fails naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as err:
            last_error = err
        time.sleep(every)
    pytest.fail(f"timed out after {timeout} s waiting for {what} (last error: {last_error!r})")


class Db:
    def __init__(self, url: str) -> None:
        self.url = url

    def job(self, job_id: str) -> Job:
        with session_scope(self.url) as session:
            job = session.get(Job, job_id)
            session.expunge(job)
            return job

    def status(self, job_id: str) -> str:
        return self.job(job_id).status

    def counts(self, tenant: str) -> Counter:
        with session_scope(self.url) as session:
            rows = session.execute(
                select(Job.status, func.count())
                .where(Job.tenant == tenant, Job.deleted_at.is_(None))
                .group_by(Job.status)
            ).all()
        return Counter(dict(rows))

    def job_ids(self, tenant: str) -> dict[str, str]:
        with session_scope(self.url) as session:
            rows = session.execute(
                select(Job.id, Job.status).where(Job.tenant == tenant, Job.deleted_at.is_(None))
            ).all()
        return dict(rows)

    def events(self, job_id: str) -> list[tuple]:
        with session_scope(self.url) as session:
            return [
                tuple(row)
                for row in session.execute(
                    select(JobEvent.from_status, JobEvent.to_status, JobEvent.detail)
                    .where(JobEvent.job_id == job_id)
                    .order_by(JobEvent.id)
                ).all()
            ]


def submit(api: httpx.Client, model: str, prompt: str, **fields) -> str:
    response = api.post("/v1/videos", json={"model": model, "prompt": prompt, **fields})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def text(driver, css: str) -> str:
    return driver.find_element("css selector", css).text


def shot(driver, folder: Path, name: str) -> None:
    assert driver.save_screenshot(str(folder / f"{name}.png"))


def open_view(driver, base: str, fragment: str) -> None:
    driver.execute_script("location.hash = arguments[0]", fragment)
    wait_for(lambda: driver.execute_script("return location.hash") == fragment, 5, fragment)


def card_values(driver) -> dict[str, int]:
    cards = driver.find_elements("css selector", "#counts .card")
    return {
        card.get_attribute("id").removeprefix("count-"): int(card.get_attribute("data-value"))
        for card in cards
    }


def expected_cards(counts: Counter) -> dict[str, int]:
    return {
        "queued": counts["queued"],
        "in_progress": counts["running"],
        "completed": counts["succeeded"],
        "failed": counts["failed"],
        "cancelled": counts["cancelled"],
        "total": sum(counts.values()),
    }


def badge_state(driver, css: str = "#job-badge .badge") -> str | None:
    badges = driver.find_elements("css selector", css)
    return badges[0].get_attribute("data-state") if badges else None


# --- the test ----------------------------------------------------------------------------


def test_console_shows_the_database_plays_a_video_and_acts_on_jobs(stack, browser, tmp_path):
    started = time.monotonic()
    db = Db(stack.env["FVB_DATABASE_URL"])
    base = stack.api_url.removesuffix("/v1")
    with session_scope(db.url) as session:
        other_key = create_api_key(session, "other-tenant")
        operator_key = create_api_key(session, "ops", operator=True)
    api = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {stack.dev_key}"})
    other = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {other_key}"})

    ok = submit(api, "tiny-wan-t2v", "a red panda in the snow", seed=1, **FAST)
    broken = submit(api, "tiny-broken", "waves on a rocky shore", seed=2, **FAST)
    slow = submit(api, "tiny-wan-t2v", "a slow sunrise over the sea", seed=3, **SLOW)
    queued = [
        submit(api, "tiny-idle", f"a queued lighthouse number {i}", seed=i, **FAST)
        for i in range(3)
    ]
    assert api.post(f"/v1/videos/{queued[2]}/cancel").json()["status"] == "failed"  # cancelled
    foreign = submit(other, "tiny-idle", "another tenant's secret prompt", **FAST)

    wait_for(lambda: db.status(ok) == "succeeded", 120, "the fast job to succeed")
    wait_for(lambda: db.status(broken) == "failed", 60, "the broken model's job to fail")
    wait_for(lambda: db.status(slow) == "running", 60, "the slow job to start")
    assert db.job(broken).error_code == "model_load_failed"

    # --- overview: the cards are the database's counts ---
    browser.get(stack.dashboard_url)
    wait_for(lambda: browser.find_elements("css selector", "#counts .card"), 20, "the cards")
    assert "key=" not in browser.current_url  # the key left the address bar
    wait_for(
        lambda: card_values(browser) == expected_cards(db.counts("dev")),
        10,
        "the cards to match the database",
    )
    cards = card_values(browser)
    assert cards["queued"] == 2 and cards["cancelled"] == 1 and cards["failed"] == 1
    assert cards["completed"] >= 1 and cards["total"] == 6
    data = api.get("/dashboard/data").json()
    throughput = browser.find_element("id", "chart-throughput")
    if "charts" in data:  # drawn from the JSON: the same totals
        wait_for(
            lambda: (
                int(throughput.get_attribute("data-completed") or -1)
                == sum(
                    m["completed"]
                    for m in api.get("/dashboard/data").json()["charts"]["per_minute"]
                )
            ),
            10,
            "the throughput chart's totals",
        )
        assert int(throughput.get_attribute("data-completed")) >= 1
    else:  # a server that sends no charts yet: an empty state, not an error
        assert "No chart data" in throughput.text
    shot(browser, tmp_path, "01-overview")

    # --- jobs: every job of the tenant, in its state ---
    open_view(browser, base, "#/jobs")

    def rows() -> dict[str, str]:
        return {
            row.get_attribute("data-job"): row.get_attribute("data-state")
            for row in browser.find_elements("css selector", "#jobs tr[data-job]")
        }

    wait_for(lambda: rows() == db.job_ids("dev"), 10, "the jobs table to match the database")
    assert foreign not in rows()
    assert not browser.find_element("id", "th-tenant").is_displayed()  # a tenant's key
    # Filter by state, then search the prompt text, through the form.
    browser.find_element("css selector", "#f-state option[value=queued]").click()
    browser.find_element("css selector", "#job-filters button[type=submit]").click()
    wait_for(lambda: set(rows()) == set(queued[:2]), 10, "the queued filter")
    browser.find_element("id", "f-reset").click()
    wait_for(lambda: "state=" not in browser.current_url, 5, "the reset")
    browser.find_element("id", "f-q").send_keys("PANDA")
    browser.find_element("css selector", "#job-filters button[type=submit]").click()
    wait_for(lambda: list(rows()) == [ok], 10, "the prompt search")
    shot(browser, tmp_path, "02-jobs-search")

    # --- a completed job: its page, and its video playing inline ---
    browser.find_element("css selector", f'#jobs tr[data-job="{ok}"]').click()
    wait_for(lambda: text(browser, "#job-id") == ok, 10, "the job page")
    job = db.job(ok)
    player = wait_for(
        lambda: browser.find_elements("css selector", f'video#player[data-job="{ok}"]'),
        10,
        "the video element",
    )[0]
    ready = wait_for(
        lambda: browser.execute_script(
            "const v = arguments[0]; return v.readyState >= 2 && v.duration > 0"
            " ? [v.readyState, v.duration, v.videoWidth, v.videoHeight, v.error] : null",
            player,
        ),
        20,
        "the video to load",
    )
    frames, fps = job.result["frames"], job.result["fps"]
    assert (frames, fps) == (9, 8)  # 1 s at 8 fps -> the VAE's 4k+1
    assert abs(ready[1] - frames / fps) <= 1 / fps + 0.01, ready
    assert ready[2:] == [64, 64, None]
    played = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "arguments[0].play().then(() => done(true), (err) => done(String(err)));",
        player,
    )
    assert played is True, played
    wait_for(
        lambda: browser.execute_script("return arguments[0].currentTime > 0", player),
        10,
        "the video to play",
    )
    assert text(browser, "#job-prompt") == "a red panda in the snow"
    events = browser.find_elements("css selector", "#job-events tr[data-to]")
    assert [e.get_attribute("data-to") for e in events] == [to for _, to, _ in db.events(ok)]
    stages = {
        e.get_attribute("data-stage") for e in browser.find_elements("css selector", ".timing")
    }
    assert stages == set(job.stage_timings) and stages
    params = browser.find_element("id", "job-params").text
    assert "num_inference_steps\n2" in params and f"seed\n{job.params['seed']}" in params
    shot(browser, tmp_path, "03-job-playing")

    # --- the running job is shown running; cancelled from the page, it stops ---
    open_view(browser, base, f"#/jobs/{slow}")
    wait_for(lambda: badge_state(browser) == "running", 10, "the running badge")
    assert db.status(slow) == "running"
    shot(browser, tmp_path, "04-job-running")
    browser.find_element("id", "job-cancel").click()
    wait_for(lambda: db.status(slow) == "cancelled", 60, "the running job to stop")
    wait_for(lambda: badge_state(browser) == "cancelled", 10, "the page to show it cancelled")

    # --- cancel a queued job from the page ---
    open_view(browser, base, f"#/jobs/{queued[0]}")
    wait_for(lambda: badge_state(browser) == "queued", 10, "the queued badge")
    assert browser.find_element("id", "job-retry").get_attribute("disabled") is not None
    browser.find_element("id", "job-cancel").click()
    wait_for(lambda: badge_state(browser) == "cancelled", 10, "the cancel to show")
    assert db.status(queued[0]) == "cancelled"
    assert db.events(queued[0])[-1][:2] == ("queued", "cancelled")

    # --- retry the failed one from the page: a new attempt, in the database ---
    open_view(browser, base, f"#/jobs/{broken}")
    wait_for(lambda: text(browser, "#job-error-code") == "model_load_failed", 10, "the error")
    before = db.job(broken)
    shot(browser, tmp_path, "05-job-failed")
    browser.find_element("id", "job-retry").click()
    wait_for(lambda: ("failed", "queued", "retry") in db.events(broken), 10, "the retry")
    after = db.job(broken)
    assert after.max_attempts == before.attempt + 3 and after.error_code in (
        None,
        "model_load_failed",
    )
    wait_for(lambda: badge_state(browser) in ("queued", "running", "failed"), 10, "the page")

    # --- a batch: its numbers, the manifest download, cancel from the page ---
    requests = [{"model": "tiny-idle", "prompt": f"batch shot {i}", **FAST} for i in (1, 2)]
    created = api.post("/v1/batches", json={"name": "console-batch", "requests": requests})
    assert created.status_code == 200, created.text
    batch_id = created.json()["id"]
    open_view(browser, base, "#/batches")
    row_css = f'#batches tr[data-batch="{batch_id}"]'
    wait_for(lambda: browser.find_elements("css selector", row_css), 10, "the batch listed")
    browser.find_element("css selector", row_css).click()
    wait_for(lambda: text(browser, "#batch-id") == batch_id, 10, "the batch page")

    def facts() -> dict[str, str]:
        items = browser.find_elements("css selector", "#batch-facts dd[data-fact]")
        return {item.get_attribute("data-fact"): item.text for item in items}

    with session_scope(db.url) as session:
        members = dict(
            session.execute(select(Job.id, Job.status).where(Job.batch_id == batch_id)).all()
        )
    assert list(members.values()) == ["queued", "queued"]
    wait_for(lambda: facts().get("total") == "2" and facts()["queued"] == "2", 10, "its counts")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    browser.execute_cdp_cmd(
        "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
    )
    browser.find_element("id", "batch-export").click()
    manifest = downloads / f"{batch_id}.manifest.jsonl"
    wait_for(manifest.exists, 10, "the manifest download")
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert sorted(line["video_id"] for line in lines) == sorted(members)
    shot(browser, tmp_path, "06-batch")
    browser.find_element("id", "batch-cancel").click()
    wait_for(lambda: {db.status(j) for j in members} == {"cancelled"}, 10, "the batch cancel")
    wait_for(lambda: facts().get("cancelled") == "2", 10, "the page to show it cancelled")

    # --- the overview again: the numbers follow without a reload ---
    open_view(browser, base, "#/overview")
    wait_for(
        lambda: card_values(browser) == expected_cards(db.counts("dev")),
        15,
        "the cards to follow the changes",
    )

    # --- an operator's key sees the other tenant's job, and may open it ---
    key_input = browser.find_element("id", "key-input")
    key_input.send_keys(operator_key)
    browser.find_element("css selector", "#key-form button[type=submit]").click()
    wait_for(lambda: browser.find_elements("id", "operator-badge"), 10, "the operator badge")
    open_view(browser, base, "#/jobs")
    wait_for(lambda: foreign in rows() and ok in rows(), 10, "every tenant's jobs")
    assert browser.find_element("id", "th-tenant").is_displayed()
    cell = browser.find_element("css selector", f'#jobs tr[data-job="{foreign}"] td[data-tenant]')
    assert cell.text == "other-tenant"
    shot(browser, tmp_path, "07-operator-jobs")
    open_view(browser, base, f"#/jobs/{foreign}")
    wait_for(lambda: "another tenant's secret prompt" in text(browser, "#job-prompt"), 10, "it")
    browser.find_element("id", "job-cancel").click()
    wait_for(lambda: db.status(foreign) == "cancelled", 10, "the operator's cancel")

    # --- workers: an operator sees every live worker, idle or not ---
    open_view(browser, base, "#/workers")
    with session_scope(db.url) as session:
        live = set(session.scalars(select(Worker.id).where(Worker.stopped_at.is_(None))))
    assert len(live) == 1
    wait_for(
        lambda: (
            {
                row.get_attribute("data-worker")
                for row in browser.find_elements("css selector", "#fleet tr[data-worker]")
            }
            == live
        ),
        10,
        "the workers table to list the live worker",
    )
    assert "default" in text(browser, "#fleet")
    shot(browser, tmp_path, "08-workers")
    assert time.monotonic() - started < 180
