"""NIfTI (.nii, .nii.gz) -> HUVolume through nibabel; voxel values are taken as HU.

The image is brought to the closest canonical RAS orientation (a permutation and flips of the
voxel axes, no resampling), so that the third axis runs inferior -> superior whatever the
acquisition plane. Each slice is then laid out as a DICOM axial image is displayed: rows run
anterior -> posterior and columns patient right -> left. A NIfTI written by dcm2niix from an
axial DICOM series therefore loads to the same [N, H, W] array as :func:`load_series` on the
DICOM files, with the same positions along the normal (z is superior in both RAS and LPS).
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from brainmets.data.dicom import HUVolume, SeriesError


def load_nifti(path: str | os.PathLike[str]) -> HUVolume:
    """Load a 3-D NIfTI volume as HU slices [N, H, W] in ascending position along the normal."""
    path = str(Path(path))
    try:
        image = nib.load(path)
    except Exception as err:
        raise SeriesError(path, f"cannot read NIfTI: {type(err).__name__}: {err}") from err
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise SeriesError(path, f"not a NIfTI image ({type(image).__name__})")
    shape = image.shape
    # A trailing singleton 4th axis (one time point) is common; anything else is not a CT.
    if len(shape) == 4 and shape[3] == 1:
        image = image.slicer[..., 0]
    if len(image.shape) != 3:
        raise SeriesError(path, f"expected a 3-D volume, got shape {shape}")

    canonical = nib.as_closest_canonical(image)
    # get_fdata applies scl_slope/scl_inter, the NIfTI counterpart of the DICOM rescale.
    data = np.asarray(canonical.get_fdata(dtype=np.float32))  # [R, A, S]
    hu = np.ascontiguousarray(np.transpose(data[::-1, ::-1, :], (2, 1, 0)))

    affine = canonical.affine
    normal = affine[:3, 2] / np.linalg.norm(affine[:3, 2])
    voxel_k = np.stack([np.zeros(hu.shape[0]), np.zeros(hu.shape[0]), np.arange(hu.shape[0])])
    centres = affine[:3, :3] @ voxel_k + affine[:3, 3:4]
    positions = normal @ centres
    zooms = canonical.header.get_zooms()[:3]
    warnings = []
    if not np.isfinite(hu).all():
        warnings.append("non-finite voxels replaced by air")
        hu = np.nan_to_num(hu, nan=-1024.0, posinf=-1024.0, neginf=-1024.0)
    return HUVolume(
        hu=hu.astype(np.float32, copy=False),
        positions_mm=positions.astype(np.float64),
        pixel_spacing_mm=(float(zooms[1]), float(zooms[0])),
        warnings=warnings,
        source=path,
        files=[],
    )
