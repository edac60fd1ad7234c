"""Frozen baselines: old code of batchgap, copied so that it cannot change when batchgap does.

A benchmark row that reads "batchgap as of commit X" times the code in one of these files. Each file
depends on torch and the standard library alone: it imports nothing from batchgap and nothing from the
other benchmark modules, so a refactor of batchgap (a private helper renamed, a public default changed)
cannot silently change what the baseline computes. tests/test_benchmarks.py enforces that.
"""
