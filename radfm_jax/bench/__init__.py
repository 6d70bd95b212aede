"""Benchmarks (python -m radfm_jax.bench.<name>)."""
