"""``python -m dicom_node`` is the ``dicom-node`` command."""

from dicom_node.cli import main

main()
