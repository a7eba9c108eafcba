"""Catalogue deltas reaching a serving replica without a reload (docs/live_catalogue.md): the ordered
log of delta files shared by replicas (``store``) and the per-model chain that applies them
(``live``). May import ``models.catalogue``, ``service.registry`` and the package root
(settings, errors, metrics)."""
