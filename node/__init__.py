"""The DICOM node (``dicom_node.py``): receives chest films from a PACS over the network, runs the
bone-suppression model on them and sends the derived soft-tissue series back (docs/dicom_node.md).

* :mod:`node.storage`: the node's state on disk (received films, derived instances, delivery and
  failure markers), every file named by a hash of the SOP Instance UID, confined to one folder;
* :mod:`node.inference`: one model load for the node's life, the same library calls as ``ldm_eval.py``
  (``models.pipeline.BoneSuppressor``, ``data.io.read_image`` / ``write_dicom``);
* :mod:`node.service`: the pynetdicom server (C-ECHO, C-STORE of CR / DX), the processing and sending
  workers (retry with exponential back-off), the per-study log and the HTTP health check.

Floor: like ``models`` and ``evaluation``, it imports ``models``, ``data`` and ``utils`` only.
"""
