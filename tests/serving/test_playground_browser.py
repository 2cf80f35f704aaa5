"""The playground page in a real browser: headless Chromium (Debian's `chromium` and
`chromium-driver`, driven by Selenium) against a real `serve` of the pretrained bundle.

CI (CI=true) must have the browser: .ci/run installs it, and the test fails without it; elsewhere
it is skipped with the install command.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.server_process import ServerProcess
from client import grpc_client
from serving.config import FREE_PORT

ROOT = Path(__file__).resolve().parents[2]
BROWSER, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
INSTALL = "apt-get update && apt-get install -y chromium chromium-driver"
SCREENSHOT_COPY = Path("/tmp/playground.png")  # a copy to look at after a run
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1100,700")
# Resolves with the page's state once its next draw has finished ("playground:done"), after
# arguments[0] (a JavaScript expression, or null) has started one.
WAIT_FOR_DRAW = """
const [start, done] = [arguments[0], arguments[arguments.length - 1]];
if (!start && ["drawn", "error"].includes(document.body.dataset.state)) { done(document.body.dataset.state); return; }
document.addEventListener("playground:done", (event) => done(event.detail.state), {once: true});
if (start) eval(start);
"""


def browser_or_skip():
    missing = [path for path in (BROWSER, DRIVER) if not os.path.exists(path)]
    try:
        import selenium  # noqa: F401  (the test extra)
    except ImportError:
        missing.append("the selenium package (pip install -e '.[test]')")
    if missing:
        message = f"needs headless Chromium ({', '.join(missing)} missing): {INSTALL}"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (.ci/run installs it)")
        pytest.skip(message)


@pytest.fixture(scope="module")
def chromium(tmp_path_factory):
    browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_script_timeout(120)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def pretrained_server(tmp_path_factory):
    """`serve` of the shipped bundle in its own process, CORS on, with the metrics page (to count preflights)."""
    monitoring = tmp_path_factory.mktemp("monitoring") / "monitoring.config"
    monitoring.write_text('prometheus_config { enable: true path: "/metrics" }\n')
    with ServerProcess.start(model_base_path=str(ROOT / "pretrained" / "digitgan"), port=0, rest_port=FREE_PORT,
                             poll_seconds=0, grace_seconds=1.0, rest_api_enable_cors_support=True,
                             monitoring_config_file=str(monitoring)) as server:
        yield server


def draw(driver, start: str | None = None) -> str:
    return driver.execute_async_script(WAIT_FOR_DRAW, start)


def png_size_and_pixels(source: str):
    prefix = "data:image/png;base64,"
    assert source.startswith(prefix)
    image = Image.open(io.BytesIO(base64.b64decode(source[len(prefix):])))
    assert image.format == "PNG"
    return image.size, np.asarray(image)


def preflights_answered(server) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.rest_port}/metrics", timeout=30) as reply:
        page = reply.read().decode()
    found = re.search(r':tensorflow:serving:request_count\{model_name="",status="OK"\} (\d+)', page)
    return int(found.group(1)) if found else 0


@pytest.mark.slow  # a server process and a browser
def test_playground_draws_the_picked_digits(chromium, pretrained_server, tmp_path):
    from selenium.webdriver.common.by import By

    chromium.get(f"http://127.0.0.1:{pretrained_server.rest_port}/")
    assert draw(chromium) == "drawn"  # the page draws every digit once on opening
    assert chromium.find_element(By.ID, "model-status").text == "model digitgan: version 1 AVAILABLE"
    # Pick 3 and 7 (all ten start picked), 5 of each, seed 42, as a person would.
    for box in chromium.find_elements(By.CSS_SELECTOR, "#digits label"):
        if box.text not in ("3", "7"):
            box.click()
    for field, value in (("count", "5"), ("seed", "42")):
        chromium.find_element(By.ID, field).clear()
        chromium.find_element(By.ID, field).send_keys(value)
    assert draw(chromium, "document.getElementById('draw').click()") == "drawn"

    rows = chromium.find_elements(By.CSS_SELECTOR, "#grid .row")
    assert [row.find_element(By.CSS_SELECTOR, ".digit-label").text for row in rows] == ["3", "7"]
    sources = [image.get_attribute("src") for image in chromium.find_elements(By.CSS_SELECTOR, "#grid img")]
    assert len(sources) == 10
    decoded = [png_size_and_pixels(source) for source in sources]
    assert all(size == (28, 28) for size, _ in decoded)
    # The same images any client gets for digits 3 and 7, 5 each, seed 42 (seeds 42..51).
    expected, _version = grpc_client.generate(pretrained_server.address, digits=[3, 7], count=5, seed=42)
    pixels = np.stack([array.reshape(28, 28) for _, array in decoded]).astype(np.float32) / 255
    np.testing.assert_allclose(pixels, expected.reshape(10, 28, 28), atol=1 / 255 + 1e-6)
    # What "Download PNG" saves: the grid drawn on a canvas, 56-pixel digits with 4-pixel gaps.
    grid = chromium.execute_script("return window.playground.gridCanvas().toDataURL('image/png')")
    assert png_size_and_pixels(grid)[0] == (5 * 60 + 4, 2 * 60 + 4)
    assert chromium.find_element(By.ID, "download").is_enabled()

    screenshot = tmp_path / "playground.png"
    assert chromium.save_screenshot(str(screenshot))
    shutil.copyfile(screenshot, SCREENSHOT_COPY)


@pytest.mark.slow  # a server process and a browser
def test_a_page_on_another_origin_draws_through_a_cors_preflight(chromium, pretrained_server):
    """http://127.0.0.1:PORT serves the page, which calls http://localhost:PORT: another origin,
    so Chromium sends a real preflight before its JSON POST, and reads the replies only with
    the CORS headers `--rest-api-enable-cors-support` adds."""
    from selenium.webdriver.common.by import By

    before = preflights_answered(pretrained_server)
    port = pretrained_server.rest_port
    chromium.get(f"http://127.0.0.1:{port}/?server=http://localhost:{port}")
    assert draw(chromium) == "drawn", chromium.find_element(By.ID, "message").text
    assert len(chromium.find_elements(By.CSS_SELECTOR, "#grid img")) == 80  # ten digits, eight each
    assert chromium.find_element(By.ID, "model-status").text == "model digitgan: version 1 AVAILABLE"
    assert preflights_answered(pretrained_server) == before + 1
