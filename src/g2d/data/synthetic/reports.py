"""Free-text reports of a synthetic sample, and zero-shot prompts in the reports' wording."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from g2d.data.synthetic.findings import FINDING_LOCATIONS, FINDING_TERMS, FINDINGS, NEGATION_CUES

# --------------------------------------------------------------------------- reports


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _positive_sentence(rng: np.random.Generator, finding: str, loc: str, size: str) -> str:
    side = loc.split()[0]
    if finding == "opacity":
        term = _pick(rng, ("opacity", "airspace opacity", "consolidation", "airspace consolidation"))
        adj = _pick(rng, ("", "patchy ", "focal ", "hazy "))
        return _pick(rng, (
            f"There is {adj}{term} in the {loc}.",
            f"{_cap(adj + term)} is seen in the {loc}.",
            f"{_cap(adj + term)} in the {loc}, concerning for pneumonia.",
            f"The {loc} demonstrates {adj}{term}.",
        ))
    if finding == "nodule":
        term = _pick(rng, ("nodule", "pulmonary nodule", "nodular density"))
        adj = _pick(rng, ("", "small ", "well-circumscribed ", "rounded "))
        return _pick(rng, (
            f"There is a {adj}{term} in the {loc}.",
            f"A {adj}{term} is noted in the {loc}.",
            f"{_cap(adj + term)} projecting over the {loc}.",
        ))
    if finding == "effusion":
        return _pick(rng, (
            f"There is a {size} pleural effusion at the {loc}.",
            f"{_cap(size)} {side} pleural effusion layering at the {loc}.",
            f"Blunting of the {side} costophrenic angle at the {loc}, consistent with a {size} pleural effusion.",
            f"Fluid at the {loc} compatible with a {size} {side} effusion.",
        ))
    if finding == "pneumothorax":
        return _pick(rng, (
            f"There is a {size} pneumothorax at the {loc}.",
            f"{_cap(size)} {side} pneumothorax at the {loc}, with a visible pleural line.",
            f"A visceral pleural line is seen at the {loc}, consistent with a {size} pneumothorax.",
        ))
    if finding == "cardiomegaly":
        sev = size
        return _pick(rng, (
            f"The {loc} is {sev}ly enlarged.",
            f"{_cap(sev)} cardiomegaly; the {loc} is enlarged.",
            f"Enlarged {loc}, consistent with {sev} cardiomegaly.",
            f"Cardiomegaly: the {loc} size is enlarged.",
        ))
    raise ValueError(f"unknown finding {finding!r}")


def make_report(
    rng: np.random.Generator,
    findings: Sequence[tuple[str, str]],
    severity: dict[str, str] | None = None,
) -> str:
    """Compose a short report naming each ``(finding, location)`` and some negatives.

    ``severity`` maps a finding to its size word ("small"/"moderate"; "mild"/"moderate" for
    cardiomegaly).  Positive sentences never contain a NEGATION_CUE; sentences mentioning an absent finding
    always do.  Normal studies always end with a "No acute cardiopulmonary ..." impression.
    """
    severity = severity or {}
    present = {f for f, _ in findings}
    pos = [_positive_sentence(rng, f, loc, severity.get(f, "small" if f != "cardiomegaly" else "mild"))
           for f, loc in findings]
    neg: list[str] = []
    if "opacity" not in present:
        neg.append(_pick(rng, ("No focal consolidation.", "No airspace opacity is seen.",
                               "There is no consolidation.")))
    if "nodule" not in present:
        neg.append(_pick(rng, ("No pulmonary nodules.", "No suspicious nodule is identified.", "There is no nodule.")))
    if "effusion" not in present and "pneumothorax" not in present:
        neg.append(_pick(rng, ("No pleural effusion or pneumothorax.", "There is no pleural effusion or pneumothorax.",
                               "No effusion or pneumothorax is seen.")))
    elif "effusion" not in present:
        neg.append(_pick(rng, ("No pleural effusion.", "There is no effusion.")))
    elif "pneumothorax" not in present:
        neg.append(_pick(rng, ("No pneumothorax.", "There is no pneumothorax.")))
    if "cardiomegaly" not in present:
        neg.append(_pick(rng, ("Heart size is normal.", "The heart is not enlarged.", "Normal heart size.",
                               "The cardiomediastinal silhouette is normal.",
                               "Cardiac silhouette within normal limits.")))
    rng.shuffle(neg)
    sentences: list[str] = []
    if rng.random() < 0.35:
        sentences.append(_pick(rng, ("PA view of the chest.", "Frontal chest radiograph.",
                                     "Single frontal view of the chest.")))
    if not findings:
        if rng.random() < 0.7:
            sentences.append(_pick(rng, ("The lungs are clear.", "Lungs are well expanded and clear.", "Clear lungs.")))
        sentences += neg[: max(2, len(neg) - int(rng.integers(0, 3)))]
        sentences.append(_pick(rng, ("No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality.",
                                     "No acute cardiopulmonary disease.", "No acute cardiopulmonary findings.")))
        return " ".join(sentences)
    order = list(range(len(pos)))
    rng.shuffle(order)
    pos = [pos[i] for i in order]
    keep_neg = [s for s in neg if rng.random() < 0.75]
    sentences += pos + keep_neg if rng.random() < 0.8 else keep_neg + pos
    return " ".join(sentences)


def prompt_for(finding: str, location: str | None = None) -> str:
    """Short canonical phrase for a finding (optionally at a location), as a report words it.

    ``prompt_for("opacity", "right lower zone") == "opacity in the right lower zone"``.
    ``finding="normal"`` gives ``"no acute cardiopulmonary process"`` (for zero-shot use).
    """
    if finding == "normal":
        return "no acute cardiopulmonary process"
    if finding not in FINDINGS:
        raise ValueError(f"unknown finding {finding!r}; expected one of {FINDINGS} or 'normal'")
    if location is not None and location not in FINDING_LOCATIONS[finding]:
        raise ValueError(f"location {location!r} invalid for {finding!r}")
    base = {"opacity": "opacity", "nodule": "nodule", "effusion": "pleural effusion",
            "pneumothorax": "pneumothorax", "cardiomegaly": "cardiomegaly"}[finding]
    if location is None:
        return base
    if finding in ("opacity", "nodule"):
        return f"{base} in the {location}"
    if finding == "cardiomegaly":
        return "cardiomegaly, the heart is enlarged"
    return f"{base} at the {location}"


def finding_sentence(report: str, finding: str, location: str) -> str:
    """The sentence of ``report`` that states ``finding`` at ``location`` (its phrase, for phrase
    grounding): the one holding the location verbatim and one of the finding's terms, without a
    negation cue (:func:`make_report` writes exactly one such sentence per finding).

    :raises ValueError: no such sentence (not a report of this generator).
    """
    for sentence in re.split(r"(?<=\.)\s+", report):
        low = sentence.lower()
        if (location in low and any(t in low for t in FINDING_TERMS[finding])
                and not any(c in low for c in NEGATION_CUES)):
            return sentence
    raise ValueError(f"no sentence states {finding} at {location} in {report!r}")

