"""The web console in a real browser: Playwright driving Debian's headless Chromium against a live
tiny-model server with two tenants' keys.

Skipped where the `playwright` package or a `chromium` binary is missing (`.ci/run` installs Chromium;
never `playwright install`, which downloads browsers). With UI_SCREENSHOT_DIR=docs/ui the tests also
write the README's screenshots there (they always take them, into the test's tmp dir otherwise):

    UI_SCREENSHOT_DIR=docs/ui .venv/bin/python -m pytest tests/ui/test_console_browser.py
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from softserve.service.auth import add_key
from tests.support.live_server import TINY_HIDDEN, LiveServer, adapter_config, prompt_bytes, tiny_model_dir, upload

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.process,  # chromium and a live server
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)"),
]
expect = sync_api.expect
VIEWPORT = {"width": 1280, "height": 800}
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def env(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("console")
    keyfile = root / "keys.yaml"
    keys = {"acme": add_key(keyfile, "acme"), "beta": add_key(keyfile, "beta")}
    server = LiveServer(root / "store", model=tiny_model_dir(tmp_path_factory, tokenizer), api_keys=keyfile,
                        log_dir=root / "logs", max_model_len=512)
    server.start()
    try:
        yield server, keys
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def shots(tmp_path):
    target = os.environ.get("UI_SCREENSHOT_DIR")
    out = Path(target) if target else tmp_path / "screenshots"
    out.mkdir(parents=True, exist_ok=True)

    def shot(page, name: str, full_page: bool = False) -> Path:
        path = out / f"{name}.png"
        page.screenshot(path=str(path), full_page=full_page)
        assert path.stat().st_size > 1000
        return path

    return shot


@pytest.fixture
def open_console(env, browser):
    """A fresh browser context per call (its own sessionStorage), signed in with a tenant's key."""
    server, keys = env
    contexts = []

    def open_(tenant: str | None, page_name: str = "registry"):
        context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.errors = errors
        page.goto(f"{server.url}/ui/#{page_name}")
        if tenant is not None:
            expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
            page.get_by_label("API key").fill(keys[tenant])
            page.get_by_role("button", name="Sign in").click()
            expect(page.locator("#who")).to_contain_text(f"tenant {tenant}")
        return page

    yield open_
    for context in contexts:
        context.close()


def _check_clean(page) -> None:
    """No script errors, and no JavaScript placeholders leaked into the visible text."""
    assert page.errors == []
    text = page.locator("main").inner_text()
    assert not re.search(r"\b(undefined|null|NaN)\b", text), text


UNLABELLED_CONTROLS_JS = """() => [...document.querySelectorAll('input, select, textarea, button')]
    .filter((e) => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())
    .map((e) => e.outerHTML)"""


def _wait_until(page, condition, timeout_s: float = TIMEOUT_MS / 1000) -> None:
    """Poll from Python (the console's CSP forbids the string eval that page.wait_for_function uses)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        page.wait_for_timeout(200)


def _api(env, tenant):
    server, keys = env
    return server.client(keys[tenant])


def _write_adapter(directory: Path, seed: int, k: int) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_model.safetensors").write_bytes(prompt_bytes(seed, k, TINY_HIDDEN, 0.05))
    (directory / "adapter_config.json").write_bytes(adapter_config(k))
    return [str(directory / "adapter_model.safetensors"), str(directory / "adapter_config.json")]


def test_sign_in_upload_versions_rollback_download(open_console, env, tmp_path, shots):
    server, keys = env
    page = open_console(None)
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    page.get_by_label("API key").fill("sk-ss-wrong")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#login-error")).to_contain_text("not accepted")
    shots(page, "login")
    page.get_by_label("API key").fill(keys["acme"])
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#who")).to_contain_text("tenant acme (user)")
    # the key lives in this tab's sessionStorage only
    assert page.evaluate("sessionStorage.getItem('softserve.apiKey')") == keys["acme"]
    assert page.evaluate("localStorage.length") == 0 and page.context.cookies() == []
    assert page.evaluate(UNLABELLED_CONTROLS_JS) == []  # every control has an accessible name

    page.get_by_text("Upload a soft prompt").click()
    page.get_by_label("Name", exact=True).fill("greeter")
    page.get_by_label("Description (optional)").fill("says hello")
    page.locator("#upload-files").set_input_files(_write_adapter(tmp_path / "v1", seed=1, k=4))
    page.get_by_role("button", name="Upload", exact=True).click()
    row = page.locator("tr[data-prompt='greeter']")
    expect(row).to_contain_text("says hello")
    expect(row.locator("td").nth(0)).to_have_text(re.compile(r"^[0-9a-f]{12}$"))
    first_version = row.locator("td").nth(0).inner_text()

    # a second version (a bare safetensors file this time), then roll back to the first
    bare = tmp_path / "v2.safetensors"
    bare.write_bytes(prompt_bytes(2, 6, TINY_HIDDEN, 0.05))
    page.get_by_label("Name", exact=True).fill("greeter")
    page.locator("#upload-files").set_input_files(str(bare))
    page.get_by_role("button", name="Upload", exact=True).click()
    expect(row.locator("td").nth(1)).to_have_text("6")
    second_version = row.locator("td").nth(0).inner_text()
    assert second_version != first_version
    page.get_by_role("button", name="Versions of greeter").click()
    versions = page.locator("tr.versions")
    expect(versions.locator("tbody tr")).to_have_count(2)
    shots(page, "registry")
    page.get_by_role("button", name=f"Make {first_version} the latest version of greeter").click()
    page.locator("#confirm-ok").click()
    expect(row.locator("td").nth(0)).to_have_text(first_version)
    expect(row.locator("td").nth(1)).to_have_text("4")
    with _api(env, "acme") as c:
        assert c.get("/v1/prompts/greeter").json()["version"] == first_version

    with page.expect_download() as info:
        page.get_by_role("button", name="Download greeter", exact=True).click()
    saved = tmp_path / "greeter.zip"
    info.value.save_as(saved)
    import zipfile

    with zipfile.ZipFile(saved) as zf:
        assert sorted(zf.namelist()) == ["adapter_config.json", "adapter_model.safetensors"]
        assert json.loads(zf.read("adapter_config.json"))["num_virtual_tokens"] == 4
    _check_clean(page)


def test_signed_out_console_calls_nothing_that_answers_401(env, browser):
    """Issue #26: before sign-in the console called /ui/api/session without a key, and the browser
    logged the 401 as an error. Now it asks /ui/api/auth (no key needed) and shows the sign-in form."""
    server, keys = env
    context = browser.new_context(viewport=VIEWPORT)
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        refused: list[str] = []
        logged: list[str] = []
        page.on("response", lambda r: refused.append(r.url) if r.status == 401 else None)
        page.on("console", lambda m: logged.append(m.text) if m.type == "error" else None)
        page.goto(f"{server.url}/ui/#registry")
        expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
        page.wait_for_timeout(500)  # anything the start-up would still send
        assert refused == [] and logged == [], (refused, logged)
        page.get_by_label("API key").fill(keys["acme"])
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator("#who")).to_contain_text("tenant acme")
    finally:
        context.close()


def test_playground_streams_base_and_prompt_side_by_side(open_console, env, shots):
    with _api(env, "acme") as c:
        assert upload(c, "pirate", prompt_bytes(3, 5, TINY_HIDDEN, 0.05), adapter_config(5)).status_code == 201
        base = c.get("/ui/api/session").json()["model"]
    page = open_console("acme", "playground")
    columns = page.locator(".column")
    expect(columns).to_have_count(2)
    columns.nth(0).get_by_label("Model or prompt").fill(base)
    columns.nth(1).get_by_label("Model or prompt").fill("pirate")
    page.get_by_label("Max tokens").fill("12")
    page.get_by_label("Prompt", exact=True).fill("Tell me about the sea")
    page.get_by_role("button", name="Run all columns").click()
    for i in range(2):
        expect(columns.nth(i).locator("[data-stat=status]")).to_contain_text("done")
        expect(columns.nth(i).locator("output")).not_to_be_empty()
        expect(columns.nth(i).locator("[data-stat=tokens]")).to_have_text("12")
        expect(columns.nth(i).locator("[data-stat=ttft]")).to_have_text(re.compile(r"^\d+ ms$"))
        expect(columns.nth(i).locator("[data-stat=tokens_per_s]")).to_have_text(re.compile(r"^\d+(\.\d)?$"))
    expect(columns.nth(0).locator("[data-stat=virtual_tokens]")).to_have_text("0")
    expect(columns.nth(1).locator("[data-stat=virtual_tokens]")).to_have_text("5")

    # chat mode, a third column pinned to a version, and an unknown prompt failing alone
    with _api(env, "acme") as c:
        ref = c.get("/v1/prompts/pirate").json()["ref"]
    page.get_by_role("button", name="Add column").click()
    page.get_by_role("button", name="Add column").click()
    expect(columns).to_have_count(4)
    expect(page.get_by_role("button", name="Add column")).to_be_disabled()
    columns.nth(2).get_by_label("Model or prompt").fill(ref)
    columns.nth(3).get_by_label("Model or prompt").fill("no-such-prompt")
    page.get_by_label("Chat").check()
    page.get_by_label("User message").fill("Hello there")
    page.get_by_role("button", name="Run all columns").click()
    for i in range(3):
        expect(columns.nth(i).locator("[data-stat=status]")).to_contain_text("done")
        expect(columns.nth(i).locator("output")).not_to_be_empty()
    expect(columns.nth(2).locator("[data-stat=virtual_tokens]")).to_have_text("5")
    expect(columns.nth(3).locator("[data-stat=status]")).to_contain_text("error")
    expect(columns.nth(3).locator("[data-stat=status]")).to_contain_text("not found")
    assert page.evaluate(UNLABELLED_CONTROLS_JS) == []
    shots(page, "playground")
    _check_clean(page)


def _jsonl(n: int) -> str:
    return "\n".join(json.dumps({"prompt": f"Review {i}: fine.\nSentiment:", "completion": " ok"}) for i in range(n)) + "\n"


def _fill_tuning_form(page, name: str, train: Path, steps: int) -> None:
    page.get_by_label("Prompt name").fill(name)
    page.get_by_label("Virtual tokens (k)").fill("4")
    page.get_by_label("Initialisation").select_option("random")
    page.get_by_label("Steps", exact=True).fill(str(steps))
    page.get_by_label("Batch size").fill("2")
    page.get_by_label("Training data (JSONL)").set_input_files(str(train))


def test_tuning_errors_live_curve_cancel_and_open_result(open_console, tmp_path, shots):
    page = open_console("acme", "tuning")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(_jsonl(2) + '{"prompt": "x"\n' + json.dumps({"prompt": "y", "completion": 3}) + "\n")
    _fill_tuning_form(page, "sentiment", bad, 5)
    page.get_by_role("button", name="Start tuning").click()
    errors = page.locator("#tune-errors li")
    expect(errors).to_have_count(2)
    expect(errors.nth(0)).to_contain_text("bad.jsonl, line 3: invalid JSON")
    expect(errors.nth(1)).to_contain_text("bad.jsonl, line 4: 'prompt' and 'completion' must be strings")

    # a long job: the curve gains points while we watch, then we cancel it
    train = tmp_path / "train.jsonl"
    train.write_text(_jsonl(6))
    _fill_tuning_form(page, "endless", train, 100_000)
    page.get_by_role("button", name="Start tuning").click()
    expect(page.locator("#tune-errors")).to_be_empty()
    status = page.locator("#tune-detail [data-role=job-status]")
    expect(status).to_have_text("running", timeout=30_000)  # validating_files, then the queue, first
    chart = page.locator("#tune-chart")

    def points() -> int:  # the chart's accessible summary says how many points it draws
        match = re.search(r"(\d+) points", chart.get_attribute("aria-label") or "")
        return int(match.group(1)) if match else 0

    _wait_until(page, lambda: points() > 0)
    seen = points()
    _wait_until(page, lambda: points() > seen)  # the curve grows while the page is open
    page.get_by_role("button", name="Cancel job").click()
    expect(status).to_have_text("cancelled")

    # a short job runs to the end; its result opens in the playground
    _fill_tuning_form(page, "sentiment", train, 8)
    page.get_by_role("button", name="Start tuning").click()
    expect(status).to_have_text("succeeded", timeout=60_000)
    expect(page.locator("#tune-chart polyline")).to_have_count(1)
    expect(page.locator("#tune-chart circle")).to_have_count(8)
    result = page.locator("#tune-detail [data-role=result]").inner_text()
    assert re.fullmatch(r"sentiment@[0-9a-f]{12}", result)
    page.get_by_text("New tuning job").click()  # fold the form so the screenshot shows the curve
    shots(page, "tuning")
    page.get_by_role("button", name="Open in playground").click()
    expect(page.get_by_role("heading", name="Playground")).to_be_visible()
    expect(page.locator(".column").nth(1).get_by_label("Model or prompt")).to_have_value(result)
    _check_clean(page)


def test_metrics_charts(open_console, env, shots):
    with _api(env, "acme") as c:
        for _ in range(3):
            r = c.post("/v1/completions", json={"model": c.get("/ui/api/session").json()["model"], "prompt": "hi", "max_tokens": 4})
            assert r.status_code == 200
    page = open_console("acme", "metrics")
    expect(page.locator("#metrics-scope")).to_contain_text("tenant acme")
    expect(page.locator("figure.chart")).to_have_count(7)
    # requests made above show up in the requests chart (the console's own calls do not count)
    _wait_until(page, lambda: page.locator("#chart-requests circle").count() > 0)
    expect(page.locator("[data-chart-value=requests]")).to_contain_text("requests")
    page.wait_for_timeout(2500)  # one more sample, so the lines have a few points
    shots(page, "metrics", full_page=True)
    _check_clean(page)


def test_delete_with_confirmation(open_console, env):
    with _api(env, "acme") as c:
        assert upload(c, "doomed", prompt_bytes(4, 3, TINY_HIDDEN, 0.05), adapter_config(3)).status_code == 201
    page = open_console("acme")
    row = page.locator("tr[data-prompt='doomed']")
    expect(row).to_be_visible()
    # by keyboard: Enter opens the confirmation, Escape dismisses it and nothing is deleted
    page.get_by_role("button", name="Delete doomed").focus()
    page.keyboard.press("Enter")
    dialog = page.get_by_role("dialog")
    expect(dialog).to_be_visible()
    expect(page.get_by_role("button", name="Cancel")).to_be_focused()  # the safe choice is the default
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    expect(row).to_be_visible()
    page.get_by_role("button", name="Delete doomed").click()
    expect(page.locator("#confirm-text")).to_contain_text("doomed")
    page.locator("#confirm-ok").click()
    expect(row).to_have_count(0)
    with _api(env, "acme") as c:
        assert c.get("/v1/prompts/doomed").status_code == 404
    _check_clean(page)


def test_second_tenant_sees_nothing_of_the_first(open_console, env):
    with _api(env, "acme") as c:
        assert upload(c, "acme-only", prompt_bytes(5, 4, TINY_HIDDEN, 0.05), adapter_config(4)).status_code == 201
        acme_jobs = c.get("/v1/tuning/jobs").json()["data"]
    page = open_console("beta")
    expect(page.locator("#registry-status")).to_have_text("0 prompts")
    expect(page.locator("tr[data-prompt]")).to_have_count(0)
    page.get_by_role("link", name="Playground").click()
    options = page.locator("#play-models option")
    expect(options).to_have_count(1)  # the base model only
    page.get_by_role("link", name="Tuning").click()
    for job in acme_jobs:
        expect(page.locator(f"[data-job='{job['id']}']")).to_have_count(0)
    expect(page.locator("#tune-jobs")).to_contain_text("No jobs yet")
    page.get_by_role("link", name="Metrics").click()
    expect(page.locator("#metrics-scope")).to_contain_text("tenant beta")
    _check_clean(page)


def test_releases_view_shows_aliases_and_numbers_and_moves_a_split(open_console, env, shots):
    with _api(env, "acme") as c:
        v1 = upload(c, "support", prompt_bytes(11, 4, TINY_HIDDEN, 0.05), adapter_config(4)).json()["version"]
        v2 = upload(c, "support", prompt_bytes(12, 4, TINY_HIDDEN, 0.05), adapter_config(4)).json()["version"]
        assert c.put("/v1/prompts/support/aliases/prod", json={"version": v1}).status_code == 200
        for user in range(3):
            r = c.post("/v1/completions", json={"model": "support@prod", "prompt": "hi", "max_tokens": 2, "user": f"u{user}"})
            assert r.json()["model"] == f"support@{v1}"
        c.post("/v1/feedback", json={"id": r.json()["id"], "score": 0.5})
    page = open_console("acme", "releases")
    page.locator("#releases-prompt").fill("support")
    page.get_by_role("button", name="Show", exact=True).click()
    prod = page.locator("#releases-aliases tr[data-alias='prod']")
    expect(prod).to_contain_text(f"{v1} 100%")
    expect(prod).to_contain_text("acme:key-")
    first = page.locator(f"#releases-versions tr[data-version='{v1}'] td")
    expect(first.nth(0)).to_have_text("prod 100%")
    expect(first.nth(1)).to_have_text("3")  # requests through the alias, side by side with...
    expect(first.nth(6)).to_have_text("0.50 (1)")  # ...the feedback it got
    expect(page.locator(f"#releases-versions tr[data-version='{v2}'] td").nth(1)).to_have_text("0")

    # split prod 90/10 from the form
    page.get_by_role("button", name="Edit support@prod").click()
    page.get_by_role("button", name="Add version").click()
    page.get_by_label("Version 2", exact=True).select_option(v2)
    page.get_by_label("Weight of version 1").fill("90")
    page.get_by_label("Weight of version 2").fill("10")
    page.get_by_role("button", name="Save alias").click()
    expect(prod).to_contain_text(f"{v1} 90%")
    expect(prod).to_contain_text(f"{v2} 10%")
    expect(page.locator(f"#releases-versions tr[data-version='{v2}'] td").nth(0)).to_have_text("prod 10%")
    with _api(env, "acme") as c:
        arms = c.get("/v1/prompts/support/aliases/prod").json()["split"]
        assert arms == [{"version": v1, "weight": 90.0}, {"version": v2, "weight": 10.0}]

    # a new alias pointing at v2 alone; a bad name is refused with the server's message
    page.locator("#alias-name").fill("beef")
    page.get_by_role("button", name="Remove version 2").click()
    page.get_by_label("Version 1", exact=True).select_option(v2)
    page.get_by_role("button", name="Save alias").click()
    expect(page.locator("#alias-error")).to_contain_text("hex")
    page.locator("#alias-name").fill("canary")
    page.get_by_role("button", name="Save alias").click()
    expect(page.locator("#releases-aliases tr[data-alias='canary']")).to_contain_text(f"{v2} 100%")
    shots(page, "releases")
    _check_clean(page)

    # delete it (with the confirmation); the prompt keeps prod
    page.get_by_role("button", name="Delete support@canary").click()
    page.locator("#confirm-ok").click()
    expect(page.locator("#releases-aliases tr[data-alias='canary']")).to_have_count(0)
    expect(prod).to_be_visible()

    # another tenant: the same name is a 404 like any missing prompt
    other = open_console("beta", "releases")
    other.locator("#releases-prompt").fill("support")
    other.get_by_role("button", name="Show", exact=True).click()
    expect(other.locator("#releases-status")).to_contain_text("Could not load support")
    expect(other.locator("#releases-body")).to_be_hidden()


def _batch(c, lines: list[dict]) -> str:
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    file_id = c.post("/v1/files", files={"file": ("in.jsonl", data)}, data={"purpose": "batch"}).json()["id"]
    r = c.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": "24h",
                                    "metadata": {"job": "retag"}})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def test_batches_view_shows_progress_downloads_files_and_cancels(open_console, env, tmp_path, shots):
    def line(i: int, max_tokens: int) -> dict:
        return {"custom_id": f"t-{i}", "method": "POST", "url": "/v1/completions",
                "body": {"model": model, "prompt": f"ticket {i}", "max_tokens": max_tokens, "temperature": 0,
                         "ignore_eos": True}}

    with _api(env, "acme") as c:
        model = c.get("/ui/api/session").json()["model"]
        bad = {"custom_id": "broken", "method": "POST", "url": "/v1/completions", "body": {"model": model, "prompt": 3}}
        small = _batch(c, [line(0, 2), bad, line(1, 2), line(2, 2)])
        deadline = time.monotonic() + 60
        while c.get(f"/v1/batches/{small}").json()["status"] != "completed":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        big = _batch(c, [line(i, 30) for i in range(5000)])  # minutes of work: still running when cancelled
    page = open_console("acme", "batches")
    done = page.locator(f"tr[data-batch='{small}']")
    expect(done.locator("[data-role=batch-status]")).to_have_text("completed")
    expect(done.locator("[data-role=counts]")).to_have_text("4/4 (1 failed)")
    expect(done).to_contain_text("job=retag")
    with page.expect_download() as got:
        page.get_by_role("button", name=f"Download the output file of {small}").click()
    out = [json.loads(x) for x in Path(got.value.path()).read_text().splitlines()]
    assert [o["custom_id"] for o in out] == ["t-0", "t-1", "t-2"]
    with page.expect_download() as got:
        page.get_by_role("button", name=f"Download the errors file of {small}").click()
    errors = [json.loads(x) for x in Path(got.value.path()).read_text().splitlines()]
    assert [(e["custom_id"], e["error"]["line"]) for e in errors] == [("broken", 2)]
    expect(done.get_by_role("button", name=f"Cancel {small}")).to_have_count(0)  # finished: nothing to cancel

    running = page.locator(f"tr[data-batch='{big}']")
    expect(running.locator("[data-role=batch-status]")).to_have_text("in_progress")
    counts = running.locator("[data-role=counts]")
    expect(counts).not_to_have_text(re.compile(r"^\s*0/5000"), timeout=60_000)  # the page polls: progress shows up
    shots(page, "batches")
    page.get_by_role("button", name=f"Cancel {big}").click()
    expect(page.locator("#confirm-text")).to_contain_text(big)
    page.locator("#confirm-ok").click()
    expect(running.locator("[data-role=batch-status]")).to_have_text("cancelled", timeout=60_000)
    with _api(env, "acme") as c:
        assert c.get(f"/v1/batches/{big}").json()["status"] == "cancelled"
    _check_clean(page)

    other = open_console("beta", "batches")  # another tenant sees none of them
    expect(other.locator("#batches-table tbody")).to_contain_text("No batches yet")
    expect(other.locator("tr[data-batch]")).to_have_count(0)
    _check_clean(other)
