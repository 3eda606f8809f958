"""brainmets: patient-level detection of brain metastases on head CT."""

__version__ = "0.1.0"
