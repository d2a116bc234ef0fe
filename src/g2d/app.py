"""``g2d app``: a local web page (Gradio) to look at a model: drop a chest X-ray (PNG, JPEG or DICOM),
type findings, and see the zero-shot probabilities, the grounding heat map of each finding over the
image, and the attention map with its pseudo mask. Synthetic example images are one click away.

Safe by default: binds to 127.0.0.1, refuses files above ``max_mb`` and files that are not images
(with the reader's message), and keeps uploads only in a temporary folder it removes when it stops:
on Ctrl-C (SIGINT), on SIGTERM (``kill``, systemd, ``docker stop``), and, for a run that was killed
outright (SIGKILL, a power loss), at the next start of the app (:func:`remove_stale_folders`).
Needs the ``app`` extra (``pip install -e ".[app]"``); the library never imports it.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from g2d.data.images import read_image
from g2d.errors import DataError, ImageReadError
from g2d.figures import heat_overlay
from g2d.inference.engine import ImageTextInferenceEngine
from g2d.model import G2DModel
from g2d.pseudo_mask import build_pseudo_masks

__all__ = ["analyse", "check_upload", "build_app", "serve", "write_examples", "remove_stale_folders"]

log = logging.getLogger("g2d.app")

FOLDER_PREFIX = "g2d-app-"
OWNER_FILE = "owner.pid"  # the pid of the app process that owns the folder


def _findings(text: str) -> list[str]:
    found = [f.strip() for f in text.replace(";", ",").split(",") if f.strip()]
    if not found:
        raise DataError("type at least one finding, e.g. 'pleural effusion, pneumothorax'")
    return found


@torch.no_grad()
def analyse(model: G2DModel, path: str | Path, findings: str, prompts: str | None = None
            ) -> tuple[dict[str, float], list[tuple[np.ndarray, str]], np.ndarray]:
    """What the page shows for one image.

    :param path: a PNG/JPEG/TIFF/DICOM file. :param findings: comma-separated finding names.
    :param prompts: a prompt file or shipped name for the zero-shot prompts (default: ``default``).
    :return: ({finding: zero-shot probability}, [(grounding overlay uint8 [H', W, 3], caption)] per
        finding at the image's resolution, attention panel uint8 [H', 2D, 3] with D = max(256, crop):
        the head-mean attention on the model's crop and, beside it, the pseudo mask built from it).
    :raises ImageReadError: not an image (the message names the file). :raises DataError: no finding.
    """
    names = _findings(findings)
    img = read_image(path)                                                     # [H, W] in [0, 1]
    engine = ImageTextInferenceEngine.for_model(model)
    probs = engine.zero_shot([img], names, prompts)[0]
    maps = engine.similarity_maps(img, [f"there is {n}" for n in names])
    heats = [(heat_overlay(img, m, legend=f"there is {n}"), n) for m, n in zip(maps, names)]
    x = engine.prepare(img)                                                    # [1, 1, S, S]
    out = model.image_forward(x, decode=False)
    attention = out.attention.float()                                          # [1, heads, h, w]
    mask = build_pseudo_masks(attention, x.float(), model.cfg.pseudo_mask)[0, 0].cpu().numpy()
    side = max(256, x.shape[-1])  # shown at least 256 px wide: small models see 64-128 px crops
    up = torch.nn.functional.interpolate
    crop = up(x.float(), size=(side, side), mode="bilinear", align_corners=False)[0, 0].cpu().numpy()
    att = up(attention.mean(1, keepdim=True), size=(side, side), mode="bilinear", align_corners=False)[0, 0]
    shown = up(torch.from_numpy(mask)[None, None].float(), size=(side, side), mode="nearest")[0, 0].numpy()
    left = heat_overlay(crop, att.cpu().numpy(), legend="attention (head mean)", unit="weight")
    right = heat_overlay(crop, np.where(shown > 0.5, 1.0, np.nan), alpha=0.5, legend="pseudo mask", unit=None)
    if right.shape[0] < left.shape[0]:  # the same strip height without a colour bar row
        right = np.concatenate([right, np.full((left.shape[0] - right.shape[0], side, 3), 255, np.uint8)])
    return {n: float(p) for n, p in zip(names, probs.tolist())}, heats, np.concatenate([left, right], axis=1)


def check_upload(path: str | Path, max_mb: float) -> Path:
    """The uploaded file, or ``DataError`` when it is larger than ``max_mb`` (decimal MB); the reader
    then refuses what is not an image."""
    path = Path(path)
    if path.stat().st_size > max_mb * 1e6:
        raise DataError(f"{path.name} is larger than {max_mb:g} MB")
    return path


def write_examples(folder: Path, size: int, n: int = 4) -> list[str]:
    """``n`` synthetic radiographs with findings as PNG files (the page's one-click examples)."""
    from PIL import Image

    from g2d.data.synthetic import SyntheticCXR, SyntheticCXRCfg

    data = SyntheticCXR(SyntheticCXRCfg(num_samples=4 * n, image_size=max(size, 128), seed=31))
    paths: list[str] = []
    for i in range(len(data)):
        item = data[i]
        if item["findings"] and len(paths) < n:
            path = folder / f"synthetic_{i}_{item['findings'][0][0]}.png"
            Image.fromarray((item["image"][0].numpy() * 255).round().astype(np.uint8)).save(path)
            paths.append(str(path))
    return paths


def build_app(model: G2DModel, examples: list[str], max_mb: float) -> Any:
    """The Gradio page (``gradio.Blocks``) for ``model``."""
    import gradio as gr

    def run(file: Any, findings: str) -> tuple[dict[str, float], list[tuple[np.ndarray, str]], np.ndarray]:
        if file is None:
            raise gr.Error("drop a chest X-ray first (PNG, JPEG or DICOM)")
        try:
            return analyse(model, check_upload(file if isinstance(file, str) else file.name, max_mb), findings)
        except (ImageReadError, DataError) as err:
            raise gr.Error(str(err)) from None

    with gr.Blocks(title="g2d: zero-shot and grounding") as page:
        gr.Markdown("# g2d\nDrop a chest X-ray, type findings, press **Analyse**. A research model, not a "
                    "medical device.")
        with gr.Row():
            with gr.Column():
                file = gr.File(label="chest X-ray (PNG, JPEG, DICOM)", file_types=["image", ".dcm", ".dicom"],
                               elem_id="xray")
                findings = gr.Textbox(label="findings (comma-separated)", value="pleural effusion, pneumothorax",
                                      elem_id="findings")
                button = gr.Button("Analyse", variant="primary", elem_id="analyse")
                gr.Examples(examples=[[p, "opacity, nodule, effusion, pneumothorax, cardiomegaly"] for p in examples],
                            inputs=[file, findings], label="synthetic examples")
            with gr.Column():
                probs = gr.Label(label="zero-shot probability", elem_id="probs")
                heat = gr.Gallery(label="grounding: similarity to each finding", elem_id="heat", columns=2)
                attention = gr.Image(label="attention map | pseudo mask", elem_id="attention")
        button.click(run, inputs=[file, findings], outputs=[probs, heat, attention])
    return page


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def remove_stale_folders(root: str | Path | None = None) -> list[Path]:
    """Remove the upload folders (``g2d-app-*`` in the temporary directory) of app processes that no
    longer run (killed without cleanup); a folder whose owner still runs, or without an owner file, is
    kept. Returns the folders removed."""
    removed = []
    for folder in sorted(Path(root or tempfile.gettempdir()).glob(f"{FOLDER_PREFIX}*")):
        try:
            pid = int((folder / OWNER_FILE).read_text().strip())
        except (OSError, ValueError):
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    if removed:
        log.info("removed %d upload folder(s) left by app processes that were killed", len(removed))
    return removed


def serve(model: G2DModel, host: str = "127.0.0.1", port: int = 7860, max_mb: float = 20.0,
          block: bool = True) -> Any:
    """Start the page. Uploads and examples live in one temporary folder, removed when the server
    stops: on return, Ctrl-C (SIGINT) or SIGTERM (``block=True`` in the main thread; ``block=False``
    returns ``(page, folder)`` for the caller to close). Folders of earlier app processes that were
    killed outright are removed first (:func:`remove_stale_folders`)."""
    remove_stale_folders()
    folder = tempfile.TemporaryDirectory(prefix=FOLDER_PREFIX)
    (Path(folder.name) / OWNER_FILE).write_text(str(os.getpid()))
    previous = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = folder.name  # gradio puts uploads there (read at each upload)
    handlers = {}
    if block and threading.current_thread() is threading.main_thread():
        def stop(signum: int, frame: Any) -> None:  # gradio's blocking loop closes the server on it
            raise KeyboardInterrupt(signal.Signals(signum).name)

        handlers = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        page = build_app(model, write_examples(Path(folder.name), model.config.model.image_size), max_mb)
        page.launch(server_name=host, server_port=port, max_file_size=f"{max_mb:g}mb",
                    prevent_thread_lock=not block, show_error=True, allowed_paths=[folder.name])
    except BaseException:
        folder.cleanup()
        raise
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if block:
        folder.cleanup()
        if previous is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = previous
        return None
    return page, folder
