"""The Modality (0008,0060) codes DICOM defines: PS3.3 C.7.3.1.1.1, retired ones included.

A routing rule on a code not listed here (``MRI`` for ``MR``) never fires: devices send these
codes. Upper case, as the standard writes them; rules compare modality without regard to case.
"""

from __future__ import annotations

MODALITIES: frozenset[str] = frozenset(
    {
        "ANN", "AR", "ASMT", "AU", "BDUS", "BI", "BMD", "CFM", "CR", "CT", "CTPROTOCOL",
        "DG", "DMS", "DOC", "DX", "ECG", "EEG", "EMG", "EOG", "EPS", "ES", "FID", "GM", "HC",
        "HD", "IO", "IOL", "IVOCT", "IVUS", "KER", "KO", "LEN", "LS", "M3D", "MG", "MR",
        "NM", "OAM", "OCT", "OP", "OPM", "OPT", "OPTBSV", "OPTENF", "OPV", "OSS", "OT", "PA",
        "PLAN", "POS", "PR", "PT", "PX", "REG", "RESP", "RF", "RG", "RTDOSE", "RTIMAGE",
        "RTINTENT", "RTPLAN", "RTRAD", "RTRECORD", "RTSEGANN", "RTSTRUCT", "RWV", "SEG", "SM",
        "SMR", "SR", "SRF", "STAIN", "TEXTUREMAP", "TG", "US", "VA", "XA", "XAPROTOCOL", "XC",
    }
)  # fmt: skip

# Still sent by older devices (and found in archives): a rule on them is no mistake.
RETIRED_MODALITIES: frozenset[str] = frozenset(
    {
        "AS", "CD", "CF", "CP", "CS", "DD", "DF", "DM", "DS", "EC", "FA", "FS", "LP", "MA",
        "MS", "OPR", "ST", "VF",
    }
)  # fmt: skip


def unknown_modality(code: str) -> str | None:
    """Why ``code`` is no DICOM modality, with the code meant where one is evident; None if
    it is one (in any case: rules ignore case)."""
    value = code.strip().upper()
    if value in MODALITIES or value in RETIRED_MODALITIES:
        return None
    # `MRI`, `CTA`: the longest defined code the text starts with is most likely the one meant.
    meant = max((m for m in MODALITIES if value.startswith(m)), key=len, default=None)
    hint = f" (did you mean {meant!r}?)" if meant else ""
    return f"{code!r} is no DICOM modality code{hint}"
