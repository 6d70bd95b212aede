"""RadBench evaluation for radfm_jax: tasks, answer normalisation, library metrics with bootstrap CIs,
batched model predictions and the report. Entry point: `python -m eval.radbench` (see eval/README.md)."""
