"""radfm_jax: a JAX-native training codebase for the Radiology Foundation Model (RadFM)."""
__version__ = "0.1.0"
