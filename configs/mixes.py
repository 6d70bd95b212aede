"""Dataset mixtures for the two RadFM training stages, as `data.mix` lists of {name, store, weight}.

  c.data = common_data.data_config(mix=mixes.medmd_pretrain("/data/stores"))

Each name is a `radfm_jax.data.ingest.adapters` dataset, built into its own store at ROOT/NAME with
  python -m radfm_jax.data.build --from=radfm --dataset=NAME --src=... --out=ROOT/NAME
A weight is the expected fraction of *samples* drawn from that store (the pipeline turns it into
per-batch proportions); every store repeats independently, so small sets are revisited more often.

How the weights were chosen (our choice, not numbers from the RadFM release, which samples its
datasets in its own training script): the stage share of each family is fixed first, then split inside
the family roughly by size, with a floor so small expert sets are not drowned out:
- MedMD pre-training: interleaved PMC-Inline (the largest source, the only interleaved text) 25%,
  3D Radiopaedia (RP3D, RadFM's distinctive 3D data) 20%, PMC-OA captions 15%, chest X-ray
  reports/labels 12%, MedPix 10%, PMC-VQA 8%, PMC-CaseReport 7%, VQA-RAD + SLAKE 3%.
- RadMD fine-tuning (radiology only): no PMC-Inline or general PMC-OA captions; 3D RP3D 35%, chest
  X-ray sets 25%, MedPix 15%, VQA sets 15%, PMC-CaseReport 10%.
"""
from __future__ import annotations

_MEDMD = {
    "pmc_inline": 0.25,
    "rp3d_caption": 0.06, "rp3d_vqa": 0.06, "rp3d_rationale": 0.05, "rp3d_modality": 0.03,
    "pmc_oa": 0.15,
    "mimic_cxr_report": 0.04, "chestxray_multilabel": 0.02, "chestxray_binary": 0.02,
    "pcxr_multilabel": 0.01, "mammo_multilabel": 0.01, "spinexr_multilabel": 0.01, "pcxr_binary": 0.005,
    "mammo_binary": 0.0025, "spinexr_binary": 0.0025,
    "medpix_single": 0.04, "medpix_multi": 0.04, "medpix_qa": 0.02,
    "pmc_vqa": 0.08,
    "pmc_case_report": 0.07,
    "vqa_rad": 0.01, "slake": 0.02,
}

_RADMD = {
    "rp3d_caption": 0.11, "rp3d_vqa": 0.10, "rp3d_rationale": 0.10, "rp3d_modality": 0.04,
    "mimic_cxr_report": 0.09, "chestxray_multilabel": 0.04, "chestxray_binary": 0.04,
    "pcxr_multilabel": 0.02, "mammo_multilabel": 0.02, "spinexr_multilabel": 0.02, "pcxr_binary": 0.01,
    "mammo_binary": 0.005, "spinexr_binary": 0.005,
    "medpix_single": 0.06, "medpix_multi": 0.06, "medpix_qa": 0.03,
    "pmc_vqa": 0.09, "vqa_rad": 0.02, "slake": 0.04,
    "pmc_case_report": 0.10,
}


def _mix(weights: dict[str, float], root: str) -> list[dict]:
  root = root.rstrip("/")
  return [{"name": name, "store": f"{root}/{name}", "weight": w} for name, w in weights.items()]


def medmd_pretrain(root: str) -> list[dict]:
  """Stage 1 (MedMD) mixture; stores at ROOT/NAME."""
  return _mix(_MEDMD, root)


def radmd_finetune(root: str) -> list[dict]:
  """Stage 2 (RadMD) mixture; stores at ROOT/NAME."""
  return _mix(_RADMD, root)
