"""The live catalogue: a bundle's items plus numbered deltas (docs/live_catalogue.md). ``delta``
parses and checks a delta, ``placement`` finds where an added item goes (``descent``: the best
parents of leaves), ``catalogue`` applies a delta into a new immutable version, ``tree_arrays`` holds
the tree's counts, centroid sums and children, ``carried`` a writer's placement in a record. May import ``models.index`` and ``models.nets.content_tower``;
never ``models.search``, ``service`` or ``training``."""
