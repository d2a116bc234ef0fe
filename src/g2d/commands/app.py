"""``g2d app --model PATH``: a local web page for zero-shot probabilities, grounding heat maps and the
attention map with its pseudo mask (needs ``pip install -e ".[app]"``); see docs/app.md."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("app", help="a local web page to explore a model (zero-shot, grounding, attention)",
                       description=__doc__)
    p.add_argument("--model", required=True, help="export, run folder, checkpoint or hf-hub:ORG/NAME")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-mb", type=float, default=20.0, help="largest upload accepted, in MB")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise SystemExit('g2d app needs the app extra: pip install -e ".[app]"') from None
    from g2d.app import serve
    from g2d.factory import load_model
    from g2d.towers import resolve_device

    model = load_model(args.model, device=resolve_device(args.device))
    print(f"g2d app: http://{args.host}:{args.port} (Ctrl-C stops it)")
    serve(model, host=args.host, port=args.port, max_mb=args.max_mb)
    return 0
