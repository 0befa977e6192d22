"""Harnesses that import code from outside this repository (the release of the MeanFlow authors), for benchmarks and fixtures."""
