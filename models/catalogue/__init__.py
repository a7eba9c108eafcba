"""The live catalogue: a bundle's items plus numbered deltas (docs/live_catalogue.md). ``delta``
parses and checks a delta, ``placement`` finds where an added item goes, ``catalogue`` applies a
delta into a new immutable version. May import ``models.index`` and ``models.nets.content_tower``;
never ``models.search``, ``service`` or ``training``."""
