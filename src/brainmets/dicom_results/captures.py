"""Secondary Capture images of the Grad-CAM overlay on the top slices, in the source study.

Each capture keeps its slice's in-plane orientation (PatientOrientation) and names the source
instance and frame it shows (Source Image Sequence). BodyPartExamined says HEAD: Laterality
is type 2C in the General Series module, required for a paired body part, and a validator
cannot tell a capture of an unpaired one without it.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from brainmets.dicom_results.report import Observer
from brainmets.dicom_results.source import SourceSlice


def overlay_rgb(slice_u8: np.ndarray, cam: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """The windowed slice in grey with the Grad-CAM map blended over it (jet), uint8 RGB."""
    from matplotlib import colormaps

    grey = np.repeat(slice_u8[..., None].astype(np.float32) / 255.0, 3, axis=-1)
    heat = colormaps["jet"](np.clip(cam, 0.0, 1.0))[..., :3]
    return np.round(255.0 * ((1 - alpha) * grey + alpha * heat)).astype(np.uint8)


def orientation_letters(orientation) -> tuple[str, str]:
    """PatientOrientation of a slice from its ImageOrientationPatient: the main direction of
    its rows and of its columns (the captures keep the slice's in-plane orientation)."""
    letters = (("L", "R"), ("P", "A"), ("H", "F"))
    cosines = np.asarray(orientation, dtype=float)
    out = []
    for direction in (cosines[:3], cosines[3:6]):
        axis = int(np.argmax(np.abs(direction)))
        out.append(letters[axis][0 if direction[axis] > 0 else 1])
    return out[0], out[1]


def capture(
    header: Dataset,
    origin: SourceSlice,
    pixels: np.ndarray,
    *,
    series_uid: str,
    series_number: int,
    sop_uid: str,
    rank: int,
    description: str,
    comments: str,
    observer: Observer,
) -> hd.sc.SCImage:
    """One RGB capture of ``pixels`` showing ``origin``, made by ``observer``'s model;
    ``header`` is the study identity (``brainmets.dicom_results.header.study_header``)."""
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=header,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        patient_orientation=orientation_letters(
            origin.value("PlaneOrientationSequence", "ImageOrientationPatient")
        ),
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=rank,
        manufacturer=observer.manufacturer,
        manufacturer_model_name=observer.model_name,
        device_serial_number=observer.model_id or None,
        series_description=description,
        content_qualification="RESEARCH",
        software_versions=observer.software_version,
    )
    sc.ImageComments = comments
    sc.BurnedInAnnotation = "NO"
    sc.BodyPartExamined = "HEAD"
    reference = Dataset()
    reference.ReferencedSOPClassUID = origin.ref.sop_class_uid
    reference.ReferencedSOPInstanceUID = origin.ref.sop_instance_uid
    if origin.frame:
        reference.ReferencedFrameNumber = origin.frame
    sc.SourceImageSequence = [reference]
    return sc
