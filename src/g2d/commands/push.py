"""``g2d push --model PATH --repo ORG/NAME``: save a model in the Hugging Face Hub format (weights,
config, tokenizer, preprocessing, model card) and upload it with ``huggingface_hub``; see docs/hub.md."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("push", help="upload a model to the Hugging Face Hub (hub format + model card)",
                       description=__doc__)
    p.add_argument("--model", required=True, help="export, run folder, checkpoint or hf-hub:ORG/NAME")
    p.add_argument("--repo", required=True, help="ORG/NAME on the Hub (created when missing)")
    p.add_argument("--private", action="store_true")
    p.add_argument("--run", help="folder whose g2d eval results go into the model card")
    p.add_argument("--out", help="also keep the hub-format folder here (default: a temporary folder)")
    p.set_defaults(run=_run)


def push(model: str, repo: str, *, private: bool = False, run_dir: str | None = None,
         out: str | None = None, api: object | None = None) -> str:
    """Save ``model`` in the hub format and upload it to ``repo``. :return: the commit URL."""
    import os
    import tempfile
    from pathlib import Path

    from huggingface_hub import HfApi

    from g2d.factory import load_model
    from g2d.hub import save_pretrained

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_pretrained(load_model(model), out or Path(tmp) / "model", run_dir)
        hub = api or HfApi(token=os.environ.get("HF_TOKEN"))
        hub.create_repo(repo, private=private, exist_ok=True)  # type: ignore[attr-defined]
        info = hub.upload_folder(repo_id=repo, folder_path=str(folder),  # type: ignore[attr-defined]
                                 commit_message="Upload g2d model")
    return str(getattr(info, "commit_url", info))


def _run(args: argparse.Namespace) -> int:
    url = push(args.model, args.repo, private=args.private, run_dir=args.run, out=args.out)
    print(f"pushed {args.model} to {args.repo}: {url}")
    return 0
