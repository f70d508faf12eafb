"""The web page end to end in a real headless Chromium: upload -> samples -> choose -> vary details -> vary
structure -> download, and the download equals what `chimle sample --sources` renders.

Playwright (in the `test` extra) drives the system's Chromium (Debian's `chromium` package, which `.ci/run`
installs); no browser is ever downloaded. Without them the test is skipped with the reason, except under CI
(CI=true), where it fails.

    CHIMLE_SCREENSHOT=page.png pytest tests/test_browser.py       # the screenshot's path (default: tmp folder)
    CHIMLE_UPDATE_DOCS=1 CHIMLE_BROWSER_MODEL=runs/demo pytest tests/test_browser.py   # also docs/serve.png
"""

import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chimle.checkpoint import save_model
from chimle.cli import main
from chimle.data import builtin_photos, center_crop, list_images, load_image
from chimle.generator import Generator
from chimle.sample import Model, png_bytes, read_provenance
from chimle.serve import Server
from chimle.session import App
from chimle.tasks import downsample
from conftest import randomize, tiny_config

CHROMIUM = os.environ.get("CHIMLE_CHROMIUM", "/usr/bin/chromium")
DOCS = Path(__file__).resolve().parents[1] / "docs" / "serve.png"


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    if not Path(CHROMIUM).is_file():
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHIMLE_CHROMIUM)"
    return None


@pytest.fixture
def browser():
    reason = _missing()
    if reason:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"browser test: {reason}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield browser
        browser.close()


@pytest.fixture
def served(tmp_path):
    """A server on a free port with one super-resolution model (a tiny one, or CHIMLE_BROWSER_MODEL)."""
    path = os.environ.get("CHIMLE_BROWSER_MODEL")
    if path is None:
        config = tiny_config("super-resolution")
        path = tmp_path / "sr" / "model.safetensors"
        save_model(path, randomize(Generator(config.model), seed=4), config)
    model = Model.load(path, device="cpu")
    server = Server(App({"sr": model}), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, model
    server.shutdown()
    server.server_close()
    server.app.close()


def photo_input(model: Model, folder: Path) -> Path:
    """A held-out photo as the model takes it: a centre crop of its training size, downsampled."""
    scale = model.task.output_scale(model.levels)
    target = center_crop(load_image(list_images(builtin_photos("heldout"))[1]), model.config.data.crop)
    path = folder / "photo.png"
    path.write_bytes(png_bytes(downsample(target[None], scale)[0]))
    return path


def test_upload_sample_choose_vary_download_matches_the_cli(browser, served, tmp_path):
    from playwright.sync_api import expect

    server, model = served
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    problems = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.goto(server.url)
    expect(page.locator("#model option")).to_have_count(1)

    def choose(number: int) -> str:
        cell = page.locator("#grid .cell").nth(number)
        cell.click()
        expect(cell).to_have_class("cell selected")
        return page.locator("#chosen-sources").inner_text()

    def finished(count: int) -> None:
        expect(page.locator("#grid .cell")).to_have_count(count)
        expect(page.locator("#sample")).to_be_enabled()
        expect(page.locator("#progress-box")).to_be_hidden()
        expect(page.locator("#error")).to_be_hidden()

    # A file that is not an image: a clear message on the page.
    (tmp_path / "notes.txt").write_text("not an image")
    page.set_input_files("#file", tmp_path / "notes.txt")
    expect(page.locator("#error")).to_contain_text("not an image this page takes")

    # Upload -> samples.
    photo = photo_input(model, tmp_path)
    page.set_input_files("#file", photo)
    expect(page.locator("#input-info")).to_contain_text("photo.png")
    page.fill("#count", "4")
    page.fill("#seed", "3")
    page.click("#sample")
    finished(4)
    assert page.locator("#grid .cell span").all_inner_texts() == [f"3:{k}," * (model.levels - 1) + f"3:{k}"
                                                                   for k in range(4)]
    first = choose(2)

    # Vary details (keep the coarse levels), then vary structure (keep the fine levels), with fresh seeds.
    page.fill("#seed", "")
    split = int(page.locator("#split").input_value())
    page.click("#vary-details")
    finished(4)
    second = choose(1)
    assert second.split(",")[:split] == first.split(",")[:split] and second != first
    page.click("#vary-structure")
    finished(4)
    chosen = choose(3)
    assert chosen.split(",")[split:] == second.split(",")[split:] and chosen != second
    expect(page.locator("#history button")).to_have_count(3)
    expect(page.locator("#command")).to_contain_text(f"--sources {chosen}")

    # Download at full resolution; the CLI renders the same pixels from the recorded sources.
    with page.expect_download() as download:
        page.click("#download")
    downloaded = tmp_path / download.value.suggested_filename
    download.value.save_as(downloaded)
    assert read_provenance(downloaded)["sources"] == chosen
    assert main(["sample", "--model", str(model.path), "--input", str(photo), "--sources", chosen,
                 "--out", str(tmp_path / "cli")]) == 0
    cli = tmp_path / "cli" / downloaded.name
    assert np.array_equal(np.asarray(Image.open(downloaded)), np.asarray(Image.open(cli)))
    width, height = Image.open(photo).size
    assert Image.open(downloaded).size == (width * 2**model.levels, height * 2**model.levels)  # full resolution

    screenshot = Path(os.environ.get("CHIMLE_SCREENSHOT", tmp_path / "serve.png"))
    page.screenshot(path=str(screenshot), full_page=True)
    if os.environ.get("CHIMLE_UPDATE_DOCS"):
        page.screenshot(path=str(DOCS), full_page=True)
    assert screenshot.stat().st_size > 0 and not problems
