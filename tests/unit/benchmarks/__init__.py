"""Tests of the benchmarks package (pieces that need no running service, or a tiny one)."""
