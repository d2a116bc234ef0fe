"""``g2d zero-shot`` and ``g2d ground``: use a trained G2D model on your own images.

``g2d zero-shot IMAGE... --model PATH --findings "pneumonia,pleural effusion"`` prints the zero-shot
probability of each finding for each image (positive vs negative prompt, as ``g2d eval zeroshot``);
``--csv FILE`` saves the table.

``g2d ground IMAGE --model PATH --text "right lower lobe opacity" --out heat.png`` writes the
similarity heat map overlaid on the original image, at the original resolution (outside the model's
centre crop the image is shown without overlay); ``--npy FILE`` also saves the raw map ``[H, W]``
(NaN outside the crop).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from g2d.data.images import read_image
from g2d.figures import heat_overlay

__all__ = ["register", "run_zero_shot", "run_ground", "check_images", "add_model_args"]


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model (G2D or a cosine peer's KIND:PATH), --text-model, --trust-pickle, --device, --resize, --image-size."""
    p.add_argument("--model", required=True,
                   help="G2D export folder, run folder, checkpoint or hf-hub:NAME; or a peer's checkpoint as "
                        "KIND:PATH (biovil, mgca, gloria, convirt, medclip, benchx; docs/peers.md)")
    p.add_argument("--text-model", default=None,
                   help="for KIND:PATH: the peer's text model, hub name (NAME@REV) or local folder "
                        "(default: the peer's own)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="let a peer's checkpoint that needs pickled classes load (GLoRIA)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--resize", type=int, default=None, help="default: the model's pre-training geometry")
    p.add_argument("--image-size", type=int, default=None)


def register(sub: argparse._SubParsersAction) -> None:
    z = sub.add_parser("zero-shot", help="zero-shot finding probabilities for images",
                       description="Probability of each finding per image: softmax over the image's "
                                   "similarity to a positive and a negative prompt.")
    z.add_argument("images", nargs="+", metavar="IMAGE")
    z.add_argument("--findings", required=True, help="comma-separated findings, e.g. 'pneumonia,pleural effusion'")
    z.add_argument("--prompts", default=None, help="prompt file (see g2d eval zeroshot); default: shipped default")
    z.add_argument("--csv", default=None, help="also write the table to this CSV file")
    add_model_args(z)
    z.set_defaults(run=run_zero_shot)
    g = sub.add_parser("ground", help="heat map of a text prompt on an image",
                       description="Similarity of a text prompt with every pixel embedding, overlaid on "
                                   "the original image at its original resolution.")
    g.add_argument("image", metavar="IMAGE")
    g.add_argument("--text", required=True)
    g.add_argument("--out", required=True, help="PNG file for the overlay")
    g.add_argument("--npy", default=None, help="also save the raw heat map [H, W] (NaN outside the crop)")
    g.add_argument("--no-legend", action="store_true",
                   help="the overlay alone, at the image's size (default: a strip below names the prompt and "
                        "shows the colour bar of the similarity scale)")
    add_model_args(g)
    g.set_defaults(run=run_ground)


def check_images(images: list[str]) -> None:
    """Stop before the (slow) model load when an image is missing."""
    missing = [p for p in images if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"image not found: {missing[0]}" + (f" (and {len(missing) - 1} more)"
                                                                   if len(missing) > 1 else ""))


def _engine(args: argparse.Namespace):
    from g2d.inference.engine import ImageTextInferenceEngine

    check_images(getattr(args, "images", None) or [args.image])
    return ImageTextInferenceEngine.load(args.model, f"g2d {args.command}", text_model=args.text_model,
                                        trust_pickle=args.trust_pickle, device=args.device, resize=args.resize,
                                        image_size=args.image_size)


def run_zero_shot(args: argparse.Namespace) -> int:
    findings = [f.strip() for f in args.findings.split(",") if f.strip()]
    if not findings:
        raise ValueError("--findings is empty")
    probs = _engine(args).zero_shot([read_image(p) for p in args.images], findings, args.prompts)
    rows = [[path, *p.tolist()] for path, p in zip(args.images, probs)]
    width = max(len(Path(r[0]).name) for r in rows)
    print("image".ljust(width) + "".join(f"  {f:>{max(len(f), 6)}}" for f in findings))
    for r in rows:
        print(Path(r[0]).name.ljust(width) + "".join(f"  {v:>{max(len(f), 6)}.3f}" for f, v in zip(findings, r[1:])))
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["image", *findings])
            w.writerows([[r[0], *(f"{v:.6f}" for v in r[1:])] for r in rows])
        print(f"wrote {args.csv}", file=sys.stderr)
    return 0


def run_ground(args: argparse.Namespace) -> int:
    from PIL import Image

    from g2d.inference.engine import check_prompts

    check_prompts([args.text], "--text")
    engine = _engine(args)
    img = read_image(args.image)                                             # [H, W] in [0, 1]
    heat = engine.similarity_maps(img, [args.text])[0]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    legend = None if args.no_legend else args.text
    Image.fromarray(heat_overlay(img, heat, legend=legend)).save(out)
    if args.npy:
        np.save(args.npy, heat.astype(np.float32))
    finite = np.isfinite(heat)
    print(f"wrote {out} ({img.shape[1]}x{img.shape[0]}); similarity {np.nanmin(heat):.3f}..{np.nanmax(heat):.3f}, "
          f"{finite.mean():.0%} of the image inside the model's crop")
    return 0
