"""The Serve app's web page in a real headless browser: Debian's chromium (`install.sh` installs it) driven by
playwright, against tiny-random apps on 127.0.0.1. The finished page's screenshot is kept in $LIPSYNC_ARTIFACTS
(default: a folder under pytest's temporary directory, printed by the test)."""

import base64
import os
from pathlib import Path

import pytest

import lipsync_ray
from lipsync_ray.media import probe_video
from lipsync_ray.receive import RequestInputs

from .conftest import serve_apps

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
DEMO = Path(lipsync_ray.__file__).parent / "data" / "demo"
TINY = {"model": "tiny-random", "steps": 1, "detector": "offline"}
KEY = "page-k3y-5d1e"
RESULT_TIMEOUT_MS = 300_000

pytestmark = pytest.mark.slow  # a Serve app and a browser: about a minute


@pytest.fixture(scope="module")
def service(ray_local, tmp_path_factory):
    """An open app at / and one behind an API key at /secured."""
    common = {"pipeline": TINY, "gpu": False, "prepare_replicas": (1, 1), "generate_replicas": (1, 1)}
    apps = {
        "page": ("/", {**common, "work_dir": str(tmp_path_factory.mktemp("page_work"))}),
        "page_secured": ("/secured", {**common, "api_key": KEY, "work_dir": str(tmp_path_factory.mktemp("page_work_secured"))}),
    }
    with serve_apps(apps) as base:
        yield base


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Chromium with a fresh profile, no sandbox (containers), nothing fetched from elsewhere."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `bash install.sh` installs it (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium_profile")), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS, accept_downloads=True,
        )
        yield context
        context.close()


@pytest.fixture()
def page(browser):
    page = browser.new_page()
    yield page
    page.close()


def _open(page, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("#submit:enabled")  # the parameters came from GET v1/options


def _drop(page, selector: str, path: Path) -> None:
    """Drop the file at `path` on the element at `selector`, as a file dragged from the desktop."""
    page.evaluate("""([selector, name, data]) => {
        const picked = new DataTransfer();
        picked.items.add(new File([Uint8Array.from(atob(data), (c) => c.charCodeAt(0))], name));
        document.querySelector(selector).dispatchEvent(new DragEvent("drop", {dataTransfer: picked, bubbles: true, cancelable: true}));
    }""", [selector, path.name, base64.b64encode(path.read_bytes()).decode()])


def _played(page, selector: str) -> dict:
    """Play a media element (muted) for a moment: its duration, how far it got and its error code."""
    return page.evaluate("""async (selector) => {
        const media = document.querySelector(selector);
        if (media.readyState < 1) await new Promise((resolve) => media.addEventListener("loadedmetadata", resolve, {once: true}));
        media.muted = true;
        await media.play();
        await new Promise((resolve) => setTimeout(resolve, 1000));
        media.pause();
        return {duration: media.duration, time: media.currentTime, error: media.error && media.error.code};
    }""", selector)


def test_the_page_lip_syncs_the_demo_and_plays_the_result(service, page, tmp_path_factory, capsys):
    _open(page, service)
    names = page.locator("#params [name]").evaluate_all("inputs => inputs.map((input) => input.name)")
    assert names == list(RequestInputs.PARAMS)
    page.set_input_files("#video", DEMO / "video.mp4")  # picked
    _drop(page, '.drop[data-field="audio"]', DEMO / "audio.m4a")  # dropped
    for preview in ("#video-preview", "#audio-preview"):  # both inputs preview
        shown = _played(page, preview)
        assert shown["error"] is None and abs(shown["duration"] - 3.0) < 0.05 and shown["time"] > 0.2, (preview, shown)
    page.fill("#param-seed", "7")
    page.click("#submit")
    page.wait_for_selector("#result:not([hidden])", timeout=RESULT_TIMEOUT_MS)
    assert page.eval_on_selector("#progress", "bar => bar.value") == 1 and page.inner_text("#status") == "done"
    result = _played(page, "#result-video")  # 3 s of audio: 75 frames at 25 fps
    assert result["error"] is None and abs(result["duration"] - 3.0) < 0.05 and result["time"] > 0.2, result
    with page.expect_download() as download:
        page.click("#download")
    assert download.value.suggested_filename == "video-lipsync.mp4"
    assert probe_video(download.value.path()).frames == 75
    assert page.locator(".error:not(:empty)").count() == 0

    artifacts = Path(os.environ.get("LIPSYNC_ARTIFACTS") or tmp_path_factory.getbasetemp() / "artifacts")
    artifacts.mkdir(parents=True, exist_ok=True)
    page.evaluate("document.querySelector('#result-video').currentTime = 1.5")
    page.screenshot(path=artifacts / "web_page.png", full_page=True)
    with capsys.disabled():
        print(f"\nweb page screenshot: {artifacts / 'web_page.png'}")


def test_an_api_error_is_shown_next_to_its_field(service, page, tmp_path):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40)
    _open(page, service)
    page.set_input_files("#video", corrupt)
    page.set_input_files("#audio", DEMO / "audio.m4a")
    page.click("#submit")
    error = page.locator('.error[data-for="video"]')
    error.wait_for(state="visible")
    assert "video.mp4" in error.inner_text() and page.locator('.drop[data-field="video"]').get_attribute("class") == "drop invalid"
    assert page.locator(".error:not(:empty)").count() == 1  # only there
    page.fill("#param-steps", "0")  # out of range: the server's 422 names the parameter
    page.set_input_files("#video", DEMO / "video.mp4")
    page.click("#submit")
    page.locator('.error[data-for="steps"]').wait_for(state="visible")
    assert page.locator(".error:not(:empty)").count() == 1


def test_the_page_asks_for_the_api_key_and_never_holds_one(service, page):
    page.goto(f"{service}/secured")
    page.wait_for_selector("#key:not([hidden])")  # the service answered 401
    assert KEY not in page.content()
    page.fill("#api-key", "wrong")
    page.click("#key-form button")
    page.wait_for_selector('.error[data-for="X-API-Key"]:text("wrong API key")')
    page.fill("#api-key", KEY)
    page.click("#key-form button")
    page.wait_for_selector("#submit:enabled")  # options loaded from /secured/v1/options with the key
    assert page.is_hidden("#key") and page.locator(".error:not(:empty)").count() == 0
