"""Traffic beside the primary path: A/B variants and shadow bundles from the experiment file
(``experiment_config``, ``experiments``), the shadow lane that runs sampled copies with spare
capacity (``lane``, running each copy through the engine's staged runner), its JSONL log (``log``),
the agreement measures (``agreement``), and the live quality monitor. May
import ``service.engine`` and the package root; the primary path never waits on it."""
