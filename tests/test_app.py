"""g2d app: what the page computes (analyse), its refusals, and the page itself driven in headless
Chromium (Debian's chromium + chromium-driver; skipped with a reason where they are missing)."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from g2d.errors import DataError, ImageReadError
from g2d.factory import load_model

pytest.importorskip("gradio")


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir)


def _png(path: Path, size: int = 96) -> Path:
    from g2d.data.synthetic import SyntheticCXR, SyntheticCXRCfg

    img = SyntheticCXR(SyntheticCXRCfg(num_samples=1, image_size=size, seed=3))[0]["image"][0].numpy()
    Image.fromarray((img * 255).astype(np.uint8)).save(path)
    return path


def test_analyse_gives_probabilities_heat_maps_and_the_attention_panel(model, tmp_path):
    from g2d.app import analyse

    probs, heats, panel = analyse(model, _png(tmp_path / "a.png"), "pleural effusion, pneumothorax")
    assert set(probs) == {"pleural effusion", "pneumothorax"} and all(0 < p < 1 for p in probs.values())
    assert [c for _, c in heats] == ["pleural effusion", "pneumothorax"]
    assert heats[0][0].shape[1] == 96 and heats[0][0].shape[0] > 96  # the image's grid, then the legend
    assert panel.ndim == 3 and panel.shape[1] == 2 * max(256, model.config.model.image_size)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ImageReadError, match="notes.txt"):
        analyse(model, tmp_path / "notes.txt", "effusion")
    with pytest.raises(DataError, match="at least one finding"):
        analyse(model, tmp_path / "a.png", " , ")


def test_uploads_above_the_limit_are_refused_and_the_page_binds_locally(tmp_path):
    import argparse
    import inspect

    from g2d.app import check_upload, serve
    from g2d.commands import app as app_command

    (tmp_path / "big.png").write_bytes(b"0" * 2_000_001)
    with pytest.raises(DataError, match="big.png is larger than 2 MB"):
        check_upload(tmp_path / "big.png", 2.0)
    assert check_upload(tmp_path / "big.png", 3.0) == tmp_path / "big.png"
    parser = argparse.ArgumentParser()
    app_command.register(parser.add_subparsers())
    assert parser.parse_args(["app", "--model", "m"]).host == "127.0.0.1"
    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_page_in_a_headless_browser(model, tmp_path):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from g2d.app import serve

    port = _free_port()
    page, folder = serve(model, port=port, block=False)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver), options=options)
    shot = Path(os.environ.get("G2D_ARTEFACTS", tmp_path)) / "app.png"
    try:
        browser.get(f"http://127.0.0.1:{port}")
        wait = WebDriverWait(browser, 120)
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#xray input[type=file]")))
        browser.find_element(By.CSS_SELECTOR, "#xray input[type=file]").send_keys(str(_png(tmp_path / "x.png", 160)))
        box = browser.find_element(By.CSS_SELECTOR, "#findings textarea")
        box.clear()
        box.send_keys("pleural effusion")
        wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#analyse"))).click()
        wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, "#probs"), "pleural effusion"))
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#heat img")))
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#attention img")))
        assert "%" in browser.find_element(By.CSS_SELECTOR, "#probs").text  # a probability is shown
        shot.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(shot))
        assert any(Path(folder.name).rglob("x.png"))  # the upload landed in the app's own temporary folder
    finally:
        browser.quit()
        page.close()
        folder.cleanup()
    assert shot.is_file() and shot.stat().st_size > 10_000
    assert not Path(folder.name).exists()  # uploads are gone with the server


def _wait_for_port(port: int, proc, timeout: float = 120.0) -> None:
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            pytest.fail(f"g2d app exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    proc.kill()
    pytest.fail("g2d app did not start listening")


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT"])
def test_a_real_server_removes_its_uploads_folder_when_stopped_and_earlier_ones_left_by_a_kill(
        tiny_model_dir, tmp_path, stop):
    """Issue 29: `g2d app` as a process; its temporary folder (uploads, examples) is gone after SIGTERM
    (kill, systemd, docker stop) as after SIGINT (Ctrl-C); a folder left by an app process that was
    SIGKILLed is removed at the next start; a folder whose owner still runs is kept."""
    import signal
    import subprocess
    import sys

    from g2d.app import FOLDER_PREFIX, OWNER_FILE

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale, alive = tmp / f"{FOLDER_PREFIX}stale", tmp / f"{FOLDER_PREFIX}alive"
    for folder, pid in ((stale, dead), (alive, str(os.getpid()))):
        folder.mkdir()
        (folder / OWNER_FILE).write_text(pid)
        (folder / "upload.png").write_bytes(b"patient image")
    port = _free_port()
    env = {**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "-m", "g2d", "app", "--model", str(tiny_model_dir), "--port", str(port),
                             "--device", "cpu"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_port(port, proc)
        mine = [f for f in tmp.glob(f"{FOLDER_PREFIX}*") if (f / OWNER_FILE).read_text() == str(proc.pid)]
        assert len(mine) == 1 and any(mine[0].iterdir())  # the examples are written there
        assert not stale.exists() and alive.exists()
        proc.send_signal(getattr(signal, stop))
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not mine[0].exists(), proc.stderr.read()[-2000:]
    assert alive.exists()
