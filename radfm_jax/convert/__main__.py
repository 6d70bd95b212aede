"""CLI: `python -m radfm_jax.convert --from=FORMAT | --to=FORMAT --src=... --dst=...` (see __init__)."""
from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from radfm_jax import convert
from radfm_jax.convert import common, hf_llama, peft_lora, radfm_torch, sources

FORMATS = ("hf-llama", "radfm-torch", "peft-lora")
flags.DEFINE_enum("from", None, FORMATS, "import this format into our checkpoint at --dst")
flags.DEFINE_enum("to", None, FORMATS, "export our checkpoint at --src to this format")
flags.DEFINE_string("src", None, "source: HF model dir | RadFM pytorch_model.bin | our checkpoint dir")
flags.DEFINE_string("dst", None, "destination: our checkpoint dir | HF model dir | torch .bin file")
flags.DEFINE_string("base", None, "--from=peft-lora: the base checkpoint the adapters belong to")
config_flags.DEFINE_config_file("config", None, "model config (required for --from=radfm-torch; "
                                "for --from=hf-llama it supplies all but the LM, whose dims come from "
                                "config.json)", lock_config=False)
flags.DEFINE_string("dtype", None, "store parameters in this dtype (e.g. bfloat16); default: as config/source")
flags.DEFINE_bool("overwrite", False, "replace an existing --dst checkpoint")
flags.DEFINE_bool("dry_run", False, "--from only: check every key and shape of --src against the "
                  "config without converting (reads no tensor data); exit status 1 on problems")
flags.DEFINE_float("max_shard_gb", 5.0, "--to=hf-llama: safetensors shard size")
FLAGS = flags.FLAGS


def _dry_run(src_fmt: str, cfg) -> list[str]:
  src = sources.open_source(FLAGS.src)
  if src_fmt == "hf-llama":
    cfg = hf_llama.hf_llama_config(FLAGS.src, cfg)
    return common.dry_run(src, hf_llama.hf_layout(), cfg, "llama")
  if cfg is None:
    raise app.UsageError("--from=radfm-torch needs --config (e.g. configs/radfm_13b.py)")
  return common.dry_run(src, radfm_torch.radfm_layout(), cfg, "radfm")


def main(argv):
  del argv
  src_fmt, dst_fmt = FLAGS["from"].value, FLAGS.to
  if (src_fmt is None) == (dst_fmt is None):
    raise app.UsageError("give exactly one of --from or --to")
  if not FLAGS.src or not FLAGS.dst:
    raise app.UsageError("--src and --dst are required")
  cfg = FLAGS.config
  if "peft-lora" in (src_fmt, dst_fmt):
    if FLAGS.dry_run:
      raise app.UsageError("--dry_run checks hf-llama / radfm-torch imports")
    if dst_fmt:
      keys = peft_lora.export_peft(FLAGS.src, FLAGS.dst)
      print(f"wrote {FLAGS.dst}: {peft_lora.CONFIG_FILE}, {peft_lora.WEIGHTS_FILE} ({len(keys)} tensors)")
    else:
      if not FLAGS.base:
        raise app.UsageError("--from=peft-lora needs --base=CKPT (the checkpoint the adapters belong to)")
      paths = peft_lora.import_peft(FLAGS.src, FLAGS.base, FLAGS.dst, overwrite=FLAGS.overwrite)
      print(f"wrote {FLAGS.dst}: adapters-only checkpoint ({len(paths)} params) for {FLAGS.base}")
    return
  if FLAGS.dry_run:
    if src_fmt is None:
      raise app.UsageError("--dry_run checks an import (--from=...)")
    problems = _dry_run(src_fmt, cfg)
    print("\n".join(problems) if problems else f"{FLAGS.src}: all keys and shapes match")
    raise SystemExit(1 if problems else 0)
  if src_fmt == "hf-llama":
    report = convert.import_hf_llama(FLAGS.src, FLAGS.dst, base_cfg=cfg, dtype=FLAGS.dtype,
                                     overwrite=FLAGS.overwrite)
  elif src_fmt == "radfm-torch":
    if cfg is None:
      raise app.UsageError("--from=radfm-torch needs --config (e.g. configs/radfm_13b.py)")
    report = convert.import_radfm_torch(FLAGS.src, cfg, FLAGS.dst, dtype=FLAGS.dtype,
                                        overwrite=FLAGS.overwrite)
  elif dst_fmt == "hf-llama":
    files = convert.export_hf_llama(FLAGS.src, FLAGS.dst, dtype=FLAGS.dtype,
                                    max_shard_bytes=int(FLAGS.max_shard_gb * (1 << 30)))
    print(f"wrote {FLAGS.dst}: config.json, {', '.join(files)}")
    return
  else:
    n = common.write_torch(convert.export_radfm_torch(FLAGS.src, dtype=FLAGS.dtype), FLAGS.dst)
    print(f"wrote {FLAGS.dst}: {n} tensors (RadFM torch layout)")
    return
  logging.info("dropped keys: %s", report.dropped)
  print(f"wrote {FLAGS.dst}: {report.summary()}")


if __name__ == "__main__":
  app.run(main)
