"""DICOM files as scanners and PACS exports write them, made with pydicom for the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", **attributes) -> Path:
    """A minimal secondary-capture DICOM file as a scanner's export would carry it."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName, ds.PatientID = "US", "Doe^Jane", "MRN-0042"
    ds.set_pixel_data(pixels, photometric_interpretation=photometric, bits_stored=pixels.dtype.itemsize * 8)
    for key, value in attributes.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_slice(path: Path, value: int, z: float | None, instance: int, series: str, **attributes) -> Path:
    """One slice of a CT-like series: every pixel holds ``value``; at height ``z`` when given."""
    extra = {"SeriesInstanceUID": series, "InstanceNumber": instance, "PixelSpacing": [0.7, 0.8], **attributes}
    if z is not None:
        extra.update(ImageOrientationPatient=[1, 0, 0, 0, 1, 0], ImagePositionPatient=[-100.0, -120.0, z])
    return write_dicom(path, np.full((16, 20), value, np.uint16), **extra)
