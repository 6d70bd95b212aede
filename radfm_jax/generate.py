"""The inference CLI: answers prompts with images from a checkpoint.

  python -m radfm_jax.generate --checkpoint=DIR --image=scan.nii.gz --image=cxr.png \
      --prompt="Compare <image> with <image>. What changed?"
  -> {"prompt": ..., "images": [...], "prediction": "...", "ids": [...]}
  python -m radfm_jax.generate --checkpoint=DIR --batch_file=prompts.jsonl --batch_size=8 > answers.jsonl
  -> one JSON line per input line ({"id", "line", "prompt", "images", "prediction", "ids"} or
     {"id", "line", "prompt", "error"}); the exit status is the number of failed lines (at most 100, `schema.exit_status`)
  python -m radfm_jax.generate --checkpoint=DIR --token_ids=1,17,42 --max_new_tokens=24
  -> {"ids": [...]}   (generated ids, up to and including eos; no tokenizer involved)

Text prompts, image files and batch files: `inference/inputs.py` (readers and preprocessing are the
data pipeline's, deterministic); many prompts are batched by `inference/batching.py` (shared with
RadBench); decoding is `inference/decoding.py`. This module holds only the CLI.

The CLI places the parameters on the mesh of the checkpoint's config (`cfg.mesh`, default fsdp over all
devices; override with --mesh=data,fsdp,tensor) and can cast them on load (--param_dtype=bfloat16).
"""
from __future__ import annotations

import json
import sys

import jax
import numpy as np
from absl import app, flags, logging

from radfm_jax import checkpoint, distributed, sharding
from radfm_jax.data import preprocess, schema
from radfm_jax.data.tokenizer import EOS_ID
from radfm_jax.inference import inputs as generate_inputs
from radfm_jax.inference.decoding import generate, row_keys, trim

def _define_flags():
  flags.DEFINE_string("checkpoint", None, "checkpoint directory (records its model config and tokenizer)")
  flags.DEFINE_string("adapters", None, "an adapters-only LoRA checkpoint (python -m radfm_jax.export "
                      "--adapters_only) to apply on top of --checkpoint")
  flags.DEFINE_string("prompt", None, "a text prompt; images go at its start unless it holds --image_marker")
  flags.DEFINE_multi_string("image", [], "an image for --prompt (or --token_ids), repeatable: NIfTI, DICOM "
                            "file or folder, PNG/JPEG, .npy; path#index picks a scan of a multi-scan file")
  flags.DEFINE_string("batch_file", None, 'JSONL, one {"prompt", "images": [...], "id"?} per line')
  flags.DEFINE_string("token_ids", None, "comma-separated prompt token ids, e.g. 1,17,42 (no tokenizer)")
  flags.DEFINE_string("image_marker", "<image>", "placement marker in prompts ('' = none: images first)")
  flags.DEFINE_integer("batch_size", 8, "prompts per generate call (rounded up to the batch shards)")
  flags.DEFINE_integer("max_new_tokens", 128, "tokens to generate at most")
  flags.DEFINE_integer("eos_id", EOS_ID, "stop id (--token_ids; text prompts use the tokenizer's)")
  flags.DEFINE_float("temperature", 0.0, "0 = greedy")
  flags.DEFINE_integer("top_k", 0, "sample among the k most likely ids (0 = all)")
  flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass")
  flags.DEFINE_integer("seed", 0, "sampling seed (input k samples with key fold_in(key(seed), k))")
  flags.DEFINE_string("mesh", "", "data,fsdp,tensor sizes (one may be -1); default: the checkpoint's cfg.mesh")
  flags.DEFINE_string("param_dtype", "", "cast parameters on load, e.g. bfloat16 (default: as stored)")


def build_inputs(cfg, flags_) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
  """(prompt_ids [1, P], prompt_mask, images [1, S, H, W, D, C] or None, image_mask or None) of
  --token_ids (+ --image: slot k is the k-th image, preprocessed as in evaluation)."""
  try:
    ids = [int(t) for t in flags_.token_ids.split(",") if t.strip()]
  except ValueError as e:
    raise ValueError(f"--token_ids={flags_.token_ids!r} must be comma-separated integers") from e
  prompt = np.asarray([ids], np.int32)
  if not flags_.image:
    return prompt, np.ones_like(prompt, bool), None, None
  spec = preprocess.ImageSpec.from_config(cfg.get("data") or {})
  _, images = generate_inputs.read_images([generate_inputs.parse_image(s) for s in flags_.image], spec)
  return prompt, np.ones_like(prompt, bool), images[None], np.ones((1, len(images)), bool)


def main(argv) -> int:
  """Prints one JSON line per input; returns (exits with) the number of failed inputs, at most 125."""
  del argv
  f = flags.FLAGS
  if not f.checkpoint:
    raise ValueError("--checkpoint is required")
  modes = [m for m in ("token_ids", "prompt", "batch_file") if f[m].value is not None]
  if len(modes) != 1:
    raise ValueError(f"give exactly one of --prompt, --batch_file, --token_ids (got {modes or 'none'})")
  if f.batch_file and f.image:
    raise ValueError("--image goes with --prompt or --token_ids; a batch file names each line's images")
  if f.prompt is not None and not f.prompt.strip():
    raise ValueError("--prompt is empty")
  distributed.initialize()
  mesh = sharding.inference_mesh(checkpoint.load_config(f.checkpoint).get("mesh"), f.mesh)
  model, cfg = checkpoint.load_model(f.checkpoint, mesh, dtype=f.param_dtype or None, adapters=f.adapters)
  sampling = dict(temperature=f.temperature, top_k=f.top_k, top_p=f.top_p)
  if f.token_ids is not None:
    prompt, mask, images, image_mask = build_inputs(cfg, f)
    with jax.set_mesh(mesh):
      out = generate(model, prompt, mask, images, image_mask, max_new_tokens=f.max_new_tokens,
                     eos_id=f.eos_id, rng=row_keys(f.seed, [0]), **sampling)
    if jax.process_index() == 0:
      print(json.dumps({"ids": trim(np.asarray(out), f.eos_id)[0]}), flush=True)
    return 0
  if f.batch_file:
    inputs = generate_inputs.read_batch_file(f.batch_file)
    if not inputs:
      raise ValueError(f"--batch_file={f.batch_file}: no input lines")
  else:
    inputs = [generate_inputs.Input(position=0, prompt=f.prompt,
                                    images=[generate_inputs.parse_image(s) for s in f.image])]
  failures = 0
  for res in generate_inputs.answer(model, cfg, inputs, mesh=mesh, batch_size=f.batch_size,
                                    max_new_tokens=f.max_new_tokens, seed=f.seed, marker=f.image_marker,
                                    **sampling):
    if "error" in res:
      failures += 1
      where = f"line {res['line']} (id {res['id']!r})" if "line" in res else "the prompt"
      logging.error("%s failed: %s", where, res["error"])
    if jax.process_index() == 0:  # every process holds every result; one prints
      sys.stdout.write(json.dumps(res) + "\n")
      sys.stdout.flush()
  logging.info("%d of %d inputs answered, %d failed", len(inputs) - failures, len(inputs), failures)
  return schema.exit_status(failures)


def run() -> None:
  """Console entry point (`radfm-generate`): defines the flags, parses them, runs `main`."""
  _define_flags()
  distributed.define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
