"""A bundle on disk and how it becomes runnable: its manifest, file names, fingerprint and
:class:`~models.bundle.manifest.BundleError` (``manifest``), the loader that verifies every file
(``bundle``), the item table and attributes, the torch backend's files and modules, and the decoder
backends (ONNX Runtime, torch) that score one search step. May import ``models.index`` and
``models.nets``; never ``models.search``, ``service`` or ``training``."""
