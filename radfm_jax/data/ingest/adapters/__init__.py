"""Adapters for RadFM's released text files (`--from=radfm`), one per dataset, behind a registry.

An adapter is `fn(src, image_root, *, split="train", seed=0, **opts) -> Iterator[Sample | RowError]`:
it reads one released CSV/JSON file, draws prompts from `radfm_jax.data.ingest.prompts`, and yields a
`schema.Sample` per usable row (image paths relative to image_root) or a `schema.RowError` per malformed
row. Bad arguments (unknown option, missing source file, unknown split) raise at call time. Output is a
pure function of (file, seed): the same call yields the same samples.

  from radfm_jax.data.ingest import adapters
  for item in adapters.get("vqa_rad")("vqarad_test.csv", "/data/vqarad", split="test"): ...

Options common to all: dataset= (name used in ids and Sample.source), strip_prefix= (removed from the
released, often absolute, image paths before they are made relative to image_root). Others per family:
see each module (medpix, chestxray, vqa, pmc, rp3d).
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

from radfm_jax.data import schema
from radfm_jax.data.ingest.adapters import chestxray, medpix, pmc, rp3d, vqa

Adapter = Callable[..., Iterator[schema.Sample | schema.RowError]]


def _named(fn: Adapter, name: str, **defaults) -> Adapter:
  adapter = functools.partial(fn, dataset=name, **defaults)
  functools.update_wrapper(adapter, fn)
  return adapter


_REGISTRY: dict[str, Adapter] = {
    # MedPix
    "medpix_single": _named(medpix.medpix_single, "medpix_single"),
    "medpix_multi": _named(medpix.medpix_multi, "medpix_multi"),
    "medpix_qa": _named(medpix.medpix_qa, "medpix_qa"),
    # 2D radiograph sets
    "mimic_cxr_report": _named(chestxray.cxr_report, "mimic_cxr_report"),
    "chestxray_multilabel": _named(chestxray.cxr_multilabel, "chestxray_multilabel"),
    "pcxr_multilabel": _named(chestxray.cxr_multilabel, "pcxr_multilabel"),
    "mammo_multilabel": _named(chestxray.cxr_multilabel, "mammo_multilabel", modality="mammography"),
    "spinexr_multilabel": _named(chestxray.cxr_multilabel, "spinexr_multilabel"),
    "chestxray_binary": _named(chestxray.binary_diagnosis, "chestxray_binary"),
    "pcxr_binary": _named(chestxray.binary_diagnosis, "pcxr_binary"),
    "mammo_binary": _named(chestxray.binary_diagnosis, "mammo_binary", modality="mammography"),
    "spinexr_binary": _named(chestxray.binary_diagnosis, "spinexr_binary"),
    # 2D VQA
    "pmc_vqa": _named(vqa.vqa, "pmc_vqa"),
    "vqa_rad": _named(vqa.vqa, "vqa_rad"),
    "slake": _named(vqa.vqa, "slake"),
    # PubMed Central
    "pmc_case_report": _named(pmc.pmc_case_report, "pmc_case_report"),
    "pmc_inline": _named(pmc.pmc_inline, "pmc_inline"),
    "pmc_oa": _named(pmc.pmc_oa, "pmc_oa"),
    # Radiopaedia 3D
    "rp3d_vqa": _named(rp3d.rp3d_vqa, "rp3d_vqa"),
    "rp3d_modality": _named(rp3d.rp3d_modality, "rp3d_modality"),
    "rp3d_caption": _named(rp3d.rp3d_caption, "rp3d_caption"),
    "rp3d_rationale": _named(rp3d.rp3d_rationale, "rp3d_rationale"),
}


def names() -> list[str]:
  """Registered dataset names, sorted."""
  return sorted(_REGISTRY)


def get(name: str) -> Adapter:
  """The adapter for dataset `name`; KeyError listing the known names otherwise."""
  try:
    return _REGISTRY[name]
  except KeyError:
    raise KeyError(f"unknown RadFM dataset {name!r}; known: {', '.join(names())}") from None
