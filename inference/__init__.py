"""Inference: nnU-Net v2 model folders, label catalogues and the predictor.

Arrays in, label maps out. Never imports pydicom or pynetdicom.
"""
