"""Harnesses: the authors' release imported from a local copy (benchmarks, fixtures), and the toy comparison of the objectives."""
