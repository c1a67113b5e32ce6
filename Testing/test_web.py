"""`jointregseg web` in a real browser: Playwright driving Debian's Chromium against the real server.

The server runs as a user starts it (``python -m JointRegSegLib.cli web --data DIR --port P``),
with the real worker and slicer-core's scene and views. The browser test opens the page, runs tto
on the bundled sample pair with a few iterations, watches the progress bar advance, looks at the
warped overlay, the Jacobian map with its legend, the segmentation outlines, the Dice value in the
metrics table and the downloaded output folder; a second viewer's Run is refused while the run
goes; a second run is cancelled and the scene is unchanged; a text file named .nii.gz is refused
at upload with the command line's own message; a client that names a path outside the folders is
refused. Each state is photographed: into Screenshots/ with ``JRS_UPDATE_SCREENSHOTS=1``, else
into the test's temporary folder. Skipped, saying why, without trame-slicer, Playwright or a
Chromium (`.ci/run` installs Debian's). Nothing here is about speed: waits are generous.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("trame_slicer", reason="the web page needs the [web] extra (trame-slicer[standalone])")

from JointRegSegLib.colour_scales import jacobian_control_points  # noqa: E402
from JointRegSegLib.errors import InputError  # noqa: E402
from JointRegSegLib.imageio import read_image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
VIEWPORT = {"width": 1600, "height": 1000}
START_TIMEOUT = 600
RUN_TIMEOUT = 1500  # a busy 2-core machine; nothing here is about speed
UI_TIMEOUT_MS = 120_000
ITERATIONS = 5


def chromium_path() -> str | None:
    """$JRS_CHROMIUM, else Debian's chromium on the PATH."""
    return os.environ.get("JRS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class WebServer:
    """`jointregseg web` in a child process, its output collected by a thread."""

    def __init__(self, data: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.lines: list[str] = []
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        self.launched = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "JointRegSegLib.cli", "web", "--data", str(data), "--port", str(self.port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=str(REPO),
        )
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT
        while not any("ready after" in line for line in self.lines):
            assert self.process.poll() is None, "the server stopped:\n" + "\n".join(self.lines[-40:])
            assert time.monotonic() < deadline, "the server did not start:\n" + "\n".join(self.lines[-40:])
            time.sleep(0.2)
        self.ready = time.monotonic() - self.launched

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip())

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory, sample_pair) -> Path:
    data = tmp_path_factory.mktemp("data")
    shutil.copy(sample_pair["moving"], data / "second_subject.nii.gz")
    return data


@pytest.fixture(scope="module")
def server(data_folder):
    web = WebServer(data_folder)
    yield web
    web.stop()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install -e '.[test]')")
    executable = chromium_path()
    if executable is None:
        pytest.skip("no Chromium to drive: install Debian's (apt-get install chromium; .ci/run does) or set JRS_CHROMIUM")
    with sync_api.sync_playwright() as playwright:
        try:
            chromium = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        except Exception as error:  # a browser that cannot start here is a missing browser, said plainly
            pytest.skip(f"Chromium at {executable} could not start: {str(error).splitlines()[0]}")
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    """Where the screenshots go: Screenshots/ with JRS_UPDATE_SCREENSHOTS=1, else a temporary folder."""
    return REPO / "Screenshots" if os.environ.get("JRS_UPDATE_SCREENSHOTS") == "1" else tmp_path_factory.mktemp("screenshots")


# Helpers: what a viewer sees


def _open(browser, url: str):
    page = browser.new_page(viewport=VIEWPORT)
    page.set_default_timeout(UI_TIMEOUT_MS)
    page.goto(url)
    _wait_views(page)
    return page


def _wait_views(page) -> None:
    """Until every view shows a rendered image."""
    page.wait_for_function(
        "() => { const imgs = [...document.querySelectorAll('#jrs-views img')];"
        " return imgs.length >= 4 && imgs.every(i => i.complete && i.naturalWidth > 0); }",
        timeout=UI_TIMEOUT_MS,
    )


def _state(page, name: str):
    return page.evaluate(f"() => window.trame.state.get({json.dumps(name)})")


def _wait_state(page, name: str, predicate, timeout: float = RUN_TIMEOUT):
    deadline = time.monotonic() + timeout
    while True:
        value = _state(page, name)
        if predicate(value):
            return value
        assert time.monotonic() < deadline, f"{name} stayed {value!r}"
        time.sleep(0.25)


AXIAL, THREE_D = 0, 1  # the views' places in the page: axial and 3D on top, coronal and sagittal below


def _view(page, index: int = AXIAL) -> np.ndarray:
    """A view as the viewer sees it (RGB)."""
    from PIL import Image

    png = page.locator("#jrs-views img").nth(index).screenshot()
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def _settle(page) -> None:
    """Let the views re-render and the new images arrive."""
    time.sleep(2.0)
    _wait_views(page)


def _choose_overlay(page, overlay: str) -> None:
    page.locator("#jrs-overlay").locator("xpath=ancestor::div[contains(@class, 'v-field ')][1]").click()
    page.get_by_role("option", name=overlay).click()
    page.get_by_text(overlay, exact=True).first.wait_for()
    _settle(page)


def _metrics(page) -> dict[str, dict[str, str]]:
    columns = page.locator("#jrs-metrics th").all_inner_texts()
    rows = {}
    for row in page.locator("#jrs-metrics tbody tr").all():
        cells = row.locator("td").all_inner_texts()
        if cells:
            rows[cells[0]] = dict(zip(columns[1:], cells[1:]))
    return rows


def _scene(page) -> list[str]:
    return page.locator(".jrs-scene-node").all_inner_texts()


def _near(image: np.ndarray, rgb: tuple[float, float, float], tolerance: int = 30) -> int:
    """How many pixels lie within ``tolerance`` of ``rgb`` (0..1) in every channel."""
    target = np.round(np.asarray(rgb) * 255)
    return int((np.abs(image - target) <= tolerance).all(axis=-1).sum())


# The tests


def test_page_run_cancel_upload_in_a_real_browser(server, browser, shots, sample_pair, tmp_path):
    page = _open(browser, server.url)
    first_view = time.monotonic() - server.launched
    print(f"\nstart-up: server ready {server.ready:.1f} s after launch, first rendered view {first_view:.1f} s after launch")
    assert page.locator("#jrs-state").inner_text().strip() == "Ready"
    assert _state(page, "fixed_file") == "sample/fixed_img.nii.gz" and _state(page, "moving_file") == "sample/moving_img.nii.gz"
    assert "data/second_subject.nii.gz" in [item["value"] for item in _state(page, "files")]
    page.screenshot(path=str(shots / "web_1_start.png"))
    before_run = _view(page)

    # Run tto with a few iterations: the button turns into Cancel, the progress bar advances.
    page.locator("#jrs-iterations").fill(str(ITERATIONS))
    _wait_state(page, "iterations", lambda v: v == ITERATIONS, 30)
    page.locator("#jrs-run").click()
    progress: list[int] = []
    second = None
    deadline = time.monotonic() + RUN_TIMEOUT
    while _state(page, "run_state") != "idle" or not progress:
        assert time.monotonic() < deadline, "the run did not finish"
        value = int(_state(page, "progress") or 0)
        if _state(page, "run_state") == "running":
            if not progress or value != progress[-1]:
                progress.append(value)
            if value >= 30 and not (shots / "web_2_running.png").exists():
                assert page.locator("#jrs-run").inner_text().strip().lower() == "cancel"
                page.screenshot(path=str(shots / "web_2_running.png"))
            if len(progress) >= 3 and second is None:
                second = _second_viewer_is_refused(browser, server.url, shots)
        time.sleep(0.3)
    assert second, "the run ended before a second viewer could try"
    assert progress == sorted(progress) and len(set(progress)) >= 3, progress
    status = page.locator("#jrs-status").inner_text()
    assert status.startswith("Finished tto"), status + "\n" + _state(page, "log")

    # The result: warped overlay, Dice in the metrics table.
    _settle(page)
    assert _state(page, "overlay") == "Warped image"
    warped = _view(page)
    assert np.abs(warped - before_run).mean() > 1.0, "the views did not change to the warped overlay"
    metrics = _metrics(page)
    dice_after, dice_before = float(metrics["Dice mean"]["tto"]), float(metrics["Dice mean"]["Before"])
    assert 0.0 < dice_before < dice_after <= 1.0, metrics["Dice mean"]
    page.screenshot(path=str(shots / "web_3_warped.png"))

    # The Jacobian map with its legend (on the page and in the views), folding marked.
    _choose_overlay(page, "Jacobian determinant")
    legend = page.locator("#jrs-legend").inner_text()
    assert "Jacobian determinant" in legend and "folding" in legend, legend
    legend_view = _view(page, THREE_D)  # Slicer's own colour legend stands in the 3D view
    ramp = jacobian_control_points()
    assert _near(legend_view, ramp[-1][1:]) > 20 and _near(legend_view, ramp[0][1:]) > 20, "no Jacobian colour bar in the 3D view"
    page.screenshot(path=str(shots / "web_4_jacobian.png"))

    _choose_overlay(page, "Segmentation outlines")
    legend = page.locator("#jrs-legend").inner_text()
    assert "Left-Lateral-Ventricle" in legend and "Right-Hippocampus" in legend, legend
    page.screenshot(path=str(shots / "web_5_outlines.png"))
    _choose_overlay(page, "Checkerboard fixed / warped")
    page.screenshot(path=str(shots / "web_6_checkerboard.png"))
    _choose_overlay(page, "Warped image")

    # The output folder, downloaded as the viewer would.
    with page.expect_download() as download:
        page.get_by_text("Download tto (1) output").click()
    archive = tmp_path / "output.zip"
    download.value.save_as(archive)
    names = set(zipfile.ZipFile(archive).namelist())
    assert {"warped.nii", "displacement.nii", "jacobian.nii", "metrics.json"} <= names, names

    # A second run, cancelled: nothing is added, the views and the table stay as they were.
    scene, table, view = _scene(page), _metrics(page), _view(page)
    page.locator("#jrs-iterations").fill("1000")  # with its time budget, far longer than the wait for its first progress
    _wait_state(page, "iterations", lambda v: v == 1000, 30)
    page.locator("#jrs-run").click()
    _wait_state(page, "progress", lambda v: (v or 0) > 0)
    page.locator("#jrs-run").click()
    _wait_state(page, "run_state", lambda v: v == "idle")
    _wait_state(page, "status", lambda v: v.startswith("Cancelled"), 60)
    _settle(page)
    assert _scene(page) == scene and _metrics(page) == table
    assert np.abs(_view(page) - view).mean() < 1.0, "the views changed after a cancelled run"
    page.screenshot(path=str(shots / "web_7_cancelled.png"))

    # A text file named .nii.gz is refused at upload with the command line's message; nothing is offered.
    text_file = tmp_path / "not_an_image.nii.gz"
    text_file.write_text("This is a text file, not a brain scan.\n")
    with pytest.raises(InputError) as expected:
        read_image(text_file, "image")
    page.locator("#jrs-upload").set_input_files(str(text_file))
    notice = page.locator("#jrs-notice")
    notice.wait_for(state="visible")
    assert notice.inner_text().strip() == str(expected.value).replace(str(text_file), "uploads/not_an_image.nii.gz")
    assert not any("not_an_image" in item["value"] for item in _state(page, "files"))
    page.screenshot(path=str(shots / "web_8_upload_refused.png"))
    good = tmp_path / "my upload.nii.gz"
    shutil.copy(sample_pair["moving"], good)
    page.locator("#jrs-upload").set_input_files(str(good))
    _wait_state(page, "files", lambda files: "uploads/my upload.nii.gz" in [item["value"] for item in files], 120)

    # A client that names a path outside the page's folders gets an error, not the file.
    page.evaluate("() => window.trame.state.set('moving_file', 'data/../../../../etc/passwd')")
    errors = _wait_state(page, "input_errors", lambda v: "moving_file" in (v or {}), 60)
    assert "not inside a folder the page may read" in errors["moving_file"][0]
    assert _scene(page) == scene
    page.close()


def _second_viewer_is_refused(browser, url: str, shots: Path) -> bool:
    """Another viewer sees the run's progress; its Run is refused with a message; the run goes on."""
    other = _open(browser, url)
    try:
        _wait_state(other, "progress", lambda v: (v or 0) > 0, 60)
        assert other.locator("#jrs-run").inner_text().strip().lower() == "run"
        other.locator("#jrs-run").click()
        notice = other.locator("#jrs-notice")
        notice.wait_for(state="visible")
        assert "another viewer" in notice.inner_text()
        assert _state(other, "run_state") in ("running", "loading results")
        other.screenshot(path=str(shots / "web_2b_second_viewer.png"))
    finally:
        other.close()
    return True


def test_http_routes_refuse_paths_outside(server, data_folder):
    """No upload name, download index or static path reaches outside the page's folders."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    for name in ("../../evil.nii.gz", "/tmp/evil.nii.gz", "sub/evil.nii.gz"):
        connection.request("POST", "/jointregseg/upload?viewer=t&name=" + urllib.parse.quote(name), body=b"x" * 64)
        response = connection.getresponse()
        answer = json.loads(response.read())
        assert response.status == 400 and not answer["ok"] and "plain file name" in answer["message"], (name, answer)
    for path in ("/jointregseg/download/999", "/jointregseg/download/..%2F..%2Fetc%2Fpasswd", "/jointregseg/download/-1"):
        connection.request("GET", path)
        response = connection.getresponse()
        assert response.status == 404, path
        response.read()
    for path in ("/../../../../etc/passwd", "/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/static/..%2f..%2f..%2fetc%2fpasswd"):
        connection.request("GET", path)
        response = connection.getresponse()
        assert b"root:" not in response.read(), path
    assert not list(Path(data_folder).glob("evil*")) and not Path("/tmp/evil.nii.gz").exists()
