"""Benchmarks: they measure and print, never assert (see bench/README.md)."""
