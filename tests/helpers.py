"""Helpers the tests share (importable: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from g2d.downstream import protocol


def parse_protocol_args(name: str, argv: list[str]) -> protocol.ProtocolArgs:
    """A protocol's ``Args`` from command-line flags, the way ``g2d eval NAME`` builds them
    (:func:`g2d.downstream.protocol.add_flags`, then :func:`~g2d.downstream.protocol.make`)."""
    parser = protocol.add_flags(argparse.ArgumentParser(prog=f"g2d eval {name}"), protocol.module(name).Args)
    return protocol.make(name, **vars(parser.parse_args(argv)))


def strict_json(path: Path) -> dict:
    """A result file parsed as standard JSON: NaN / Infinity are not JSON and fail here."""
    def reject(token: str) -> None:
        raise ValueError(f"{token} is not JSON")
    return json.loads(Path(path).read_text(), parse_constant=reject)


def write_dicom(path: Path, arr: np.ndarray, photometric: str = "MONOCHROME2") -> Path:
    """A minimal uncompressed 16-bit grayscale DICOM."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import (
        ExplicitVRLittleEndian,
        SecondaryCaptureImageStorage,
        generate_uid,
    )

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.ascontiguousarray(arr.astype(np.uint16)).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return path
