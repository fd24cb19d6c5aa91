"""The page end to end: a real server, driven in headless Chromium (Debian's package) through Playwright."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from nextword.server import create_app
from servers import background_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: the web test needs Debian's chromium "
                    "(apt-get install -y chromium; .ci/run installs it)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def site(tiny_model_dir, tmp_path):
    log_path = tmp_path / "keystrokes.jsonl"
    with background_server(create_app(tiny_model_dir, log_path=log_path)) as url:
        yield url, log_path


@pytest.fixture
def page(browser, site):
    url, _ = site
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(5000)
    outside = []
    page.on("request", lambda request: None if request.url.startswith(url) else outside.append(request.url))
    page.goto(url)
    yield page
    context.close()
    assert not outside, f"the page reached beyond its server: {outside}"


def chip(page, word):
    return page.locator(f'[data-testid="suggestion"][data-word="{word}"]')


def test_typing_shows_suggestions_and_tab_or_click_accepts_them(page, site):
    _, log_path = site
    box = page.get_by_test_id("compose")
    expect(page.get_by_test_id("suggestion").first).to_be_visible()  # suggestions for an empty message
    box.press_sequentially("good morning , how are ", delay=15)
    expect(page.get_by_test_id("suggestion").first).to_have_attribute("data-word", "you")
    box.press("Tab")
    expect(box).to_have_value("good morning , how are you ")
    expect(box).to_be_focused()

    chip(page, "today").click()
    expect(box).to_have_value("good morning , how are you today ")
    expect(box).to_be_focused()

    box.press_sequentially("?", delay=15)
    box.press("Enter")
    expect(page.get_by_test_id("history").locator(".text")).to_have_text(["good morning , how are you today ?"])
    expect(box).to_have_value("")
    expect(page.get_by_test_id("speaker")).to_have_value("agent")  # take turns

    box.press_sequentially("i am ", delay=15)
    expect(page.get_by_test_id("suggestion").first).to_have_attribute("data-word", "fine")
    # Typing on past the strip: the likeliest completion of "f" is still shown (skip_rejected is off by
    # default: the page never hides a word because it was on the strip a letter earlier).
    box.press_sequentially("f", delay=15)
    expect(page.get_by_test_id("suggestion")).to_have_count(3)
    expect(page.get_by_test_id("suggestion").first).to_have_attribute("data-word", "fine")
    # its label is its probability given the letter typed, a whole percent, never a rounded "0.0%"
    expect(page.get_by_test_id("suggestion").first.locator(".probability")).to_have_text(re.compile(r"^\d+%$"))
    box.press("Tab")
    expect(box).to_have_value("i am fine ")

    # The live panel and the log count the three accepted suggestions.
    expect(page.get_by_test_id("counts")).to_have_text(re.compile(r"^3 / \d+$"))
    expect(page.get_by_test_id("acceptance-rate")).to_have_text(re.compile(r"^\d+\.\d%$"))
    expect(page.get_by_test_id("latency")).to_have_text(re.compile(r"ms / .* ms$"))
    events = [json.loads(line) for line in log_path.read_text().splitlines()]
    accepted = [(e["word"], e["via"], e["typed"]) for e in events if e["type"] == "accepted"]
    assert accepted == [("you", "tab", 0), ("today", "click", 0), ("fine", "tab", 1)]
    assert any(e["type"] == "keystroke" and e["latency_ms"] > 0 for e in events)


def test_line_completion_and_errors_show_on_the_page(page):
    box = page.get_by_test_id("compose")
    box.press_sequentially("good morning , how are y", delay=5)
    page.get_by_test_id("complete").click()
    expect(box).to_have_value("good morning , how are you today?")
    page.get_by_test_id("speaker").select_option("agent")
    # The server refuses a message over the length cap and the page says why.
    page.evaluate("document.getElementById('text').removeAttribute('maxlength')")
    box.fill("x" * 2001)
    expect(page.get_by_test_id("error")).to_contain_text("text")


def test_with_the_cursor_inside_the_message_the_text_after_it_is_sent(browser, fim_model_dir, tmp_path):
    with background_server(create_app(fim_model_dir, log_path=tmp_path / "keystrokes.jsonl")) as url:
        context = browser.new_context()
        page = context.new_page()
        page.set_default_timeout(5000)
        page.goto(url)
        box = page.get_by_test_id("compose")
        box.press_sequentially("i like ", delay=15)
        expect(page.get_by_test_id("suggestion").first).to_have_attribute("data-word", "green")
        box.press_sequentially("wine .", delay=15)
        # Listening before the cursor moves: Chromium may fold the selectionchange events of quick moves into
        # one, so the request for the gap can be the one of the last move back.
        with page.expect_request(lambda r: r.url.endswith("/api/suggest")
                                 and (r.post_data_json or {}).get("right") == "wine ."):
            for _ in "wine .":
                box.press("ArrowLeft")  # back to the gap: "i like |wine ."
        expect(page.get_by_test_id("suggestion").first).to_have_attribute("data-word", "red")
        box.press("Tab")
        expect(box).to_have_value("i like red wine .")
        assert box.evaluate("el => el.selectionStart") == len("i like red ")
        context.close()
