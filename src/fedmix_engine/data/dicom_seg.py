"""Predicted masks of DICOM images as DICOM Segmentation objects (highdicom), so they go back to the
PACS and open in DICOM viewers (OHIF, 3D Slicer, …) on top of the image they were predicted from.

One SEG per source image: a BINARY segmentation with one segment per class (label *k* of the mask
is segment *k*), referencing the source instance, copying its patient and study (as a SEG must: it
belongs to that study, and like the source it stays at the site), and naming FedMix as the
automatic algorithm. highdicom cannot write a SEG for a multi-frame source without a frame of
reference (an ultrasound cine loop); that is refused with the reason, and the TIFF mask stands.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from fedmix_engine.atomic import atomic_write_bytes
from fedmix_engine.errors import InputError

SERIES_NUMBER = 9100  # a series number PACS users can spot; the SEG series' own UID is new per file
# What a PACS or viewer lists for the SEG series, so nobody reading the study takes it for a clinical result:
# napari-fedmix is research software, not a medical device (README, "Intended use"). Both are LO (≤ 64 chars).
SERIES_DESCRIPTION = "FedMix segmentation: research use only, not for diagnosis"
CONTENT_DESCRIPTION = "FedMix prediction, research use only"


def default_class_names(count: int) -> list[str]:
    """Segment labels when the model's class names are not given: one class is FedMix's lesion."""
    return ["lesion"] if count == 1 else [f"class {k}" for k in range(1, count + 1)]


def write_dicom_seg(source: str | Path, labels: np.ndarray, classes: Sequence[str], out: str | Path,
                    parameters: Mapping[str, str] | None = None) -> Path:
    """Write ``labels`` (H×W, or F×H×W for a multi-frame source; 0 = background, k = ``classes[k-1]``)
    as a DICOM SEG of ``source`` to ``out``, atomically. ``parameters`` (the model's digest, the
    threshold) go into the SEG's algorithm identification, so the PACS copy names the model too."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from fedmix_engine import __version__
    from fedmix_engine.data.dicom import frame_count, read_dataset

    source, out = Path(source), Path(out)
    dataset = read_dataset(source, pixels=False)  # a SEG refers to the header only; the pixels were read
    frames = frame_count(dataset)
    if labels.shape[-2:] != (dataset.Rows, dataset.Columns) or (labels.ndim == 3 and len(labels) != frames):
        raise InputError(source, f"mask of shape {labels.shape} does not fit the image's {frames} frame(s) of "
                                 f"{dataset.Rows}×{dataset.Columns}")
    if frames > 1 and "FrameOfReferenceUID" not in dataset:
        raise InputError(source, f"no DICOM SEG for a {frames}-frame image without a frame of reference (a cine "
                                 "loop): highdicom cannot place its frames; the TIFF mask has them")
    if int(labels.max(initial=0)) > len(classes):
        raise InputError(source, f"mask label {int(labels.max())} has no class name (classes: {', '.join(classes)})")
    algorithm = hd.AlgorithmIdentificationSequence(name="FedMix", version=__version__,
                                                   family=codes.DCM.ArtificialIntelligence,
                                                   parameters=dict(parameters) if parameters else None)
    segments = [hd.seg.SegmentDescription(segment_number=k, segment_label=name,
                                          segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
                                          segmented_property_type=codes.SCT.Lesion,
                                          algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                                          algorithm_identification=algorithm)
                for k, name in enumerate(classes, start=1)]
    try:
        seg = hd.seg.Segmentation(
            source_images=[dataset], pixel_array=labels.astype(np.uint8),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=segments,
            series_instance_uid=hd.UID(), series_number=SERIES_NUMBER, sop_instance_uid=hd.UID(),
            instance_number=1, manufacturer="napari-fedmix", manufacturer_model_name="FedMix",
            software_versions=__version__, device_serial_number="none", content_label="FEDMIX",
            content_description=CONTENT_DESCRIPTION, omit_empty_frames=False)
    except Exception as exc:  # highdicom refuses sources it cannot reference with many types; a batch goes on
        raise InputError(source, f"no DICOM SEG for this image ({type(exc).__name__}: {exc})") from exc
    seg.SeriesDescription = SERIES_DESCRIPTION  # highdicom's constructor takes none
    if not all(name.isascii() for name in classes):  # the source's character set (often Latin-1) may not
        seg.SpecificCharacterSet = "ISO_IR 192"  # write the label ('病变' became '??'); UTF-8 writes every value
    buffer = io.BytesIO()
    seg.save_as(buffer)
    atomic_write_bytes(out, buffer.getvalue())
    return out
