"""dicom-node: a DICOM node that segments series with nnU-Net v2 and returns DICOM-SEG.

This package speaks DICOM and composes ``storage`` (index and file store) and
``inference`` (models and predictor). Importing it stays light: no pydicom here.
"""

__version__ = "0.1.0"
