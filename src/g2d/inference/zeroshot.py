"""Zero-shot classification (paper A.4.3, MedKLIP/KAD-style prompt pairs): each class has one or more
(positive, negative) prompt pairs; an image's score is the softmax over its similarity with the
positive and negative prompt embeddings. Prompt tables ship in ``g2d/inference/prompts``."""

from __future__ import annotations

import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from g2d.errors import DataError
from g2d.image_input import as_model_input
from g2d.model.interface import TextImageModel

__all__ = ["prompt_text", "load_prompts", "check_prompt_pair", "class_prompts", "prompt_embeddings", "zero_shot_scores",
           "ZeroShotScorer"]


def _norm(name: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[_\-]", " ", name.strip().lower()))


def prompt_text(path: str | Path | None = None) -> tuple[str, str]:
    """The text of a prompt file and where it came from: ``None`` -> the shipped ``default.txt``; a bare
    name like ``synthetic`` -> that shipped file; else a path. Result stores key on this text, so an
    edited prompt file is never mistaken for the one a stored result used.

    :raises FileNotFoundError: a path that is not a file.
    """
    if path is None or (isinstance(path, str) and re.fullmatch(r"[a-z0-9_]+", path) and not Path(path).exists()):
        name = "default" if path is None else path
        text = resources.files("g2d.inference").joinpath("prompts", f"{name}.txt").read_text(encoding="utf-8")
        return text, f"prompts/{name}.txt"
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompt file not found: {p}")
    return p.read_text(encoding="utf-8"), str(p)


def load_prompts(path: str | Path | None = None) -> dict[str, list[tuple[str, str]]]:
    """Read a prompt file: ``CLASS<TAB>POSITIVE<TAB>NEGATIVE`` per line, ``#`` comments, blank lines.

    ``CLASS`` is ``*`` (every class without lines of its own) or a class name (case, ``_`` and ``-``
    do not matter); ``{finding}`` in a template becomes the class name. ``None``: the shipped
    ``prompts/default.txt``; a bare name like ``biovil`` picks a shipped file.

    :return: normalised class name (or ``*``) -> list of (positive, negative) templates.
    """
    text, where = prompt_text(path)
    table: dict[str, list[tuple[str, str]]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 3 or not all(s.strip() for s in parts):
            raise DataError(f"{where}:{n}: expected CLASS<TAB>POSITIVE<TAB>NEGATIVE, got {len(parts)} field(s)")
        cls = "*" if parts[0].strip() == "*" else _norm(parts[0])
        table.setdefault(cls, []).append((parts[1].strip(), parts[2].strip()))
    if not table:
        raise DataError(f"{where}: no prompts")
    return table


# Class names that are themselves a normal or negative statement ("No Finding", "normal"): the
# generic "{finding}" / "no {finding}" pair makes their negative prompt a double negative that means
# what the positive means, and the score's direction arbitrary (CheXzero's users saw AUC 0.07).
_NEGATIVE_CLASS = re.compile(r"^(no|not|without|normal|negative|unremarkable|clear|healthy)\b")


_DOUBLE_NEGATIVE = re.compile(r"\b(no|not|without|absence of)\s+(no|not|without|normal|negative|"
                              r"unremarkable|healthy)\b")


def check_prompt_pair(cls: str, positive: str, negative: str) -> None:
    """Refuse a pair whose two sides cannot be told apart: identical texts or a double negative.

    :raises DataError: naming the class and the pair.
    """
    pos, neg = _norm(positive), _norm(negative)
    why = ("the positive and negative prompts are the same" if pos == neg else
           "a prompt is a double negative" if _DOUBLE_NEGATIVE.search(neg) or _DOUBLE_NEGATIVE.search(pos)
           else None)
    if why:
        raise DataError(f"zero-shot prompts for class {cls!r}: {why} ({positive!r} / {negative!r}); give "
                        "the class its own line in the prompt file with a positive/negative pair of "
                        "opposite meaning (e.g. 'no acute cardiopulmonary process' / 'acute "
                        "cardiopulmonary abnormality')")


def class_prompts(tasks: Sequence[str], table: dict[str, list[tuple[str, str]]]) -> dict[str, list[tuple[str, str]]]:
    """Filled-in (positive, negative) prompt pairs for every class of ``tasks``.

    :raises DataError: a class without prompts; a class whose name is a normal/negative statement
        ("No Finding", "normal") that only the generic ``*`` template covers; any pair that
        :func:`check_prompt_pair` refuses.
    """
    out: dict[str, list[tuple[str, str]]] = {}
    for t in tasks:
        own = table.get(_norm(t))
        pairs = own or table.get("*")
        if not pairs:
            raise DataError(f"no prompt for class {t!r} and no '*' line in the prompt file")
        if own is None and _NEGATIVE_CLASS.match(_norm(t)):
            raise DataError(f"zero-shot prompts for class {t!r}: the class names a normal or negative "
                            "finding, and the generic '{finding}' / 'no {finding}' template would make its "
                            "negative prompt a double negative; give it its own line in the prompt file "
                            "(a normal study vs. any abnormality)")
        out[t] = [(pos.replace("{finding}", _norm(t)), neg.replace("{finding}", _norm(t))) for pos, neg in pairs]
        for pos, neg in out[t]:
            check_prompt_pair(t, pos, neg)
    return out


@torch.no_grad()
def prompt_embeddings(model: TextImageModel, prompts: dict[str, list[tuple[str, str]]]) -> tuple[Tensor, Tensor]:
    """Positive and negative text embeddings ``[K, d]`` (ensembles averaged, then L2-normalised)."""
    pos, neg = [], []
    for pairs in prompts.values():
        e = model.encode_text([p for p, _ in pairs] + [n for _, n in pairs])  # L2-normalised [2P, d]
        pos.append(F.normalize(e[:len(pairs)].mean(0), dim=-1))
        neg.append(F.normalize(e[len(pairs):].mean(0), dim=-1))
    return torch.stack(pos), torch.stack(neg)


def zero_shot_scores(image_emb: Tensor, pos: Tensor, neg: Tensor, logit_scale: Tensor | float) -> Tensor:
    """``p = softmax(scale * [cos+, cos-])[0]`` per class.

    :param image_emb: ``[B, d]`` L2-normalised. :param pos, neg: ``[K, d]``. :return: ``[B, K]`` in (0, 1).
    """
    logits = torch.stack([image_emb @ pos.T, image_emb @ neg.T], dim=-1) * logit_scale
    return logits.softmax(-1)[..., 0]


class ZeroShotScorer:
    """Zero-shot probabilities ``[B, K]`` of K classes for a batch of images, prompts embedded once.

    The similarity of an image with a prompt is the cosine of their embeddings (a class's prompt
    ensemble averaged as embeddings, :func:`prompt_embeddings`), or, for a model that scores image-
    prompt pairs itself (``model.scores_pairs``: GLoRIA's global + local word-region score,
    :class:`g2d.peer_vlm.PeerVLModel`), that score averaged over the class's prompts. Either way
    ``p = softmax(scale * [s+, s-])[0]`` (:func:`zero_shot_scores`).
    """

    def __init__(self, model: TextImageModel, prompts: dict[str, list[tuple[str, str]]]):
        self.model, self.prompts = model, prompts
        self.pairs = bool(getattr(model, "scores_pairs", False))
        if self.pairs:
            self.texts = [t for pairs in prompts.values() for pair in pairs for t in pair]
        else:
            self.pos, self.neg = prompt_embeddings(model, prompts)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        """:param images: [B, 1 or 3, H, W] in [0, 1] (``uint8`` is divided by 255) on the model's device.
        :return: [B, K] in (0, 1). :raises ImageInputError: images outside that contract."""
        images = as_model_input(images, "ZeroShotScorer")
        scale = self.model.logit_scale.exp()
        if not self.pairs:
            return zero_shot_scores(self.model.encode_image(images), self.pos, self.neg, scale)
        sim = self.model.similarity(images, self.texts)          # type: ignore[attr-defined]  # [B, 2P]
        s_pos, s_neg, i = [], [], 0
        for pairs in self.prompts.values():
            n = 2 * len(pairs)
            s_pos.append(sim[:, i:i + n:2].mean(1))
            s_neg.append(sim[:, i + 1:i + n:2].mean(1))
            i += n
        logits = torch.stack([torch.stack(s_pos, 1), torch.stack(s_neg, 1)], dim=-1) * scale
        return logits.softmax(-1)[..., 0]
