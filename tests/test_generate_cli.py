"""The inference CLI on a tiny checkpoint with a tiny tokenizer: text prompts with a PNG and a NIfTI
written here, batch files with bad lines, batch-size invariance (greedy and sampled), input parsing."""
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

import generation_fixtures
from radfm_jax import checkpoint, sharding
from radfm_jax.inference import decoding as generate
from radfm_jax.inference import inputs as generate_inputs
from radfm_jax.data import preprocess, readers
from radfm_jax.data import tokenizer as tokenizer_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_NEW = 8
TEXTS = ["The chest radiograph shows no acute cardiopulmonary abnormality.",
         "Axial CT of the brain demonstrates a hypodense lesion in the left frontal lobe.",
         "Is there a pleural effusion? Yes, a small right pleural effusion is seen.",
         "MRI of the knee shows a tear of the medial meniscus."] * 5
BOTH = "Compare <image> with <image>. Findings?"   # NIfTI at char 8, PNG at char 14 of the text below
BOTH_TEXT = "Compare  with . Findings?"


def _cli(*args):
  res = subprocess.run([sys.executable, "-m", "radfm_jax.generate", *args, f"--max_new_tokens={MAX_NEW}"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  lines = [json.loads(x) for x in res.stdout.splitlines() if x.strip()]
  return res, lines


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("gencli")
  ckpt = generation_fixtures.tiny_checkpoint(root, TEXTS)
  rng = np.random.default_rng(0)
  Image.fromarray((rng.random((40, 48)) * 255).astype(np.uint8)).save(root / "cxr.png")
  Image.fromarray((rng.random((56, 36, 3)) * 255).astype(np.uint8)).save(root / "photo.jpg")
  vol = rng.integers(-1000, 1000, (30, 28, 10)).astype(np.int16)
  nib.save(nib.Nifti1Image(vol, np.diag([0.8, 0.8, 2.5, 1.0])), root / "scan.nii.gz")
  # The reference: the library called directly, batch 1, no padding, no mesh; preprocessing done by hand.
  model, cfg = checkpoint.load_model(ckpt)
  tok = tokenizer_lib.Tokenizer.from_config(cfg.data, cfg.model)
  spec = preprocess.ImageSpec.from_config(cfg.data)
  vols = [readers.read_scan(str(root / "scan.nii.gz")), readers.read_scan(str(root / "cxr.png"))]
  images = preprocess.prepare_sample([v.array for v in vols], [v.meta for v in vols], spec)
  assert images.shape == (2, 64, 64, 8, 1)  # the 3D grid; the PNG repeated along depth; gray (C_host = 1)
  prompt = tok.build_prompt({"question": BOTH_TEXT, "images": [{"field": "question", "char": 8},
                                                               {"field": "question", "char": 14}]})
  out = generate.generate(model, np.asarray([prompt]), np.ones((1, len(prompt)), bool), images[None],
                          np.ones((1, 2), bool), max_new_tokens=MAX_NEW, eos_id=tok.eos_id)
  want = generate.trim(np.asarray(out), tok.eos_id)[0]
  return dict(root=root, ckpt=ckpt, want=want, want_text=tok.decode(want))


def test_prompt_with_nifti_and_png_equals_library(setup):
  root = setup["root"]
  res, lines = _cli(f"--checkpoint={setup['ckpt']}", f"--image={root / 'scan.nii.gz'}",
                    f"--image={root / 'cxr.png'}", f"--prompt={BOTH}")
  assert res.returncode == 0, res.stderr[-3000:]
  assert len(lines) == 1
  got = lines[0]
  assert set(got) == {"prompt", "images", "prediction", "ids"}
  assert got["prompt"] == BOTH and got["images"] == [str(root / "scan.nii.gz"), str(root / "cxr.png")]
  assert got["ids"] == setup["want"] and got["prediction"] == setup["want_text"]
  assert all(isinstance(i, int) for i in got["ids"]) and 1 <= len(got["ids"]) <= MAX_NEW


def test_batch_file_reports_bad_lines_and_answers_the_rest(setup):
  root = setup["root"]
  lines = [json.dumps({"id": "png", "prompt": "Findings?", "images": ["cxr.png"]}),
           "{not json",
           json.dumps({"id": "gone", "prompt": "What is this?", "images": ["missing.png"]}),
           "",
           json.dumps({"id": "both", "prompt": BOTH, "images": ["scan.nii.gz", {"path": "cxr.png"}]}),
           json.dumps({"prompt": "Is there a pleural effusion?", "images": [str(root / "photo.jpg")]})]
  (root / "batch.jsonl").write_text("\n".join(lines) + "\n")
  res, out = _cli(f"--checkpoint={setup['ckpt']}", f"--batch_file={root / 'batch.jsonl'}", "--batch_size=2")
  assert res.returncode == 2, res.stderr[-3000:]   # exit status = number of failed lines
  assert [o["line"] for o in out] == [1, 2, 3, 5, 6]  # one line per input, in input order; blank skipped
  assert [o["id"] for o in out] == ["png", 2, "gone", "both", 6]
  assert "not valid JSON" in out[1]["error"] and set(out[1]) == {"id", "line", "error"}
  assert str(root / "missing.png") in out[2]["error"] and "no such file" in out[2]["error"]
  assert "line 2" in res.stderr and "line 3 (id 'gone')" in res.stderr
  for o in (out[0], out[3], out[4]):
    assert "error" not in o and o["ids"] and isinstance(o["prediction"], str)
  assert out[3]["ids"] == setup["want"]   # the same prompt as --prompt (2-row batches, other rows)
  assert out[0]["images"] == [str(root / "cxr.png")]


def test_same_prediction_in_batch_of_1_and_3_greedy_and_sampled(setup):
  root = setup["root"]
  target = {"id": "t", "prompt": "Is there a pleural effusion? <image>", "images": ["cxr.png"]}
  others = [{"id": "long", "prompt": "Axial CT of the brain demonstrates a hypodense lesion in the left "
                                     "frontal lobe. Findings?", "images": ["photo.jpg"]},
            {"id": "short", "prompt": "Modality?", "images": ["photo.jpg"]}]
  (root / "one.jsonl").write_text(json.dumps(target) + "\n")
  (root / "three.jsonl").write_text("\n".join(json.dumps(x) for x in [others[0], target, others[1]]) + "\n")
  cfg = checkpoint.load_config(setup["ckpt"])
  mesh = sharding.make_mesh(cfg.mesh)
  model, cfg = checkpoint.load_model(setup["ckpt"], mesh)

  def run(name, **kw):
    inputs = generate_inputs.read_batch_file(str(root / name))
    res = list(generate_inputs.answer(model, cfg, inputs, mesh=mesh, max_new_tokens=MAX_NEW, **kw))
    assert not [r for r in res if "error" in r], res
    return {r["id"]: r for r in res}

  one = run("one.jsonl", batch_size=1)
  three = run("three.jsonl", batch_size=3)
  assert one["t"]["ids"] == three["t"]["ids"] and one["t"]["prediction"] == three["t"]["prediction"]
  assert len({len(r["prompt"]) for r in three.values()}) == 3  # really mixed lengths: left padding differs
  # Sampling: a line draws from its own key (seed, position), so batching does not change it.
  s1 = run("three.jsonl", batch_size=1, temperature=1.0, seed=3)
  s3 = run("three.jsonl", batch_size=3, temperature=1.0, seed=3)
  assert {k: r["ids"] for k, r in s1.items()} == {k: r["ids"] for k, r in s3.items()}
  assert any(s3[k]["ids"] != three[k]["ids"] for k in three)  # and it is sampling, not greedy


def test_parsing_images_markers_and_lines(tmp_path):
  (tmp_path / "a#1.png").write_bytes(b"")
  assert generate_inputs.parse_image("x.npy#2") == generate_inputs.ImageArg("x.npy", 2)
  assert generate_inputs.parse_image(str(tmp_path / "a#1.png")).index is None  # an existing path stays whole
  assert generate_inputs.parse_image({"path": ["a.dcm", "b.dcm"]}, "/d").path == ("/d/a.dcm", "/d/b.dcm")
  with pytest.raises(ValueError, match="index must be an integer"):
    generate_inputs.parse_image({"path": "x.npy", "index": -1})
  rec = generate_inputs.place_images(BOTH, 2)
  assert rec["question"] == BOTH_TEXT and [im["char"] for im in rec["images"]] == [8, 14]
  assert [im["char"] for im in generate_inputs.place_images("Findings?", 2)["images"]] == [0, 0]
  assert generate_inputs.place_images("a <image> b", 0, marker="")["question"] == "a <image> b"
  with pytest.raises(ValueError, match="2 <image> marker"):
    generate_inputs.place_images("<image> and <image>", 1)
  (tmp_path / "b.jsonl").write_text('{"prompt": "x", "images": "a.png"}\n[1]\n{"prompt": " "}\n'
                                    '{"id": true, "prompt": "x"}\n{"prompt": "x", "id": 7}\n')
  inputs = generate_inputs.read_batch_file(str(tmp_path / "b.jsonl"))
  assert [i.position for i in inputs] == [0, 1, 2, 3, 4] and [i.id for i in inputs] == [1, 2, 3, 4, 7]
  assert "must be a list" in inputs[0].error and "JSON object" in inputs[1].error
  assert "non-empty string" in inputs[2].error and "string or an integer" in inputs[3].error
  assert inputs[4].error is None and inputs[4].prompt == "x"


def test_multi_scan_npy_case_by_index(tmp_path):
  case = np.zeros((2, 3, 64, 64, 8), np.float32)
  case[0, :, :32] = 1.0
  case[1, :, :, :16] = 0.5
  np.save(tmp_path / "case.npy", case)
  spec = preprocess.ImageSpec(image_hw_3d=(64, 64), depth_buckets=(8,))
  group, images = generate_inputs.read_images([generate_inputs.parse_image(f"{tmp_path}/case.npy#1")], spec)
  assert group == 8 and images.shape == (1, 64, 64, 8, 1)
  np.testing.assert_array_equal(images[0, :, :16], 1.0)  # scan 1 (min-max to [0, 1]), not scan 0
  np.testing.assert_array_equal(images[0, :, 16:], 0.0)
  with pytest.raises(ValueError, match="pass an index"):
    generate_inputs.read_images([generate_inputs.parse_image(f"{tmp_path}/case.npy")], spec)
