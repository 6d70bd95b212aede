"""Text prompts and image files for `python -m radfm_jax.generate`: parsing, reading, answering.

Inputs:
  --prompt="..." --image=scan.nii.gz --image=cxr.png   one prompt
  --batch_file=FILE.jsonl                              one {"prompt", "images": [...], "id"?} per line
An image is a path (`data.readers.read_scan`): NIfTI, a DICOM file or series folder, PNG / JPEG / BMP /
TIFF, or .npy. `path#index` selects one scan of a multi-scan source: a 4D NIfTI volume, a RadFM .npy case
file (N x 3 x H x W x D), a folder holding several DICOM series. A path that exists as written is never
split at '#'. In a batch file an image may also be {"path": str or [the DICOM files of one series],
"index": int}, and relative paths are relative to the batch file's folder. Unknown keys in a line are
an error (a misspelt "image" must not silently run the prompt without its image).

Placement: the images go at the start of the prompt, in order (RadFM), unless the prompt contains image
markers (`<image>` by default, `--image_marker`): then it must hold exactly one marker per image, and
image k goes where marker k was (the marker text is removed). Markers are a CLI convention only: the
tokenizer never parses special strings, so text given to it stays text.

Images are read once and preprocessed by `data.preprocess.prepare_sample` without rng: the same
deterministic path as evaluation (no random crop). Requests are decoded by `batch_generate.run`
(grouped by image grid, length-bucketed, sharded): the answer to an input depends on that input only
(and on `seed` + its position when sampling), not on the batch size or the other lines. Inputs are
handled in windows of `window` lines so that only one window's images are held in memory; results come
back in input order, window by window.

Every input gives one result dict: {"id", "line", "prompt", "images", "prediction", "ids"}, or
{"id", "line", "prompt", "error"} for a bad line, an unreadable image or a prompt that does not fit.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator, Sequence

import numpy as np

from radfm_jax import models
from radfm_jax.inference import batching as batch_generate
from radfm_jax.data import jsonl, preprocess, readers
from radfm_jax.data import tokenizer as tokenizer_lib

DEFAULT_MARKER = "<image>"
LINE_KEYS = ("prompt", "images", "id")


@dataclasses.dataclass(frozen=True)
class ImageArg:
  path: str | tuple[str, ...]     # a file or folder, or the files of one DICOM series
  index: int | None = None        # scan of a multi-scan source

  def __str__(self) -> str:
    path = self.path if isinstance(self.path, str) else f"[{self.path[0]} ... {len(self.path)} files]"
    return path if self.index is None else f"{path}#{self.index}"

  def read(self) -> readers.Volume:
    return readers.read_scan(list(self.path) if isinstance(self.path, tuple) else self.path, self.index)


@dataclasses.dataclass
class Input:
  position: int                   # 0-based among the inputs: the sampling key index
  prompt: str = ""
  images: list[ImageArg] = dataclasses.field(default_factory=list)
  id: Any = None
  line: int | None = None         # 1-based line of the batch file
  error: str | None = None        # the line itself is bad


def parse_image(spec: Any, base_dir: str | None = None) -> ImageArg:
  """"path", "path#index" or {"path": str | [str], "index": int} -> ImageArg; relative paths are
  joined to base_dir when given."""
  def resolve(p: Any) -> str:
    if not isinstance(p, str) or not p:
      raise ValueError(f"image path {p!r}: expected a non-empty string")
    p = os.path.expanduser(p)
    return os.path.join(base_dir, p) if base_dir and not os.path.isabs(p) else p

  if isinstance(spec, dict):
    if "path" not in spec or set(spec) - {"path", "index"}:
      raise ValueError(f"image {spec!r}: expected {{\"path\": str or [str], \"index\": int (optional)}}")
    path = spec["path"]
    if isinstance(path, list):
      if not path:
        raise ValueError(f"image {spec!r}: empty list of DICOM files")
      path = tuple(resolve(p) for p in path)
    else:
      path = resolve(path)
    index = spec.get("index")
    if index is not None and (isinstance(index, bool) or not isinstance(index, int) or index < 0):
      raise ValueError(f"image {spec!r}: index must be an integer >= 0")
    return ImageArg(path, index)
  if not isinstance(spec, str):
    raise ValueError(f"image {spec!r}: expected a path string or {{\"path\", \"index\"}}")
  path = resolve(spec)
  if not os.path.exists(path) and "#" in path:
    head, _, tail = path.rpartition("#")
    if tail.isdigit():
      return ImageArg(head, int(tail))
  return ImageArg(path)


def read_batch_file(path: str) -> list[Input]:
  """One Input per non-blank line; a bad line becomes an Input with `error` set (the rest go on)."""
  base = os.path.dirname(os.path.abspath(path))
  inputs = []
  for n, obj in jsonl.read_objects(path):
    inp = Input(position=len(inputs), id=n, line=n)
    inputs.append(inp)
    try:
      if isinstance(obj, ValueError):
        raise obj
      if "id" in obj:
        if not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool):
          raise ValueError(f"\"id\" must be a string or an integer, got {obj['id']!r}")
        inp.id = obj["id"]
      unknown = sorted(set(obj) - set(LINE_KEYS))
      if unknown:
        raise ValueError(f"unknown keys {unknown}; a line holds {list(LINE_KEYS)}")
      if not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
        raise ValueError("\"prompt\" must be a non-empty string")
      inp.prompt = obj["prompt"]
      images = obj.get("images", [])
      if not isinstance(images, list):
        raise ValueError(f"\"images\" must be a list of paths, got {type(images).__name__}")
      inp.images = [parse_image(im, base) for im in images]
    except ValueError as e:
      inp.error = str(e)
  return inputs


def place_images(prompt: str, n_images: int, marker: str = DEFAULT_MARKER) -> dict[str, Any]:
  """The tokenizer record {"question", "images": [{"field", "char"}]} of a prompt (see the module doc)."""
  if marker and marker in prompt:
    parts = prompt.split(marker)
    if len(parts) - 1 != n_images:
      raise ValueError(f"the prompt has {len(parts) - 1} {marker} marker(s) for {n_images} image(s): give one "
                       "marker per image, or none (all images at the start)")
    text, chars = "", []
    for part in parts[:-1]:
      text += part
      chars.append(len(text))
    text += parts[-1]
  else:
    text, chars = prompt, [0] * n_images
  return {"question": text, "images": [{"field": "question", "char": c} for c in chars]}


def read_images(images: Sequence[ImageArg], spec: preprocess.ImageSpec) -> tuple[int, np.ndarray | None]:
  """(group, float32 [S, *grid, spec.image_channels]) of a prompt's images on their own grid;
  (TEXT_ONLY, None) for none."""
  if not images:
    return batch_generate.TEXT_ONLY, None
  vols = [im.read() for im in images]
  arrays, metas = [v.array for v in vols], [v.meta for v in vols]
  group = preprocess.sample_depth([a.shape for a in arrays], metas, spec)
  return group, preprocess.prepare_sample(arrays, metas, spec, rng=None, names=[str(im) for im in images],
                                          grid=preprocess.grid_of(group, spec))


def prepare(inp: Input, tok: tokenizer_lib.Tokenizer, spec: preprocess.ImageSpec, *, max_prompt: int,
            marker: str, text_only: bool) -> batch_generate.Request:
  """An input as a request: prompt ids, and its images read and preprocessed (payload)."""
  if text_only and inp.images:
    raise ValueError(f"{len(inp.images)} image(s) given, but the checkpoint is LM-only (no vision tower)")
  prompt = tok.build_prompt(place_images(inp.prompt, len(inp.images), marker))
  batch_generate.check_length(prompt, max_prompt)
  group, images = read_images(inp.images, spec)
  return batch_generate.Request(index=inp.position, prompt=prompt, group=group, n_images=len(inp.images),
                                payload=images)


def _reason(e: Exception) -> str:
  return str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"


def answer(model, cfg, inputs: Sequence[Input], *, mesh, batch_size: int = 8, max_new_tokens: int = 128,
           temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
           marker: str = DEFAULT_MARKER, window: int = 0) -> Iterator[dict[str, Any]]:
  """Result dicts in input order (see the module doc). model/cfg: `checkpoint.load_model` on `mesh`.
  window: inputs read per round (default 8 batches' worth)."""
  if not cfg.get("data") or not cfg.data.get("tokenizer"):
    raise ValueError("the checkpoint's config names no tokenizer (data.tokenizer): text prompts need one "
                     "(--token_ids works without)")
  tok = tokenizer_lib.Tokenizer.from_config(cfg.data, cfg.model)
  spec = preprocess.ImageSpec.from_config(cfg.data)
  shapes = batch_generate.shapes_for(cfg.data, cfg.model, max_new_tokens)
  text_only = not models.takes_images(model)
  window = window or 8 * batch_generate.rows_per_batch(batch_size, mesh)
  for start in range(0, len(inputs), window):
    chunk = inputs[start:start + window]
    requests, errors = [], {}
    for inp in chunk:
      try:
        if inp.error:
          raise ValueError(inp.error)
        requests.append(prepare(inp, tok, spec, max_prompt=shapes.max_prompt, marker=marker,
                                text_only=text_only))
      except Exception as e:  # pylint: disable=broad-except  (a batch job records and goes on)
        errors[inp.position] = _reason(e)
    ids, failed, _ = batch_generate.run(
        model, requests, lambda r, grid: r.payload, mesh=mesh, tok=tok, spec=spec, shapes=shapes,
        batch_size=batch_size, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
        top_p=top_p, seed=seed)
    errors.update(failed)
    for inp in chunk:
      res = {"id": inp.id, "line": inp.line, "prompt": inp.prompt or None}
      if inp.position in errors:
        res["error"] = errors[inp.position]
      else:
        out = ids[inp.position]
        res.update(images=[str(im) for im in inp.images], prediction=tok.decode(out), ids=out)
      yield {k: v for k, v in res.items() if v is not None}
