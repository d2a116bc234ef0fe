"""Figures of a trained model (see docs/figure.md).

``g2d figure attention``: Fig.-4-style panels (image, aggregated attention, pseudo mask, report) of a
G2D checkpoint or export; the images are preprocessed exactly as at evaluation time
(:func:`g2d.data.transforms.build_transform` with the model's own resize and crop), and the pseudo
masks are built with the model's own pseudo-mask settings.

``g2d figure grounding``: for each image, the similarity map of each text prompt (zero-shot
grounding, paper A.4.2), at the image's own pixels: for a G2D model or a peer's image-text model
(``KIND:PATH`` of BioViL, MGCA, GLoRIA, ConVIRT, MedCLIP, with its own input pipeline), so a G2D
run and a peer can be drawn side by side on the same images and prompts.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["attention_figure", "grounding_figure", "register"]


def _panel_paths(images: Sequence[str | Path], out_dir: Path, combined: str) -> list[Path]:
    """``OUT/<stem>.png`` per image; refused before anything is written when two images share a stem
    or one is named like the combined figure (one file would silently replace the other)."""
    paths = [out_dir / f"{Path(p).stem}.png" for p in images]
    seen: dict[Path, str] = {}
    for image, path in zip(images, paths):
        if path in seen or path.name == combined:
            clash = seen.get(path, f"the combined figure {combined}")
            raise ValueError(f"{image} and {clash} would both be written to {path}; rename or copy one of them")
        seen[path] = str(image)
    return paths


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

        hint = (f" For its prompt heat maps use: g2d figure grounding --model {model_path} [--text-model "
                "NAME|DIR] --images ... --prompts '...' --out DIR" if kind in PEER_TEXT else "")
        raise ConfigError(f"g2d figure attention draws G2D's attention-pooling maps and pseudo masks; a {kind} "
                          f"model has neither.{hint}")
    if reports and len(reports) != len(images):
        raise ValueError(f"got {len(images)} images but {len(reports)} reports; give one report per "
                         "image or none")
    out_dir = Path(out_dir)
    panels = _panel_paths(images, out_dir, "attention_panels.png")
    model = load_model(model_path, device=device)
    tf = build_transform(model.preprocess, train=False)
    batch = torch.stack([tf(read_image(p)) for p in images]).to(device)
    texts = [_report(r) for r in reports] if reports else [""] * len(images)
    with torch.no_grad():
        out = model.image_forward(batch, decode=False)
        masks = build_pseudo_masks(out.attention, batch, model.cfg.pseudo_mask)
    written = [attention_panels(batch, out.attention, masks, texts, out_dir / "attention_panels.png")]
    for i, path in enumerate(panels):
        written.append(attention_panels(batch[i:i + 1], out.attention[i:i + 1], masks[i:i + 1],
                                        texts[i:i + 1], path))
    return written


def grounding_figure(model: str, images: Sequence[str | Path], prompts: Sequence[str], out_dir: str | Path, *,
                     text_model: str | None = None, trust_pickle: bool = False, device: str = "auto",
                     resize: int | None = None, image_size: int | None = None) -> list[Path]:
    """Write ``OUT/grounding_panels.png`` (rows: images; columns: the image, then each prompt's
    similarity map overlaid) and ``OUT/<image stem>.png`` (that row alone).

    Each map is the cosine of the prompt's embedding with every dense image embedding
    (:func:`g2d.inference.grounding.dense_similarity`), mapped back to the original pixels through
    the model's resize and crop (:func:`g2d.inference.grounding.to_original`; NaN, drawn without
    overlay, outside the crop) and colour-scaled per map from its lowest to its highest value.

    :param model: a G2D export / run folder / checkpoint / ``hf-hub:NAME``, or ``KIND:PATH`` of a
        peer with an image-text cosine (``text_model``: its text model, default the peer's own).
    :raises g2d.errors.ConfigError: a model without a text tower (``random``, ``imagenet``, MedKLIP,
        KAD, PRIOR, xrv, torchvision, g2d-release: the reason is named).
    :raises FileNotFoundError: an image that does not exist (before the model is loaded).
    :return: the written PNG paths, combined figure first.
    """
    from g2d.commands.infer import check_images
    from g2d.data.images import read_image
    from g2d.figures import prompt_panels
    from g2d.inference.engine import ImageTextInferenceEngine, check_prompts

    check_prompts(list(prompts), "--prompts")
    check_images([str(p) for p in images])
    out_dir = Path(out_dir)
    panels = _panel_paths(images, out_dir, "grounding_panels.png")
    engine = ImageTextInferenceEngine.load(model, "g2d figure grounding", text_model=text_model,
                                           trust_pickle=trust_pickle, device=device, resize=resize,
                                           image_size=image_size)
    originals = [read_image(p) for p in images]                             # [H, W] in [0, 1] each
    heats = [engine.similarity_maps(img, list(prompts)) for img in originals]
    names = [Path(p).name for p in images]
    written = [prompt_panels(originals, heats, prompts, out_dir / "grounding_panels.png", names)]
    for i, path in enumerate(panels):
        written.append(prompt_panels(originals[i:i + 1], heats[i:i + 1], prompts, path, names[i:i + 1]))
    return written


def register(sub: argparse._SubParsersAction) -> None:
    from g2d.commands.infer import add_model_args

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
    g = kinds.add_parser("grounding", help="prompt heat maps on images (zero-shot grounding), G2D or a peer",
                         description=__doc__)
    g.add_argument("--images", nargs="+", required=True, help="image files (PNG/JPEG/DICOM)")
    g.add_argument("--prompts", nargs="+", required=True, help="one column per prompt, e.g. 'left pleural effusion'")
    g.add_argument("--out", required=True)
    add_model_args(g)
    g.set_defaults(run=_run_grounding)


def _run_grounding(args: argparse.Namespace) -> int:
    paths = grounding_figure(args.model, args.images, args.prompts, args.out, text_model=args.text_model,
                             trust_pickle=args.trust_pickle, device=args.device, resize=args.resize,
                             image_size=args.image_size)
    print(f"wrote {paths[0]} and {len(paths) - 1} per-image panels in {Path(args.out)}")
    return 0


def _run(args: argparse.Namespace) -> int:
    paths = attention_figure(args.model, args.images, args.reports, args.out, args.device)
    print(f"wrote {paths[0]} and {len(paths) - 1} per-image panels in {Path(args.out)}")
    return 0
