"""SentencePiece tokenizer with RadFM's image-token layout, and the record -> token sequence builder.

Id layout (V = text vocabulary size, e.g. 32000 for LLaMA):
  0 pad (= LLaMA's <unk>), 1 bos, 2 eos, 3 .. V-1 text pieces,
  V `<image>`, V+1 `</image>`, V+2+slot*tokens_per_image+j the j-th token of image slot `slot`.
An image in text is one block: `<image>`, tokens_per_image slot ids, `</image>`.

Prompts are built from text chunks and image blocks spliced at the record's positions; the text itself is
never parsed for special tokens, so a report that contains the string "<image>" stays plain text.

Chunk encoding: the text is cut at image positions and at the question/answer boundary (the answer is
joined to the question with one space, as RadFM), and every chunk is encoded on its own. The first text
chunk of a sequence is encoded as SentencePiece would encode a whole text (LLaMA adds a dummy-prefix `▁`);
later chunks are encoded as continuations (no dummy prefix, whitespace kept), so "question" + " answer"
gives "▁answer" and a word cut by an image does not gain a space.

Train a model on a store's text:
  python -m radfm_jax.data.tokenizer --store=STORE --vocab_size=8000 --out=/path/prefix
writes prefix.model (exactly vocab_size pieces; pad/bos/eos = 0/1/2) and prefix.vocab.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import os
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm
from absl import app, flags
from etils import epath
from sentencepiece import sentencepiece_model_pb2

from radfm_jax.data import store as store_lib

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class _Chunk:
  kind: str          # "text" | "image"
  field: str         # "question" | "answer"
  text: str = ""
  slot: int = -1


class Tokenizer:
  """A SentencePiece text model plus image-token ids for `max_images` slots."""

  def __init__(self, model_proto: bytes, *, max_images: int, tokens_per_image: int,
               upstream_image_position: bool = False, name: str = "<memory>"):
    self.name = name
    self.sha256 = hashlib.sha256(model_proto).hexdigest()
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_proto)
    proto.normalizer_spec.add_dummy_prefix = False
    proto.normalizer_spec.remove_extra_whitespaces = False
    self._sp_cont = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    got = (self._sp.bos_id(), self._sp.eos_id())
    if got != (BOS_ID, EOS_ID):
      raise ValueError(f"tokenizer {name}: bos/eos ids are {got}, expected ({BOS_ID}, {EOS_ID}) as "
                       "LLaMA/RadFM")
    if max_images < 0 or tokens_per_image <= 0:
      raise ValueError(f"max_images={max_images}, tokens_per_image={tokens_per_image}: expected >= 0 and > 0")
    self.max_images = max_images
    self.tokens_per_image = tokens_per_image
    self.upstream_image_position = upstream_image_position
    self.text_vocab_size = self._sp.get_piece_size()
    self.pad_id, self.bos_id, self.eos_id = PAD_ID, BOS_ID, EOS_ID
    self.image_start_id = self.text_vocab_size
    self.image_end_id = self.text_vocab_size + 1
    self.vocab_size = self.text_vocab_size + 2 + max_images * tokens_per_image

  @classmethod
  def load(cls, model_path: str | os.PathLike, *, max_images: int, tokens_per_image: int,
           upstream_image_position: bool = False) -> Tokenizer:
    """Loads a SentencePiece .model file (local path or any etils.epath location, e.g. gs://)."""
    path = epath.Path(model_path)
    if not path.exists():
      raise FileNotFoundError(f"tokenizer model {model_path} does not exist")
    return cls(path.read_bytes(), max_images=max_images, tokens_per_image=tokens_per_image,
               upstream_image_position=upstream_image_position, name=str(model_path))

  @classmethod
  def from_config(cls, data_cfg: Any, model_cfg: Any) -> Tokenizer:
    """The run's tokenizer: data.tokenizer with the model's image slots; checks the text vocabulary."""
    if not data_cfg.get("tokenizer"):
      raise ValueError("data.tokenizer is empty: give a SentencePiece .model path")
    tok = cls.load(data_cfg.tokenizer, max_images=int(model_cfg.max_images),
                   tokens_per_image=int(model_cfg.tokens_per_image),
                   upstream_image_position=bool(data_cfg.get("upstream_image_position", False)))
    if tok.text_vocab_size != int(model_cfg.vocab_size):
      raise ValueError(f"tokenizer {data_cfg.tokenizer} has {tok.text_vocab_size} text ids but "
                       f"model.vocab_size is {model_cfg.vocab_size}")
    return tok

  # ---------------------------------------------------------------- ids

  @property
  def image_block_len(self) -> int:
    return self.tokens_per_image + 2

  def image_token_id(self, slot: int, j: int) -> int:
    if not (0 <= slot < self.max_images and 0 <= j < self.tokens_per_image):
      raise ValueError(f"image token ({slot}, {j}) outside {self.max_images} slots x {self.tokens_per_image}")
    return self.text_vocab_size + 2 + slot * self.tokens_per_image + j

  def image_block(self, slot: int) -> list[int]:
    """`<image>` + the slot's tokens_per_image ids + `</image>`."""
    start = self.image_token_id(slot, 0)
    return [self.image_start_id, *range(start, start + self.tokens_per_image), self.image_end_id]

  # ---------------------------------------------------------------- text

  def encode(self, text: str, *, continuation: bool = False) -> list[int]:
    """Text ids, no BOS/EOS. `continuation=True` encodes text that follows other tokens: no dummy
    prefix, leading whitespace kept (see the module docstring)."""
    if not text:
      return []
    return (self._sp_cont if continuation else self._sp).encode(text)

  def decode(self, ids: Iterable[int]) -> str:
    """Text of generated ids: stops at the first eos, drops pad, image and unused ids."""
    out = []
    for i in ids:
      i = int(i)
      if i == self.eos_id:
        break
      if (i != self.pad_id and i != self.bos_id and 0 <= i < self.text_vocab_size
          and not self._sp.IsUnused(i) and not self._sp.IsControl(i)):
        out.append(i)
    return self._sp.decode(out)

  # ---------------------------------------------------------------- records

  def _chunks(self, record: dict[str, Any], with_answer: bool) -> list[_Chunk]:
    rid = record.get("id", "?")
    images = record.get("images", [])
    if len(images) > self.max_images:
      raise ValueError(f"record {rid!r} has {len(images)} images but the tokenizer has {self.max_images} "
                       "image slots (raise max_images)")
    question = record.get("question", "")
    fields = [("question", question)]
    if with_answer:
      fields.append(("answer", " " + record.get("answer", "")))
    chunks = []
    for field, text in fields:
      offset = 1 if field == "answer" else 0  # record chars index the answer without the joining space
      places = []
      for slot, im in enumerate(images):
        if im.get("field", "question") != field:
          continue
        char = int(im.get("char", 0))
        if field == "question" and self.upstream_image_position:
          char = max(len(question) - 1, 0)
        if not 0 <= char <= len(text) - offset:
          raise ValueError(f"record {rid!r}: image {slot} char {char} outside {field} of length "
                           f"{len(text) - offset}")
        places.append((char + offset, slot))
      places.sort()
      pos = 0
      for char, slot in places:
        if char > pos:
          chunks.append(_Chunk("text", field, text=text[pos:char]))
        chunks.append(_Chunk("image", field, slot=slot))
        pos = max(pos, char)
      if pos < len(text):
        chunks.append(_Chunk("text", field, text=text[pos:]))
    return chunks

  def _ids(self, chunks: Sequence[_Chunk]) -> tuple[list[int], list[bool], list[int]]:
    """Token ids, per-token answer flags and the start index of every image block."""
    ids, is_answer, block_starts = [], [], []
    seen_text = False
    for c in chunks:
      if c.kind == "image":
        block_starts.append(len(ids))
        piece = self.image_block(c.slot)
      else:
        piece = self.encode(c.text, continuation=seen_text)
        seen_text = True
      ids.extend(piece)
      is_answer.extend([c.field == "answer"] * len(piece))
    return ids, is_answer, block_starts

  def build_prompt(self, record: dict[str, Any]) -> list[int]:
    """BOS + question with image blocks: the generation prompt (the answer follows after a space)."""
    ids, _, _ = self._ids(self._chunks(record, with_answer=False))
    return [self.bos_id, *ids]

  def build_example(self, record: dict[str, Any], max_len: int | None, *,
                    train: bool = True) -> dict[str, np.ndarray]:
    """Teacher-forcing example: BOS + question-with-images + " " + answer + EOS.

    Returns int32 arrays of length max_len (or of the sequence length when max_len is None):
      inputs     token ids, padded with pad_id
      targets    inputs shifted left by one (pad at the end)
      loss_mask  1 where the target is an answer token (incl. EOS) with id < text_vocab_size
      positions  0..length-1, 0 on padding
    and `length` (a scalar int32, the number of real tokens).

    Too long: with train=True the sequence is cut at max_len, as long as no image block is cut or
    dropped (the text after the last image is what goes); otherwise ValueError naming the record.
    With train=False (evaluation) any truncation is a ValueError: a cut answer must not be scored.
    """
    rid = record.get("id", "?")
    ids, is_answer, block_starts = self._ids(self._chunks(record, with_answer=True))
    ids = [self.bos_id, *ids, self.eos_id]
    is_answer = [False, *is_answer, True]
    limit = len(ids) if max_len is None else max_len
    if len(ids) > limit:
      if not train:
        raise ValueError(f"record {rid!r}: {len(ids)} tokens exceed max_len {limit} (evaluation does "
                         "not truncate)")
      if block_starts and block_starts[-1] + 1 + self.image_block_len > limit:
        raise ValueError(f"record {rid!r}: its {len(block_starts)} image block(s) end at token "
                         f"{block_starts[-1] + 1 + self.image_block_len} > max_len {limit}; truncation "
                         "never cuts an image")
      ids, is_answer = ids[:limit], is_answer[:limit]
    n = len(ids)
    inputs = np.full((limit,), self.pad_id, np.int32)
    inputs[:n] = ids
    targets = np.full((limit,), self.pad_id, np.int32)
    targets[:n - 1] = ids[1:]
    loss_mask = np.zeros((limit,), np.int32)
    ans = np.asarray(is_answer[1:], bool) & (np.asarray(ids[1:]) < self.text_vocab_size)
    loss_mask[:n - 1] = ans
    positions = np.zeros((limit,), np.int32)
    positions[:n] = np.arange(n)
    return dict(inputs=inputs, targets=targets, loss_mask=loss_mask, positions=positions,
                length=np.int32(n))

  def __repr__(self) -> str:
    return (f"Tokenizer({self.name}, text_vocab={self.text_vocab_size}, vocab={self.vocab_size}, "
            f"max_images={self.max_images}, tokens_per_image={self.tokens_per_image})")


# ------------------------------------------------------------------ training

def _store_texts(store: Any, split: str | None) -> Iterator[str]:
  for rec in store.records(split=split):
    for field in ("question", "answer"):
      text = rec.get(field, "")
      if text:
        yield text


def train_tokenizer(source: Iterable[str] | Any, out_prefix: str, vocab_size: int, *,
                    model_type: str = "bpe", split: str | None = "train",
                    byte_fallback: bool | None = None, character_coverage: float = 1.0) -> str:
  """Trains a SentencePiece model on texts, a `Store`, or a store root path; returns the .model path.

  Settings follow LLaMA (BPE, dummy prefix, whitespace kept, unk/pad 0, bos 1, eos 2, digits split).
  byte_fallback defaults to on for vocab_size >= 1024 (256 byte pieces would crowd a tiny vocabulary).
  If the corpus is too small for vocab_size pieces, the model is padded with UNUSED pieces (never
  produced by encode) so that it has exactly vocab_size ids, matching the model config.
  """
  if isinstance(source, (str, os.PathLike)):
    source = store_lib.Store.open(str(source))
  where = f"store {getattr(source, 'root', '?')} split {split!r}" if hasattr(source, "records") else "texts"
  texts = _store_texts(source, split) if hasattr(source, "records") else iter(source)
  texts = (t for t in texts if t and t.strip())
  first = next(texts, None)
  if first is None:
    raise ValueError(f"train_tokenizer: no text in {where}")
  texts = itertools.chain([first], texts)
  if byte_fallback is None:
    byte_fallback = vocab_size >= 1024
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=texts, model_writer=buf, vocab_size=vocab_size, model_type=model_type,
      hard_vocab_limit=False, unk_id=0, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
      add_dummy_prefix=True, remove_extra_whitespaces=False, split_digits=True,
      byte_fallback=byte_fallback, character_coverage=character_coverage, allow_whitespace_only_pieces=True,
      normalization_rule_name="identity", max_sentence_length=1 << 16, minloglevel=2)
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(buf.getvalue())
  if len(proto.pieces) > vocab_size:
    raise RuntimeError(f"sentencepiece produced {len(proto.pieces)} pieces for vocab_size {vocab_size}")
  for i in range(len(proto.pieces), vocab_size):
    proto.pieces.add(piece=f"<unused{i}>", score=0.0,
                     type=sentencepiece_model_pb2.ModelProto.SentencePiece.UNUSED)
  proto.trainer_spec.vocab_size = vocab_size
  model = proto.SerializeToString()
  out = epath.Path(str(out_prefix) + ".model")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_bytes(model)
  sp = spm.SentencePieceProcessor(model_proto=model)
  vocab_lines = [f"{sp.id_to_piece(i)}\t{sp.get_score(i)}" for i in range(sp.get_piece_size())]
  epath.Path(str(out_prefix) + ".vocab").write_text("\n".join(vocab_lines) + "\n")
  return str(out)


def main(argv: Sequence[str]) -> None:
  del argv
  f = flags.FLAGS
  path = train_tokenizer(f.store, f.out, f.vocab_size, model_type=f.model_type, split=f.split or None)
  tok = Tokenizer.load(path, max_images=0, tokens_per_image=1)
  print(f"wrote {path}: {tok.text_vocab_size} text ids, sha256 {tok.sha256}")


if __name__ == "__main__":
  flags.DEFINE_string("store", None, "store root to read the text from", required=True)
  flags.DEFINE_integer("vocab_size", None, "number of text ids (the model's vocab_size)", required=True)
  flags.DEFINE_string("out", None, "output prefix: writes PREFIX.model and PREFIX.vocab", required=True)
  flags.DEFINE_string("model_type", "bpe", "bpe | unigram")
  flags.DEFINE_string("split", "train", "store split whose text is used ('' = all)")
  app.run(main)
