"""From encoder states to top-K items: the batched constrained beam search (``beam``), its stages
(``staged``) and their capture as CUDA graphs (``graphs``), the beam-width rule (``beam_policy``),
per-request constraints (``constraints``), the exact baseline (``bruteforce``) and the
:class:`~models.search.retriever.Retriever` that ties a bundle to them. May import
``models.index`` and ``models.bundle``; never ``service`` or ``training``."""
