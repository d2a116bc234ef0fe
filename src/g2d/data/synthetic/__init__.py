"""Deterministic synthetic chest radiographs with matching free-text reports.

This is the embedded default data set: it needs no download, so demos, tests and small-scale
reproductions of every downstream task (retrieval, zero-shot classification, segmentation,
detection) run anywhere.  Each sample is a frontal (PA) chest radiograph "in spirit"
(body outline, shoulders, two lungs with ribs and vascular markings, mediastinum, spine,
trachea, clavicles, heart, diaphragm domes, gastric bubble) with 0..``max_findings`` findings
that are *visible* in the image and *named* in the report, so an image-text model can learn
the association from a few hundred pairs.

Conventions and documented choices
----------------------------------
* Radiological orientation: the patient's right is on the image's LEFT.  The heart therefore
  sits right of the image midline; a "right upper zone" finding lies in the image's left half.
* Lung locations use radiographic *zones* (upper / mid / lower thirds of each lung field by
  height) rather than lobes, because the left lung has no middle lobe: ``"right mid zone"``
  and ``"left mid zone"`` are both valid.  Effusions live at a ``"... base"`` (costophrenic
  angle), pneumothoraces at an ``"... apex"``, cardiomegaly at ``"heart"``.  The canonical
  location string always appears verbatim in the report sentence of its finding.
* Sample ``i`` depends only on ``(seed, i)`` via ``numpy.random.default_rng([seed, i])``; the
  per-sample generator is split into independent streams (findings / anatomy / noise / text),
  so forcing a different finding list with :func:`render_sample` keeps the same anatomy and
  noise, which lets tests compare a finding against the identical normal chest.
* Boxes are tight, in continuous pixel coordinates with pixel ``j`` covering ``[j, j+1)``:
  ``(x_min, y_min, x_max + 1, y_max + 1)`` of the finding's mask pixels.
* Images are float32 in ``[0, 1]``, shape ``[1, S, S]``; all masks are float32 0/1 ``[1, S, S]``.
  Besides the documented keys, items carry ``"heart"`` (heart mask above the diaphragm) and
  ``"finding_masks"`` (``[N, S, S]``, one mask per finding, same order as ``boxes``).
* The cardiomegaly mask is the heart region (cardiothoracic ratio > 0.5; normal hearts < 0.5).
* Report size words follow the rendered size ("small"/"moderate" effusion and pneumothorax,
  "mild"/"moderate" cardiomegaly); ~30 % of studies are normal and end with a
  "No acute cardiopulmonary ..." impression.  Sentences that mention an absent finding always
  contain one of ``NEGATION_CUES``; sentences stating a finding never do.
* Rendering is vectorised numpy, evaluating small structures only inside windows:
  roughly 200 images/s at 224 px on one CPU core.
"""

from g2d.data.synthetic.dataset import KeptRenders, SyntheticCXR, collate_samples
from g2d.data.synthetic.findings import (
                                         FINDING_LOCATIONS,
                                         FINDING_TERMS,
                                         FINDINGS,
                                         LOCATIONS,
                                         NEGATION_CUES,
                                         SyntheticCXRCfg,
)
from g2d.data.synthetic.rendering import render_sample
from g2d.data.synthetic.reports import make_report, prompt_for

__all__ = ["FINDINGS", "LOCATIONS", "FINDING_LOCATIONS", "FINDING_TERMS", "NEGATION_CUES", "SyntheticCXRCfg",
           "SyntheticCXR", "KeptRenders", "render_sample", "make_report", "prompt_for", "collate_samples"]
