"""The model registry: the one place that knows which model classes exist.

  models.get("radfm")   -> RadFM (3D ViT + perceiver resampler + LLaMA decoder, `models/radfm.py`)
  models.get("llama")   -> Llama (the language model alone, e.g. imported from Hugging Face)
  models.name_of(model) -> "radfm" | "llama"   (what a checkpoint records as its `model_class`)
  models.takes_images(model)

Every class is built as `cls(cfg.model, rngs=nnx.Rngs(seed))`. Checkpoints, sharded init, the train
state and inference all ask this registry instead of importing a class or testing `isinstance`.
To add a model: write `models/<name>.py` with a class of that signature and add it to REGISTRY.
"""
from __future__ import annotations

from flax import nnx

from radfm_jax.models.llama import Llama
from radfm_jax.models.radfm import RadFM

REGISTRY: dict[str, type[nnx.Module]] = {"radfm": RadFM, "llama": Llama}
DEFAULT = "radfm"
_TAKES_IMAGES = {"radfm": True, "llama": False}


def get(name: str) -> type[nnx.Module]:
  if name not in REGISTRY:
    raise ValueError(f"unknown model class {name!r}; known: {sorted(REGISTRY)}")
  return REGISTRY[name]


def name_of(model: nnx.Module) -> str:
  for name, cls in REGISTRY.items():
    if type(model) is cls:  # pylint: disable=unidiomatic-typecheck
      return name
  raise ValueError(f"{type(model).__name__} is not a registered model class: known {sorted(REGISTRY)}")


def takes_images(model: nnx.Module) -> bool:
  """False for an LM-only model (text prompts without their image blocks)."""
  return _TAKES_IMAGES[name_of(model)]
