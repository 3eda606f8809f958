"""The coded concepts of the result SR, every one from a standard coding scheme (SNOMED CT,
DICOM's own DCM, UCUM, UMLS; PS3.16), so that viewers and validators know them without a
private dictionary. The table in docs/dicom-results.md lists them with where each is used.
"""

from __future__ import annotations

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

# TID 1500 root and its context.
PROCEDURE_REPORTED = codes.SCT.ComputedTomographyOfHead  # 303653007
DEVICE = codes.DCM.Device  # observer type of the model (TID 1002)

# TID 1501: the one patient-level finding, where it is looked for, and what was measured.
FINDING = Code("94225005", "SCT", "Metastatic malignant neoplasm to brain")
FINDING_SITE = codes.SCT.Brain  # 12738006
PRESENT = codes.SCT.Present  # 52101004
ABSENT = codes.SCT.Absent  # 272519000
PROBABILITY = codes.DCM.Probability  # 122157
THRESHOLD = codes.DCM.ThresholdValue  # 122411
# A probability is a dimensionless ratio; the UCUM annotation says which one.
PROBABILITY_UNIT = Code("{probability}", "UCUM", "probability")

# TID 1500 row 12: statements about the whole report (research use, partial input,
# limitations) as text qualitative evaluations.
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
COMMENT = codes.DCM.Comment  # 121106

# TID 1600-1604: the image library of the top slices.
IMAGE_LIBRARY = codes.DCM.ImageLibrary  # 111028
IMAGE_LIBRARY_GROUP = codes.DCM.ImageLibraryGroup  # 126200
SOURCE = codes.SCT.Source  # 260753009
