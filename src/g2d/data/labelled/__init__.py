"""Labelled downstream sets behind one interface (torchxrayvision-style): every reader (SIIM, RSNA,
Object-CXR, CheXpert, ChestX-ray14, COVIDx, any csv table, the synthetic set) yields
:class:`~g2d.data.labelled.dataset.Record` rows that :class:`LabelledCXR` serves in one sample layout,
with the shipped splits (:mod:`g2d.data.labelled.splits`). Open one from a ``--data`` spec with
:func:`open_dataset`."""

from g2d.data.labelled.dataset import LabelledCXR, Record, collate_labelled
from g2d.data.labelled.specs import open_dataset

__all__ = ["LabelledCXR", "Record", "collate_labelled", "open_dataset"]
