"""``g2d figure attention``: Fig.-4-style panels (image, aggregated attention, pseudo mask, report).

Works with any G2D checkpoint or export; the images are preprocessed exactly as at evaluation time
(:func:`g2d.data.transforms.build_transform` with the model's own resize and crop), and the pseudo
masks are built with the model's own pseudo-mask settings.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["attention_figure", "register"]


def _report(arg: str) -> str:
    """A report is a path to a text file, or the text itself."""
    p = Path(arg)
    if p.suffix.lower() == ".txt" and p.is_file():
        return p.read_text(encoding="utf-8", errors="replace").strip()
    return arg


def attention_figure(model_path: str | Path, images: Sequence[str | Path], reports: Sequence[str],
                     out_dir: str | Path, device: str = "cpu") -> list[Path]:
    """Write ``OUT/attention_panels.png`` (one row per image) and ``OUT/<image stem>.png`` each.

    :param reports: one per image (text or ``.txt`` path), or empty for no report column text.
    :return: the written PNG paths, combined figure first.
    """
    from g2d.data.images import read_image
    from g2d.data.transforms import build_transform
    from g2d.errors import ConfigError
    from g2d.factory import load_model
    from g2d.figures import attention_panels
    from g2d.peers import PEER_KINDS, split_model_spec
    from g2d.pseudo_mask import build_pseudo_masks

    kind, _ = split_model_spec(str(model_path))
    if kind in PEER_KINDS:
        from g2d.peer_vlm import PEER_TEXT

        hint = (f" For its image-text similarity map use: g2d ground IMAGE --model {model_path} [--text-model "
                "NAME|DIR] --text '...' --out heat.png" if kind in PEER_TEXT else "")
        raise ConfigError(f"g2d figure attention draws G2D's attention-pooling maps and pseudo masks; a {kind} "
                          f"model has neither.{hint}")
    if reports and len(reports) != len(images):
        raise ValueError(f"got {len(images)} images but {len(reports)} reports; give one report per "
                         "image or none")
    model = load_model(model_path, device=device)
    tf = build_transform(model.preprocess, train=False)
    batch = torch.stack([tf(read_image(p)) for p in images]).to(device)
    texts = [_report(r) for r in reports] if reports else [""] * len(images)
    with torch.no_grad():
        out = model.image_forward(batch, decode=False)
        masks = build_pseudo_masks(out.attention, batch, model.cfg.pseudo_mask)
    out_dir = Path(out_dir)
    written = [attention_panels(batch, out.attention, masks, texts, out_dir / "attention_panels.png")]
    for i, p in enumerate(images):
        written.append(attention_panels(batch[i:i + 1], out.attention[i:i + 1], masks[i:i + 1],
                                        texts[i:i + 1], out_dir / f"{Path(p).stem}.png"))
    return written


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("figure", help="figures of a trained model", description=__doc__)
    kinds = p.add_subparsers(dest="kind", required=True)
    a = kinds.add_parser("attention", help="attention maps and pseudo masks (paper Fig. 4)",
                         description=__doc__)
    a.add_argument("--model", required=True, help="G2D export folder, run folder or checkpoint")
    a.add_argument("--images", nargs="+", required=True, help="image files (PNG/JPEG/DICOM)")
    a.add_argument("--reports", nargs="*", default=[],
                   help="one per image: the report text or a .txt file holding it")
    a.add_argument("--out", required=True)
    a.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    a.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    paths = attention_figure(args.model, args.images, args.reports, args.out, args.device)
    print(f"wrote {paths[0]} and {len(paths) - 1} per-image panels in {Path(args.out)}")
    return 0
