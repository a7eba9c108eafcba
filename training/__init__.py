"""The offline trainer; imports ``models``, never ``service``, ``cli`` or ``benchmarks``.

At the root: configs (``config``, YAML under ``configs/``), splits, metrics and evaluation, the
trainer skeleton (``trainer``, ``distributed``), clustering, the one method table (``registry``),
and offline reports (comparison, frontier, IVF, index report). Sub-packages: ``data`` (loaders,
dense ids, synthetic data), ``methods/<name>`` (one package per method), ``export`` (ONNX graphs,
torch files, the bundle writer), ``coldstart`` (the cold-start evaluation).
"""
