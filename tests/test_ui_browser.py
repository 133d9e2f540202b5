"""The app in a real browser (Playwright driving Debian's chromium; `.ci/run` installs it).

Make a dataset from sample images, generate class images, start a short training on the demo model, see loss
points and samples appear, pause, generate in the playground with the live adapter, resume, stop, reload the
page and find the run again; then the stopped run's file in the playground (compare, export) and bad input on the
Train tab. Screenshots of every step go to test-output/ui/.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from ui_helpers import OUTPUT, launched_app, sample_images

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
INSTALL = ("The browser test needs Debian's chromium at /usr/bin/chromium: sudo apt-get install -y chromium "
           "(./launch.sh test installs it when run as root), or CHROMIUM=/path/to/chromium.")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
TIMEOUT = 60_000  # ms; the CPU may be busy

from playwright import sync_api  # noqa: E402  (requirements-dev.txt)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def chromium():
    """First of all (before the app starts): no skip, without a browser this test fails saying how to get one."""
    if not CHROMIUM.exists():
        pytest.fail(INSTALL, pytrace=False)


@pytest.fixture(scope="module")
def shots():
    folder = OUTPUT / "browser"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


running = pytest.fixture(scope="module", name="running")(launched_app)


@pytest.fixture(scope="module")
def page(running):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(TIMEOUT)
        page.errors = []
        page.stage = "start"  # which part of the journey an error came in
        page.on("pageerror", lambda e: page.errors.append(f"{page.stage}: {e}"))
        page.reloading = False  # requests a reload cuts off log "AbortError" / "Connection errored out": not faults
        page.on("console", lambda m: page.errors.append(f"{page.stage}: console: {m.text}")
                if m.type == "error" and not page.reloading else None)
        yield page
        browser.close()


def text_of(page, selector: str) -> str:
    return page.locator(selector).inner_text()


def log_follows_newest_line(page) -> None:
    """The Train tab's log is longer than its box and shows its last line ("Stopped at step N ...")."""
    log = page.locator("#db-log textarea")
    sync_api.expect(log).to_have_value(re.compile(r"Stopped at step \d+"), timeout=TIMEOUT)
    page.wait_for_function("() => { const t = document.querySelector('#db-log textarea'); return t.scrollHeight > "
                           "t.clientHeight && t.scrollTop + t.clientHeight >= t.scrollHeight - 4; }", timeout=10_000)


def choose(page, elem_id: str, option: str) -> None:
    """Pick `option` in a Gradio dropdown."""
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=re.compile(re.escape(option))).first.click()


def fill(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id}").get_by_role("textbox").or_(page.locator(f"#{elem_id} input")).first
    box.fill(value)
    box.press("Tab")  # commit: Gradio fires change / blur


def tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def expect_text(page, selector: str, pattern: str) -> None:
    sync_api.expect(page.locator(selector)).to_contain_text(re.compile(pattern), timeout=TIMEOUT)


def expect_or_explain(page, running, shots, selector: str, pattern: str) -> None:
    """`expect_text`; when it fails, what the app was doing is written next to the screenshots first: the
    session's state and every thread's stack (a stall of the page's once-a-second poll, or of the trainer)."""
    try:
        expect_text(page, selector, pattern)
    except AssertionError:
        import sys
        import traceback

        snap = running.ctx.session.snapshot()
        stacks = "\n".join(f"--- thread {ident}\n" + "".join(traceback.format_stack(frame))
                           for ident, frame in sys._current_frames().items())
        (shots / "stall.txt").write_text(f"state {snap['state']} step {snap['step']} logs {snap['logs'][-5:]}\n"
                                         f"page errors {page.errors}\n{stacks}")
        page.screenshot(path=shots / "stall.png", full_page=True)
        raise


def test_first_run_in_a_browser(running, page, shots, tmp_path):
    photos = sample_images(tmp_path / "photos")
    page.goto(running.url)
    page.wait_for_selector("#ds-create")

    # 0. First start on an empty workspace: the demo subject is set up and selected, ready for Start.
    page.stage = "0"
    sync_api.expect(page.locator("#ds-dataset input")).to_have_value("demo-star", timeout=TIMEOUT)
    sync_api.expect(page.locator("#ds-instance-prompt textarea")).to_have_value("a photo of tms star", timeout=TIMEOUT)
    demo_folder = running.workspace / "datasets" / "demo-star"
    assert sorted(p.name for p in demo_folder.glob("*.png")) == [f"star_{i}.png" for i in range(5)]
    crops = page.locator("#ds-crops")
    sync_api.expect(crops.locator("img")).to_have_count(5, timeout=TIMEOUT)
    box, last = crops.bounding_box(), crops.locator("img").nth(4).bounding_box()
    assert last["x"] + last["width"] <= box["x"] + box["width"] + 1, (last, box)  # the fifth crop is not cut off
    page.screenshot(path=str(shots / "00-first-start.png"), full_page=True)

    # 1. Dataset from sample images (upload), the prompt from identifier + class noun.
    page.stage = "1"
    fill(page, "ds-new-name", "ball")
    page.click("#ds-create")
    expect_text(page, "#ds-add-msg", "Created dataset")
    fill(page, "ds-resolution", "64")  # the demo model's size
    page.locator("#ds-upload input[type=file]").set_input_files(
        [str(photos / n) for n in ("photo0.png", "photo1.png", "photo2.png", "tiny.png")])
    expect_text(page, "#ds-add-msg", r"Added 3 images\. Not added: tiny\.png: too small")
    expect_text(page, "#ds-report", "3 usable images")
    assert page.locator("#ds-gallery img").count() == 3
    page.locator("#ds-class-noun").get_by_role("textbox").press_sequentially("ball")  # typed, as a user does
    sync_api.expect(page.locator("#ds-instance-prompt").get_by_role("textbox")).to_have_value("a photo of sks ball")
    page.screenshot(path=shots / "1-dataset.png", full_page=True)

    # 2. Class images with the demo model (the class prompt came from the class noun).
    page.stage = "2"
    tab(page, "2. Class images")
    sync_api.expect(page.locator("#cls-prompt").get_by_role("textbox")).to_have_value("a photo of a ball")
    choose(page, "cls-base", "demo")
    fill(page, "cls-count", "4")
    page.click("#cls-generate")
    expect_text(page, "#cls-progress", "Done")
    sync_api.expect(page.locator("#cls-gallery img")).to_have_count(4, timeout=TIMEOUT)
    expect_text(page, "#cls-info", r"4 of 4")
    page.screenshot(path=shots / "2-class-images.png", full_page=True)

    # 3. Train: the base model picked on the Class images tab is already chosen here.
    page.stage = "3"
    tab(page, "3. Train")
    sync_api.expect(page.locator("#tr-base input")).to_have_value(re.compile("^demo"))
    fill(page, "tr-steps", "100000")
    page.get_by_text("Advanced options").click()
    fill(page, "tr-sample-every", "8")
    fill(page, "tr-sample-steps", "2")
    expect_text(page, "#tr-maths", r"3 images × 1 repeat × \d+ epochs ÷ batch 4 = 100000 steps")
    # Start says what it trains on; the choices survive a second tab and a reload (not the demo again).
    said = r"Dataset: ball · instance prompt: a photo of sks ball · class prompt: a photo of a ball"
    expect_text(page, "#tr-maths", said)
    page.wait_for_timeout(1500)  # the last change reaches the app
    second = page.context.browser.new_page()  # another tab (its own context: nothing shared in the browser)
    second.goto(running.url)
    sync_api.expect(second.locator("#ds-dataset input")).to_have_value("ball", timeout=TIMEOUT)
    tab(second, "3. Train")
    sync_api.expect(second.locator("#tr-steps input")).to_have_value("100000", timeout=TIMEOUT)
    expect_text(second, "#tr-maths", said)
    second.close()
    page.reloading = True
    page.reload()
    page.wait_for_selector("#ds-create")
    page.wait_for_timeout(1000)
    page.reloading = False
    sync_api.expect(page.locator("#ds-dataset input")).to_have_value("ball", timeout=TIMEOUT)
    expect_text(page, "#ds-report", "3 usable images")
    tab(page, "3. Train")
    sync_api.expect(page.locator("#tr-steps input")).to_have_value("100000", timeout=TIMEOUT)
    expect_text(page, "#tr-maths", said)
    page.click("#tr-start")
    expect_text(page, "#tr-status", r"step (1\d|[2-9]\d|\d{3,}) / 100000")  # at least 10 steps
    sync_api.expect(page.locator("#tr-samples img").first).to_be_visible(timeout=TIMEOUT)
    expect_text(page, "#tr-samples", "step 0")
    lines = page.locator("#tr-loss .mark-line path")
    sync_api.expect(lines).to_have_count(2, timeout=TIMEOUT)  # raw and smoothed
    sync_api.expect(lines.first).to_have_attribute("d", re.compile(r"^M[^L]*(L[^L]+){5,}"))  # >= 6 loss points
    page.screenshot(path=shots / "3-training.png", full_page=True)

    page.click("#tr-pause")
    expect_text(page, "#tr-status", "Paused")
    paused_at = running.ctx.session.snapshot()["step"]
    sync_api.expect(lines.first).to_have_attribute("d", re.compile(r"^M[^L]*(L[^L]+){5,}"))
    page.wait_for_timeout(1500)  # the plot redraws once more with the last points
    page.screenshot(path=shots / "3b-paused.png", full_page=True)

    # 4. Playground on the paused run's live adapter.
    page.stage = "4"
    tab(page, "4. Playground")
    expect_text(page, "#pg-live-note", f"paused at step {paused_at}")
    choose(page, "pg-base", "demo")
    choose(page, "pg-adapter-1", "Live: the paused training run")
    fill(page, "pg-prompt", "a photo of sks ball")
    fill(page, "pg-steps", "2")
    page.click("#pg-generate")
    sync_api.expect(page.locator("#pg-image img")).to_be_visible(timeout=TIMEOUT)
    expect_text(page, "#pg-info", "live run ×1")
    page.screenshot(path=shots / "4-playground.png", full_page=True)
    assert running.ctx.session.snapshot()["step"] == paused_at

    # 5. Resume, stop; a reloaded page finds the run with its history.
    page.stage = "5"
    tab(page, "3. Train")
    page.click("#tr-resume")
    expect_text(page, "#tr-status", "Training")
    page.click("#tr-stop")
    expect_or_explain(page, running, shots, "#tr-status", "Stopped")
    log_follows_newest_line(page)
    assert running.ctx.session.snapshot()["step"] > paused_at
    page.reloading = True
    page.reload()
    page.wait_for_selector("#ds-create")
    page.wait_for_timeout(1000)
    page.reloading = False
    tab(page, "3. Train")
    expect_text(page, "#tr-status", "Stopped")
    sync_api.expect(page.locator("#tr-base input")).to_have_value(re.compile("^demo"))  # the run's settings
    sync_api.expect(page.locator("#tr-steps input")).to_have_value("100000")
    sync_api.expect(page.locator("#tr-preset input")).to_have_value("")  # the run's settings, not "demo-lora"
    sync_api.expect(page.locator("#tr-loss .mark-line path")).to_have_count(2, timeout=TIMEOUT)
    sync_api.expect(page.locator("#tr-samples img").first).to_be_visible(timeout=TIMEOUT)
    log_follows_newest_line(page)
    page.screenshot(path=shots / "5-after-reload.png", full_page=True)

    # 6. Playground on the stopped run's file: no live adapter offered; a compare leaves the Result as it was.
    page.stage = "6"
    tab(page, "4. Playground")
    page.locator("#pg-adapter-1 input").click()
    sync_api.expect(page.get_by_role("option", name=re.compile("Live: the paused"))).to_have_count(0)
    page.get_by_role("option", name=re.compile("lora-")).first.click()
    fill(page, "pg-weight-1", "0")
    page.click("#pg-generate")
    expect_text(page, "#pg-info", r"×0 ")
    fill(page, "pg-weight-1", "1")
    page.click("#pg-compare")
    sync_api.expect(page.locator("#pg-grid img")).to_have_count(6, timeout=TIMEOUT)
    expect_text(page, "#pg-grid-info", r"×1")
    expect_text(page, "#pg-info", r"×0 ")  # the Result's caption belongs to the Result's image
    page.click("#pg-export")
    expect_text(page, "#pg-export-file", r"kohya\s*\.safetensors")
    page.screenshot(path=shots / "6-compare-export.png", full_page=True)

    # 7. Bad input on the Train tab: Steps 0 says so once in the step maths; Other is checked on Start only.
    page.stage = "7"
    tab(page, "3. Train")
    expect_text(page, "#tr-maths", "= 100000 steps")  # the tab's own refresh has landed before the edit
    page.wait_for_timeout(1000)
    fill(page, "tr-steps", "0")
    expect_text(page, "#tr-maths", "Steps")
    sync_api.expect(page.locator(".toast-body")).to_have_count(0)  # no pop-up while typing
    page.click("#tr-start")
    sync_api.expect(page.locator(".toast-body")).to_have_count(1, timeout=TIMEOUT)
    expect_text(page, ".toast-body", "Steps")
    page.screenshot(path=shots / "7-bad-input.png", full_page=True)
    choose(page, "tr-base", "Other")
    page.wait_for_timeout(1500)
    sync_api.expect(page.locator(".toast-body")).to_have_count(1)  # choosing Other raised nothing new

    # 8. A second run on this page, to its end: the plot goes on from the last run's curve to the new one's (no
    # browser error), and the Train tab shows what the run taught: instance and class prompt, adapter off / on.
    page.stage = "8"
    choose(page, "tr-base", "demo")
    fill(page, "tr-steps", "4")
    page.wait_for_timeout(1000)
    page.click("#tr-start")
    expect_or_explain(page, running, shots, "#tr-status", "Finished")
    sync_api.expect(page.locator("#tr-compare img")).to_have_count(4, timeout=TIMEOUT)
    expect_text(page, "#tr-compare", "adapter off")
    expect_text(page, "#tr-compare", "adapter on")
    sync_api.expect(lines.first).to_have_attribute("d", re.compile(r"^M[^L]*(L[^L]+){3}$"))  # the new run's 4 points
    page.screenshot(path=shots / "8-finished-compare.png", full_page=True)
    assert not page.errors, page.errors
    # The browser keeps no history of the calls (Gradio's run history would hold every prompt and path in the
    # browser's storage and rewrite it at each of the once-a-second polls: a busy page beside a CPU run).
    stored = page.evaluate("() => Object.keys(window.localStorage)")
    assert not [k for k in stored if "run-history" in k], stored
