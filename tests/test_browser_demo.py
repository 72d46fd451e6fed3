"""The demo page in a real browser: Debian's chromium driven by Playwright.

The page runs in-process (ONNX Runtime + FAISS) so that this module needs no Triton; the
Triton-backed page is covered by tests/test_up.py (through gradio_client). Screenshots land in
test-output/ (git-ignored) for a human to look at. Without chromium these tests fail, saying how
to install it (``make browser``); leave them out with ``-m "not browser"``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port

CHROMIUM = Path("/usr/bin/chromium")
OUTPUT = Path(__file__).resolve().parents[1] / "test-output"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync"]

pytestmark = pytest.mark.browser

RESULTS_RENDERED = """(n) => {
    const imgs = Array.from(document.querySelectorAll('#results img'));
    return imgs.length >= n && imgs.every(i => i.complete && i.naturalWidth > 0);
}"""


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory: pytest.TempPathFactory, digits_folder: Path) -> Iterator[str]:
    from ascl.demo.app import build_app, launch
    from ascl.demo.up import example_files, gallery_roots
    from ascl.serving.online.gallery import InProcessGallery, build_index
    from ascl.serving.online.serve import choose_model, ensure_onnx

    cache = tmp_path_factory.mktemp("browser-cache")
    onnx_path, _ = ensure_onnx(choose_model(None, runs_dir=cache / "no-runs"), cache)
    build_index(onnx_path, digits_folder, cache / "index")
    app = build_app(InProcessGallery(onnx_path, cache / "index"), example_files(cache / "index"), subtitle="browser test")
    url = launch(app, free_port(), allowed_paths=gallery_roots(cache / "index"))
    yield url
    app.close()


@pytest.fixture(scope="module")
def page(demo_url: str) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is absent: install Debian's chromium (make browser, or apt-get install chromium), "
                    "or leave the browser tests out with -m 'not browser'", pytrace=False)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(demo_url)
        page.wait_for_selector("#query-image input[type=file]", state="attached", timeout=60_000)
        yield page
        browser.close()


def wait_for(page: Any, script: str, arg: Any = None, *, shot: str) -> None:
    """Wait for ``script`` to be true; on timeout fail with the status text and a screenshot."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(script, arg=arg, timeout=60_000)
    except PlaywrightTimeout:
        OUTPUT.mkdir(exist_ok=True)
        page.screenshot(path=str(OUTPUT / shot), full_page=True)
        pytest.fail(f"timed out waiting for {script!r}; status: {status_text(page)!r}; see {OUTPUT / shot}")


def upload(page: Any, file: Path) -> None:
    page.locator("#query-image input[type=file]").set_input_files(str(file))


def status_text(page: Any) -> str:
    return str(page.locator("#status").inner_text())


def test_upload_renders_result_images(page: Any, digits_folder: Path) -> None:
    query = sorted(digits_folder.rglob("*.png"))[50]
    upload(page, query)
    wait_for(page, RESULTS_RENDERED, 10, shot="demo-results-timeout.png")
    OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT / "demo-results.png"), full_page=True)
    assert "10 results in" in status_text(page)
    captions = page.locator("#results").inner_text()
    assert "1.000 · " in captions and " · #" in captions


def test_bad_upload_shows_error_then_good_upload_works(page: Any, digits_folder: Path, tmp_path: Path) -> None:
    bad = tmp_path / "holiday.png"
    bad.write_text("this is not a picture")
    upload(page, bad)
    wait_for(page, "document.querySelector('#status').innerText.includes('not an image we can read')",
             shot="demo-bad-upload-timeout.png")
    assert "holiday.png" in status_text(page), status_text(page)
    OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT / "demo-bad-upload.png"), full_page=True)
    upload(page, sorted(digits_folder.rglob("*.png"))[3])
    wait_for(page, RESULTS_RENDERED, 10, shot="demo-after-bad-timeout.png")
    assert "results in" in status_text(page), status_text(page)


def test_clicking_an_example_searches(page: Any) -> None:
    assert "1.000 · 1 · " not in page.locator("#results").inner_text()
    page.locator("#examples img").nth(1).click()  # examples go one per label: the second one is a 1
    wait_for(page, "document.querySelector('#results').innerText.includes('1.000 · 1 · ')",
             shot="demo-example-timeout.png")
    wait_for(page, RESULTS_RENDERED, 10, shot="demo-example-timeout.png")


ALL_CAPTIONS_LABELLED = """(label) => {
    const captions = document.querySelector('#results').innerText.match(/\\d\\.\\d{3} · [^·\\n]+ · #\\d+/g) || [];
    return captions.length >= 10 && captions.every(c => c.includes(` · ${label} · `));
}"""


def choose_label(page: Any, label: str) -> None:
    page.locator("#label-filter input").click()
    page.get_by_role("option", name=label, exact=True).click()


def test_choosing_a_label_returns_only_that_label(page: Any, digits_folder: Path) -> None:
    upload(page, sorted(digits_folder.rglob("*.png"))[30])  # a 2
    wait_for(page, RESULTS_RENDERED, 10, shot="demo-filter-before-timeout.png")
    choose_label(page, "5")  # the dropdown lists the gallery's labels; choosing one searches again
    wait_for(page, ALL_CAPTIONS_LABELLED, "5", shot="demo-filter-timeout.png")
    wait_for(page, RESULTS_RENDERED, 10, shot="demo-filter-timeout.png")
    OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT / "demo-label-filter.png"), full_page=True)
    assert "10 results in" in status_text(page)
    choose_label(page, "any")  # back to the whole gallery: the query (a 2) finds itself first
    wait_for(page, "document.querySelector('#results').innerText.includes('1.000 · 2 · ')",
             shot="demo-filter-any-timeout.png")
