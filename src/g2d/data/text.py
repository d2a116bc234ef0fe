"""Report text handling: a cleaner for any report and the released G2D code's text recipe.

:func:`clean_report` is the default used by :class:`g2d.data.pairs.ImageTextPairs`.
:func:`release_text` reproduces, quirks included, how the released code builds the text of a
MIMIC-CXR pair from the ``findings`` and ``impression`` columns (``PRETRAIN/utils/dataset.py``).
"""

from __future__ import annotations

import math
import re

__all__ = ["SECTION_HEADERS", "clean_report", "release_text", "is_missing_text"]

# Section names removed when followed by a colon, in any case ("Findings:", "IMPRESSION :").
SECTION_HEADERS: tuple[str, ...] = (
    "FINAL REPORT", "FINDINGS", "FINDING", "IMPRESSIONS", "IMPRESSION", "CONCLUSIONS", "CONCLUSION",
    "COMPARISONS", "COMPARISON", "INDICATIONS", "INDICATION", "CLINICAL INDICATION",
    "CLINICAL INFORMATION", "CLINICAL HISTORY", "HISTORY", "REASON FOR EXAMINATION", "REASON FOR EXAM",
    "REASON FOR STUDY", "TYPE OF EXAMINATION", "EXAMINATION", "EXAM", "TECHNIQUE", "PROCEDURE",
    "NOTIFICATION", "RECOMMENDATIONS", "RECOMMENDATION", "WET READ", "ADDENDUM",
)
# Upper-case headers also removed without a colon ("FINDINGS The lungs ..."); only these, since
# e.g. "history" without a colon is ordinary prose.
_BARE_HEADERS: tuple[str, ...] = (
    "FINAL REPORT", "FINDINGS", "IMPRESSIONS", "IMPRESSION", "CONCLUSIONS", "CONCLUSION",
    "COMPARISONS", "COMPARISON",
)


def _alternation(names: tuple[str, ...]) -> str:
    # Longest first so "IMPRESSIONS" wins over "IMPRESSION"; spaces match any whitespace run.
    ordered = sorted(names, key=len, reverse=True)
    return "|".join(r"\s+".join(map(re.escape, n.split())) for n in ordered)


_HEADER_COLON = re.compile(r"\b(?:" + _alternation(SECTION_HEADERS) + r")\s*:", re.IGNORECASE)
_HEADER_BARE = re.compile(r"\b(?:" + _alternation(_BARE_HEADERS) + r")\b")
_BLANKS = re.compile(r"_{2,}")  # MIMIC de-identification blanks "___"
# A period splits sentences unless it sits between two digits (keeps "2.5 cm").
_SENTENCE_SPLIT = re.compile(r"(?<!\d)\.|\.(?!\d)")
# "1) Edema 2) Effusion": a number + ")" after whitespace and before a capital starts a list item
# (the capital keeps prose such as "(age 3) stable" intact).
_INLINE_ITEM = re.compile(r"(?:^|(?<=\s))\d{1,2}\)\s+(?=[A-Z])")
_LIST_MARKER = re.compile(r"^(?:[-*\u2022]+\s*|\(?\d{1,2}\)\s+)")
_PURE_NUMBER = re.compile(r"^\(?\d+(?:\.\d+)?\)?$")
_EDGE_PUNCT = " \t:;,-"
_WS = re.compile(r"\s+")


def is_missing_text(text: object) -> bool:
    """True for ``None``, float NaN and the string ``"nan"`` (any case), as pandas/csv write NaN."""
    if text is None:
        return True
    if isinstance(text, float):
        return math.isnan(text)
    return isinstance(text, str) and text.strip().lower() == "nan"


def clean_report(text: str | None) -> str:
    """Normalise a free-text report into period-terminated sentences.

    Steps: drop section headers (``"FINDINGS:"``, ``"Impression :"``, a bare upper-case
    ``"FINDINGS"``; each becomes a sentence break so sections do not run together); drop MIMIC
    ``"___"`` blanks; collapse whitespace, which joins wrapped lines; split into sentences on periods
    (not the decimal point in ``"2.5"``); drop list markers and pieces that are only a number
    (numbered lists ``"1." "2."``; ``"1) a 2) b"`` is split into items) or have no letter or digit; join with ``". "`` and end with a
    period (a sentence already ending in ``?`` or ``!`` keeps its mark). Case is kept.

    Args:
        text: the report; ``None``/NaN give ``""``.

    Returns:
        the cleaned report, ``""`` when nothing is left.

    Example:
        >>> clean_report("FINDINGS: 1. Lungs are\\nclear. 2. No effusion.  IMPRESSION: ___ Normal")
        'Lungs are clear. No effusion. Normal.'
    """
    if is_missing_text(text):
        return ""
    assert isinstance(text, str)
    t = _HEADER_COLON.sub(" . ", text)
    t = _HEADER_BARE.sub(" . ", t)
    t = _BLANKS.sub(" ", t)
    t = _INLINE_ITEM.sub(" . ", t)
    t = _WS.sub(" ", t)
    sentences: list[str] = []
    for piece in _SENTENCE_SPLIT.split(t):
        piece = piece.strip(_EDGE_PUNCT)
        piece = _LIST_MARKER.sub("", piece).strip(_EDGE_PUNCT)
        if not piece or _PURE_NUMBER.match(piece) or not any(ch.isalnum() for ch in piece):
            continue
        sentences.append(piece)
    out = ""
    for s in sentences:
        out += s if s[-1] in "?!" else s + "."
        out += " "
    return out.rstrip()


def release_text(findings: str | None, impression: str | None) -> str:
    """The released G2D code's report text, quirks included (the ``"release"`` text option).

    Behaviour reproduced (``IaT_embed_dataset.__getitem__``):

    - ``findings`` missing (``None``/NaN) or equal to ``"dumb"``: the raw, uncleaned ``impression``.
    - otherwise ``impression + findings`` with **no separator** (impression first); then the
      literal substrings ``"IMPRESSSION:"``, ``"IMPRESSSION"`` (the release's typo, so a real
      ``"IMPRESSION:"`` header survives), ``"FINDINGS:"``, ``"FINDINGS"``, ``"COMPARISON:  ___"``
      (two spaces), ``"COMPARISON:"``, ``"COMPARISON"`` are deleted in that order; then, only if the
      text contains a period, it is split on every ``"."``, each piece stripped, pieces that are all
      digits dropped (empty pieces stay, so a final period yields a trailing ``". "``), and rejoined
      with ``". "``. No lower-casing.

    A missing ``impression`` is taken as ``""``: the release would fail on it, and MGCA's master csv,
    which the release reads, fills missing text with ``" "`` so it never happens there.
    """
    imp = "" if is_missing_text(impression) else str(impression)
    if is_missing_text(findings) or findings == "dumb":
        return imp
    text = imp + str(findings)
    for token in ("IMPRESSSION:", "IMPRESSSION", "FINDINGS:", "FINDINGS", "COMPARISON:  ___",
                  "COMPARISON:", "COMPARISON"):
        text = text.replace(token, "")
    pieces = text.split(".")
    if len(pieces) > 1:
        pieces = [p.strip() for p in pieces]
        text = ". ".join(p for p in pieces if not p.isdigit())
    return text
