"""Tests of the genret command line."""
