"""Pod scale from a CPU box: compile a config's exact programs for a TPU topology and plan with them.

  python -m radfm_jax.aot --config=configs/medmd_pretrain.py:13b --topology=v5p-128 [--out=DIR] [--search]

  topology.py   gcloud names (v5p-128, v6e-64, ...) -> libtpu topologies, chip HBM / peak, devices
  programs.py   the train / eval / generate programs, built by training.step / inference.decoding
  plan.py       compile one program: memory analysis, OOM report in plain words, FLOPs and timing
  planner.py    a config on a topology (`plan`), the search over mesh x microbatches x remat (`search`)
  report.py     markdown: plans, searches, the README's scale table
  __main__.py   the CLI (flags, plan.json / search.json, exit status)
"""
