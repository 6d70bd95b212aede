"""Read-only, lazy access to torch / safetensors state dicts, one tensor at a time.

`open_source(path)` accepts
  - a torch pickle (`*.bin`, `*.pt`, `*.pth`): loaded with `torch.load(weights_only=True, mmap=True)`,
    so nothing but tensors is unpickled and tensor data stays on disk until read;
  - a `*.safetensors` file (read through `safe_open`, which memory-maps);
  - a Hugging Face model directory: `model.safetensors`, `pytorch_model.bin`, or a sharded checkpoint
    with its `*.index.json` (safetensors preferred when both are present).
`DictSource` wraps an in-memory mapping (tests, a live `torch.nn.Module.state_dict()`).

Every source returns numpy arrays (`ml_dtypes.bfloat16` for torch bf16) and remembers which keys were
read, so converters can prove that every key was either consumed or deliberately dropped.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping

import ml_dtypes
import numpy as np

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HF_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def torch_to_numpy(t: Any) -> np.ndarray:
  """A torch tensor as a numpy array without copying where possible (bf16 via a bit view)."""
  import torch  # pylint: disable=g-import-not-at-top
  t = t.detach()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def numpy_to_torch(a: np.ndarray) -> Any:
  """A numpy array (bf16 via ml_dtypes allowed) as a torch tensor."""
  import torch  # pylint: disable=g-import-not-at-top
  a = np.ascontiguousarray(a)
  if a.dtype == ml_dtypes.bfloat16:
    return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
  return torch.from_numpy(a)


class Source:
  """A lazy mapping key -> numpy array that records which keys were read."""

  name: str = "<state dict>"

  def __init__(self) -> None:
    self.consumed: set[str] = set()

  def keys(self) -> list[str]:
    raise NotImplementedError

  def shape(self, key: str) -> tuple[int, ...]:
    raise NotImplementedError

  def _read(self, key: str) -> np.ndarray:
    raise NotImplementedError

  def __contains__(self, key: str) -> bool:
    return key in set(self.keys())

  def get(self, key: str, expected_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """The tensor at `key`; a clear KeyError / ValueError names the key, file and shapes."""
    if key not in self:
      raise KeyError(f"{self.name}: missing key {key!r}"
                     + (f" (expected shape {list(expected_shape)})" if expected_shape is not None else ""))
    if expected_shape is not None and tuple(self.shape(key)) != tuple(expected_shape):
      raise ValueError(f"{self.name}: key {key!r} has shape {list(self.shape(key))}, "
                       f"expected {list(expected_shape)} (from the model config)")
    self.consumed.add(key)
    return self._read(key)

  def unconsumed(self) -> list[str]:
    return sorted(set(self.keys()) - self.consumed)


class DictSource(Source):
  """An in-memory state dict of numpy arrays or torch tensors."""

  def __init__(self, tensors: Mapping[str, Any], name: str = "<state dict>") -> None:
    super().__init__()
    self._t = tensors
    self.name = name

  def keys(self) -> list[str]:
    return list(self._t.keys())

  def __contains__(self, key: str) -> bool:
    return key in self._t

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._t[key].shape)

  def _read(self, key: str) -> np.ndarray:
    v = self._t[key]
    return v if isinstance(v, np.ndarray) else torch_to_numpy(v)


def _load_torch_file(path: str) -> Mapping[str, Any]:
  import torch  # pylint: disable=g-import-not-at-top
  try:
    sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
  except RuntimeError as e:
    raise ValueError(f"{path}: cannot memory-map this torch file ({e}); re-save it with torch >= 1.6 "
                     "(zip format) or convert it to safetensors") from e
  if not isinstance(sd, Mapping):
    raise ValueError(f"{path}: expected a state dict (mapping of names to tensors), got {type(sd).__name__}")
  bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
  if bad:
    raise ValueError(f"{path}: entries that are not tensors: {bad[:5]} (expected a flat state dict)")
  return sd


class FilesSource(Source):
  """One or more files (torch pickles and/or safetensors), tensors read on demand."""

  def __init__(self, files: Iterable[str], name: str | None = None) -> None:
    super().__init__()
    self._where: dict[str, tuple[str, Any]] = {}
    self._handles: dict[str, Any] = {}
    files = list(files)
    self.name = name or (files[0] if len(files) == 1 else os.path.dirname(files[0]) or ".")
    for f in files:
      if f.endswith(".safetensors"):
        h = _safe_open(f)
        self._handles[f] = h
        for k in h.keys():
          self._add(k, f, None)
      else:
        sd = _load_torch_file(f)
        for k, v in sd.items():
          self._add(k, f, v)

  def _add(self, key: str, f: str, tensor: Any) -> None:
    if key in self._where:
      raise ValueError(f"key {key!r} appears in both {self._where[key][0]} and {f}")
    self._where[key] = (f, tensor)

  def keys(self) -> list[str]:
    return list(self._where)

  def __contains__(self, key: str) -> bool:
    return key in self._where

  def shape(self, key: str) -> tuple[int, ...]:
    f, t = self._where[key]
    if t is not None:
      return tuple(t.shape)
    return tuple(self._handles[f].get_slice(key).get_shape())

  def _read(self, key: str) -> np.ndarray:
    f, t = self._where[key]
    if t is not None:
      return torch_to_numpy(t)
    try:
      return self._handles[f].get_tensor(key)
    except Exception as e:  # safetensors raises its own error types (SafetensorError, ...)
      raise ValueError(f"{f}: cannot read tensor {key!r} ({type(e).__name__}: {e})") from None


def _safe_open(path: str) -> Any:
  """safe_open with errors that name the file (a bad header says only what was wrong, not where)."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top  # optional dependency
  try:
    return safe_open(path, framework="np")
  except Exception as e:  # SafetensorError (header), OSError, ...
    raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def _index_shards(model_dir: str, index_path: str) -> list[str]:
  """The shard files named by a `*.index.json`, each checked to be a plain file name inside model_dir."""
  try:
    with open(index_path, encoding="utf-8") as fh:
      weight_map = json.load(fh)["weight_map"]
  except (ValueError, UnicodeDecodeError, KeyError, TypeError) as e:
    raise ValueError(f"{index_path}: expected JSON with a `weight_map` object ({type(e).__name__}: {e})") from None
  if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
    raise ValueError(f"{index_path}: `weight_map` must map tensor names to shard file names")
  root = os.path.realpath(model_dir)
  out = []
  for name in sorted(set(weight_map.values())):
    path = os.path.realpath(os.path.join(root, name))
    if os.path.isabs(name) or os.path.commonpath([root, path]) != root or path == root:
      raise ValueError(f"{index_path}: shard {name!r} is outside {model_dir}; refusing it")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{index_path}: shard {name!r} is missing from {model_dir}")
    out.append(os.path.join(model_dir, name))
  return out


def hf_weight_files(model_dir: str) -> list[str]:
  """The weight files of a Hugging Face model directory (safetensors preferred). Shards named by an
  index must stay inside the directory."""
  for index in HF_INDEX_FILES:
    p = os.path.join(model_dir, index)
    if os.path.exists(p):
      return _index_shards(model_dir, p)
  for name in HF_WEIGHT_FILES:
    p = os.path.join(model_dir, name)
    if os.path.exists(p):
      return [p]
  raise FileNotFoundError(f"{model_dir}: no weights found (looked for {HF_WEIGHT_FILES + HF_INDEX_FILES})")


def open_source(path: str) -> Source:
  """A lazy state dict over a file or a Hugging Face model directory (see the module docstring)."""
  if os.path.isdir(path):
    return FilesSource(hf_weight_files(path), name=path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file")
  return FilesSource([path])
