"""Report text handling: a cleaner for any report and the released G2D code's text recipe.

:func:`clean_report` is the default used by :class:`g2d.data.pretraining.pairs.ImageTextPairs`.
:func:`release_text` reproduces, quirks included, how the released code builds the text of a
MIMIC-CXR pair from the ``findings`` and ``impression`` columns (``PRETRAIN/utils/dataset.py``).
"""

from __future__ import annotations

import math
import re

__all__ = ["SECTION_HEADERS", "clean_report", "release_text", "is_missing_text", "extract_sections",
           "pretrain_text", "count_tokens", "SECTION_ALIASES"]

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
    (numbered lists ``"1." "2."``; ``"1) a 2) b"`` is split into items) or have no letter or digit; join
    with ``". "`` and end with a period (a sentence already ending in ``?`` or ``!`` keeps its mark). Case is kept.

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


# --------------------------------------------------------------------------------------------------
# MIMIC-CXR report sections
# --------------------------------------------------------------------------------------------------

# Header name (upper case, single spaces) -> canonical section. Only these names start a section:
# other capitalised "WORD:" labels inside a section ("LUNGS:", "HEART:", "PA AND LATERAL VIEWS:")
# stay part of its text. Combined headers go to "impression", as in MIT-LCP's section parser
# (mimic-cxr/txt/section_parser.py) whose output MGCA's preprocessing reads.
SECTION_ALIASES: dict[str, str] = {
    **{n: "findings" for n in ("FINDINGS", "FINDING")},
    **{n: "impression" for n in (
        "IMPRESSION", "IMPRESSIONS", "CONCLUSION", "CONCLUSIONS", "FINDINGS AND IMPRESSION",
        "FINDINGS AND IMPRESSIONS", "FINDINGS/IMPRESSION", "IMPRESSION AND FINDINGS",
        "IMPRESSION AND RECOMMENDATION", "IMPRESSION AND RECOMMENDATIONS", "SUMMARY")},
    **{n: "indication" for n in (
        "INDICATION", "INDICATIONS", "CLINICAL INDICATION", "REASON FOR EXAM", "REASON FOR EXAMINATION",
        "REASON FOR STUDY", "CLINICAL INFORMATION")},
    **{n: "history" for n in ("HISTORY", "CLINICAL HISTORY", "PATIENT HISTORY")},
    **{n: "comparison" for n in ("COMPARISON", "COMPARISONS")},
    **{n: "technique" for n in ("TECHNIQUE", "PROCEDURE")},
    **{n: "examination" for n in ("EXAMINATION", "EXAM", "TYPE OF EXAMINATION")},
    **{n: "other" for n in ("NOTIFICATION", "RECOMMENDATION", "RECOMMENDATIONS", "WET READ",
                            "ADDENDUM", "FINAL ADDENDUM")},
}
_NAME = r"(?:" + "|".join(r"[ \t]+".join(map(re.escape, n.split()))
                          for n in sorted(SECTION_ALIASES, key=len, reverse=True)) + r")"
# At a line start any case ("Findings:", "IMPRESSION :"); inside a line only in capitals, after
# a sentence end or a blank, so "... prior study. IMPRESSION: ..." splits but prose does not.
_SECTION_AT_LINE = re.compile(r"(?im)^[ \t]*(" + _NAME + r")[ \t]*:")
_SECTION_IN_LINE = re.compile(r"[.;][ \t]+(" + _NAME + r")[ \t]*:")
_FINAL_REPORT = re.compile(r"(?im)^[ \t]*FINAL REPORT[ \t]*$")
_WORD = re.compile(r"[A-Za-z0-9]+")


def extract_sections(report: str) -> dict[str, str]:
    """Split a MIMIC-CXR free-text report into canonical sections.

    Headers are the names in :data:`SECTION_ALIASES` followed by a colon, at a line start (any case,
    spaces allowed before the colon) or, in capitals, after a sentence end within a line. Text before
    the first header (``"FINAL REPORT"``, ``"WET READ"`` lines) is returned under ``"preamble"``. A
    section that appears more than once (e.g. an addendum with its own IMPRESSION) is joined in order.
    Bodies keep their line breaks and ``"___"`` blanks; use :func:`clean_report` on them.

    Returns:
        canonical name (``"findings"``, ``"impression"``, ``"indication"``, ``"history"``,
        ``"comparison"``, ``"technique"``, ``"examination"``, ``"other"``, ``"preamble"``) -> body,
        stripped; only non-empty bodies are kept.
    """
    if is_missing_text(report):
        return {}
    text = _FINAL_REPORT.sub("", str(report).replace("\r\n", "\n").replace("\r", "\n"))
    cuts: list[tuple[int, int, str]] = []  # (header start, body start, canonical name)
    for m in _SECTION_AT_LINE.finditer(text):
        cuts.append((m.start(), m.end(), _canonical(m.group(1))))
    for m in _SECTION_IN_LINE.finditer(text):
        name = m.group(1)
        if name.isupper() and not any(a <= m.start(1) < b for a, b, _ in cuts):
            cuts.append((m.start(1), m.end(), _canonical(name)))
    cuts.sort()
    out: dict[str, list[str]] = {}
    bounds = [(0, 0, "preamble"), *cuts]
    for k, (_, body_start, name) in enumerate(bounds):
        end = bounds[k + 1][0] if k + 1 < len(bounds) else len(text)
        body = text[body_start:end].strip()
        if body:
            out.setdefault(name, []).append(body)
    return {k: "\n".join(v) for k, v in out.items()}


def _canonical(header: str) -> str:
    return SECTION_ALIASES[" ".join(header.upper().split())]


def count_tokens(text: str) -> int:
    """Number of alphanumeric word tokens (MGCA/GLoRIA's ``RegexpTokenizer(r"\\w+")`` count, ASCII)."""
    return len(_WORD.findall(text or ""))


def pretrain_text(findings: str | None, impression: str | None, recipe: str = "paper") -> str:
    """The pre-training text of a report from its FINDINGS and IMPRESSION bodies.

    ``"paper"``: :func:`clean_report` of FINDINGS followed by IMPRESSION (a sentence break between
    them); when one is missing or empty the other alone is used; ``""`` when both are.
    ``"release"``: :func:`release_text` (impression first, no separator, the release's quirks).
    """
    if recipe == "release":
        return release_text(findings or None, impression)
    if recipe != "paper":
        raise ValueError(f"text recipe must be 'paper' or 'release', got {recipe!r}")
    parts = [clean_report(p) for p in (findings, impression) if not is_missing_text(p) and p]
    return " ".join(p for p in parts if p)
