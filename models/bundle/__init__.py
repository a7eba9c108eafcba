"""A bundle on disk and how it becomes runnable: the manifest and checked files (``bundle``), the item
table and attributes, the torch backend files, and the decoder backends (ONNX Runtime, torch) that
score one search step. May import ``models.index``, ``models.search.beam`` (score modes) and
``models.nets``; never ``service`` or ``training``."""
