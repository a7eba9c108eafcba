"""genret: benchmarks (the service under load, soak, search and retrieval cost), the synthetic bundle
maker they and the tests build on, and the launcher that starts the service as a subprocess."""
