"""RadFM dataset adapters (`radfm_jax.data.ingest.adapters`) and prompt pools (`radfm_jax.data.ingest.prompts`).

Fixtures: hand-written released-format files in tests/fixtures/radfm/ (each with malformed rows), plus
larger files generated into tmp_path for the statistical checks (yes/no labels, history rate, windows).
"""
from __future__ import annotations

import csv
import inspect
import json
import pathlib
import random

import numpy as np
import pytest

from radfm_jax.data import schema
from radfm_jax.data.ingest import adapters, prompts
from radfm_jax.data.ingest.adapters import common, pmc

FX = pathlib.Path(__file__).parent / "fixtures" / "radfm"
POOLS = prompts.POOLS


def run(name, src, root="", **kw):
  out = list(adapters.get(name)(str(src), str(root), **kw))
  samples = [o for o in out if isinstance(o, schema.Sample)]
  errors = {e.row: e for e in out if isinstance(e, schema.RowError)}
  assert len(samples) + len(errors) == len(out)
  assert len({s.id for s in samples}) == len(samples), "ids must be unique"
  for s in samples:
    s.validate()
  return samples, errors


def by_row(samples):
  return {int(s.id.rsplit("/", 1)[1]): s for s in samples}


def template(s):
  """The pool template a sample's prompt came from."""
  return POOLS[s.meta["prompt_pool"]][s.meta["prompt_index"]]


def at_question_end_or_start(s):
  return all(im.field == "question" and im.char in (0, len(s.question)) for im in s.images) and \
      len({im.char for im in s.images}) == 1


def write_csv(path, header, rows):
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)
  return path


@pytest.fixture
def case_root(tmp_path):
  """An image root with RP3D case files: case1 has 3 scans, case2 is a single 3 x H x W x D scan."""
  (tmp_path / "cases").mkdir()
  np.save(tmp_path / "cases" / "case1.npy", np.zeros((3, 3, 4, 4, 4), np.float16))
  np.save(tmp_path / "cases" / "case2.npy", np.zeros((3, 4, 4, 4), np.float16))
  return tmp_path


# ------------------------------------------------------------------------------------------ prompts


def test_prompt_pool_sizes_and_placeholders():
  sizes = {k: len(v) for k, v in POOLS.items()}
  assert sizes["report"] == 20 and sizes["caption"] == 15 and sizes["classification"] == 11
  assert sizes["yes_no"] == 14 and sizes["modality_open"] == 5 and sizes["modality_yes_no"] == 3
  assert sizes["rationale"] == 10
  expected_fields = {"yes_no": {"disease"}, "modality_yes_no": {"modality"}, "plane_yes_no": {"plane"}}
  for name, pool in POOLS.items():
    assert len(set(pool)) == len(pool), f"duplicate template in {name}"
    for t in pool:
      assert prompts.placeholders(t) == expected_fields.get(name, set()), (name, t)
      assert t.strip() == t and t[-1] in ".?", (name, t)


def test_pick_is_seeded_and_fills_values():
  a = prompts.pick("yes_no", random.Random(3), disease="pneumonia")
  b = prompts.pick("yes_no", random.Random(3), disease="pneumonia")
  assert a == b and "pneumonia" in a.text
  assert a.text == POOLS["yes_no"][a.index].format(disease="pneumonia")
  drawn = {prompts.pick("report", random.Random(i)).index for i in range(200)}
  assert drawn == set(range(20))
  with pytest.raises(ValueError, match="disease"):
    prompts.pick("yes_no", random.Random(0))
  with pytest.raises(KeyError, match="unknown prompt pool"):
    prompts.pick("nope", random.Random(0))


# ------------------------------------------------------------------------------------------ registry


def test_registry_names_and_contract():
  expected = {"medpix_single", "medpix_multi", "medpix_qa", "mimic_cxr_report", "chestxray_multilabel",
              "pcxr_multilabel", "mammo_multilabel", "spinexr_multilabel", "chestxray_binary", "pcxr_binary",
              "mammo_binary", "spinexr_binary", "pmc_vqa", "vqa_rad", "slake", "pmc_case_report",
              "pmc_inline", "pmc_oa", "rp3d_vqa", "rp3d_modality", "rp3d_caption", "rp3d_rationale"}
  assert set(adapters.names()) == expected
  for name in adapters.names():
    params = inspect.signature(adapters.get(name)).parameters
    assert list(params)[:2] == ["src", "image_root"]
    assert params["split"].default == "train" and params["seed"].default == 0
  with pytest.raises(KeyError, match="vqa_rad"):
    adapters.get("vqa-rad")


def test_call_errors_raise_early(tmp_path):
  src = FX / "vqa_rad.csv"
  with pytest.raises(FileNotFoundError, match="nope.csv"):
    adapters.get("vqa_rad")(str(tmp_path / "nope.csv"), "")
  with pytest.raises(ValueError, match="split"):
    adapters.get("vqa_rad")(str(src), "", split="holdout")
  with pytest.raises(TypeError):
    adapters.get("vqa_rad")(str(src), "", windw=3)
  (tmp_path / "x.xlsx").write_text("")
  with pytest.raises(ValueError, match="unsupported source type"):
    adapters.get("vqa_rad")(str(tmp_path / "x.xlsx"), "")


def test_missing_column_and_broken_file_are_row_errors(tmp_path):
  src = write_csv(tmp_path / "v.csv", ["Figure_path", "Question"], [["a.png", "Q?"]])
  samples, errors = run("vqa_rad", src)
  assert not samples and list(errors) == ["header"] and "Answer" in errors["header"].reason
  bad = tmp_path / "cases.json"
  bad.write_text('{"not": "a list"}')
  samples, errors = run("rp3d_caption", bad)
  assert not samples and list(errors) == ["file"] and "JSON list" in errors["file"].reason
  assert errors["file"].source == "cases.json"


def test_list_cells_are_parsed_without_eval():
  row = {"x": "__import__('os').system('echo hacked')"}
  with pytest.raises(common.BadRow, match="expected a list"):
    common.parse_list(row, "x")
  assert common.parse_list({"x": "['a', \"b c\"]"}, "x") == ["a", "b c"]
  assert common.parse_list({"x": '["a"]'}, "x") == ["a"]
  assert common.parse_list({"x": ["a", "b"]}, "x") == ["a", "b"]
  assert common.parse_labels({"x": "A; B|C, A"}, "x") == ["A", "B", "C"]


# ------------------------------------------------------------------------------------------ MedPix


def test_medpix_single():
  samples, errors = run("medpix_single", FX / "medpix_single.csv")
  assert set(errors) == {7, 8}
  assert "'name' is empty" in errors[7].reason and "'orientation'" in errors[8].reason
  rows = by_row(samples)
  assert sorted(rows) == [0, 1, 2, 3, 4, 5, 6]
  truth = {0: "CT - noncontrast", 1: "MR - T2 weighted", 2: "XR - Plain Film", 3: "Axial", 4: "Coronal",
           6: "US - Ultrasound"}
  modalities = ["CT - noncontrast", "MR - T2 weighted", "US - Ultrasound", "XR - Plain Film"]
  for i, s in rows.items():
    assert s.images[0].path == f"img_00{i + 1}.png" and at_question_end_or_start(s)
    assert s.source == "medpix_single" and s.split == "train" and s.meta["dim"] == "2D"
    if i == 5:
      assert s.task == "caption" and s.question in POOLS["caption"]
      assert s.answer.startswith("Axial CT shows a 3 cm mass")
      continue
    kind = "modality" if i in (0, 1, 2, 6) else "plane"
    assert s.task == ("modality" if kind == "modality" else "vqa") and s.meta[kind] == truth[i]
    if s.meta["subtask"].endswith("_open"):
      assert s.question in POOLS[f"{kind}_open"] and s.answer == truth[i]
    else:
      asked = s.meta["asked"]
      assert s.question == template(s).format(**{kind: asked})
      assert s.answer == ("yes" if asked == truth[i] else "no")
      if kind == "modality":
        assert asked in modalities
  assert rows[4].meta["subtask"] == "plane_yes_no" and rows[4].meta["asked"] == "Axial"


def test_medpix_multi():
  samples, errors = run("medpix_multi", FX / "medpix_multi.csv")
  assert list(errors) == [4] and "unknown_section" in errors[4].reason
  rows = by_row(samples)
  s = rows[0]
  assert s.task == "report" and [im.path for im in s.images] == ["a1.png", "a2.png", "a3.png"]
  assert s.answer == "Ring-enhancing lesion in the right frontal lobe. Surrounding vasogenic oedema."
  prompt = template(s)
  assert s.meta["prompt_pool"] == "case_findings" and s.question.endswith(prompt)
  history = "55 year old man with new seizures."
  assert s.question == (f"{history} {prompt}" if s.meta["history_included"] else prompt)
  assert at_question_end_or_start(s)
  assert rows[1].task == "vqa" and rows[1].meta["diagnosis"] == "Glioblastoma" and not rows[1].meta["closed"]
  assert rows[1].meta["history_included"] is False and rows[1].question in POOLS["case_diagnosis"]
  paths = [im.path for im in rows[2].images]  # 12 images -> a seeded subset of 10, in order
  assert len(paths) == 10 and paths == sorted(paths) and set(paths) <= {f"c{i:02d}.png" for i in range(1, 13)}
  assert rows[2].meta["prompt_pool"] == "case_differential"
  assert rows[3].meta["prompt_pool"] == "case_treatment"


def test_medpix_multi_history_rate_and_seed(tmp_path):
  src = write_csv(tmp_path / "m.csv", ["name", "context", "type", "history"],
                  [[f"x{i}.png", f"Finding {i}.", "exam", f"History {i}."] for i in range(300)])
  samples, _ = run("medpix_multi", src, seed=1)
  rate = np.mean([s.meta["history_included"] for s in samples])
  assert 0.4 < rate < 0.6
  for s in samples:
    i = int(s.id.rsplit("/", 1)[1])
    assert s.question.startswith(f"History {i}. ") == s.meta["history_included"]
  assert run("medpix_multi", src, seed=1)[0] == samples
  assert run("medpix_multi", src, seed=2)[0] != samples
  none = run("medpix_multi", src, seed=1, p_history=0.0)[0]
  assert not any(s.meta["history_included"] for s in none)


def test_medpix_qa():
  samples, errors = run("medpix_qa", FX / "medpix_qa.csv")
  assert list(errors) == [2] and "'question' is empty" in errors[2].reason
  rows = by_row(samples)
  assert rows[0].answer == "The liver. Multiple hypodense lesions are seen in the liver."
  assert rows[0].question == "Which organ is abnormal?" and rows[0].images[0].path == "q1.png"
  assert not rows[0].meta["closed"] and at_question_end_or_start(rows[1])
  assert rows[1].answer == "no" and rows[1].meta["closed"] and rows[1].meta["choices"] == ["yes", "no"]


# ------------------------------------------------------------------------------------------ radiographs


def test_cxr_report():
  samples, errors = run("mimic_cxr_report", FX / "mimic_report.csv")
  assert set(errors) == {2, 3}
  assert "'label' is empty" in errors[2].reason and "'image_path'" in errors[3].reason
  rows = by_row(samples)
  assert rows[0].answer.startswith("Findings: The lungs are clear.") and rows[0].task == "report"
  assert rows[0].question in POOLS["report"] and rows[0].meta["modality"] == "X-ray"
  assert [im.path for im in rows[1].images] == ["p10/s2/frontal.jpg", "p10/s2/lateral.jpg"]
  assert at_question_end_or_start(rows[1])
  samples, errors = run("mimic_cxr_report", FX / "cxr_findings_impression.csv")
  rows = by_row(samples)
  assert rows[0].answer == "Findings: Heart size is normal. Impression: Normal chest."
  assert rows[1].answer == "Impression: Cardiomegaly."
  assert list(errors) == [2] and "both findings and impression are empty" in errors[2].reason


def test_cxr_multilabel():
  samples, errors = run("chestxray_multilabel", FX / "chestxray_multilabel.csv")
  assert list(errors) == [3] and "not a non-empty string" in errors[3].reason
  rows = by_row(samples)
  assert rows[0].meta["labels"] == ["Pneumonia", "Effusion"] and rows[0].answer == "Pneumonia, Effusion"
  assert rows[1].meta["labels"] == ["Cardiomegaly", "Atelectasis"]
  assert rows[2].answer == "No Finding"
  for s in samples:
    assert s.task == "diagnosis" and s.question in POOLS["classification"]
    assert s.meta["subtask"] == "diagnosis_multilabel"
    assert s.meta["choices"] == ["Atelectasis", "Cardiomegaly", "Effusion", "No Finding", "Pneumonia"]
  mammo, _ = run("mammo_multilabel", FX / "chestxray_multilabel.csv")
  assert mammo[0].meta["modality"] == "mammography" and mammo[0].id.startswith("mammo_multilabel/")


def test_binary_diagnosis():
  samples, errors = run("chestxray_binary", FX / "binary.csv")
  assert list(errors) == [3] and "'maybe'" in errors[3].reason
  rows = by_row(samples)
  assert [rows[i].answer for i in range(3)] == ["yes", "no", "yes"]
  for i, disease in [(0, "pneumothorax"), (1, "pneumothorax"), (2, "nodule")]:
    s = rows[i]
    assert s.question == template(s).format(disease=disease) and s.meta["prompt_pool"] == "yes_no"
    assert s.meta["closed"] and s.meta["choices"] == ["yes", "no"] and s.meta["asked"] == disease
    assert at_question_end_or_start(s)


# ------------------------------------------------------------------------------------------ VQA


def test_vqa(tmp_path):
  samples, errors = run("vqa_rad", FX / "vqa_rad.csv", tmp_path)
  assert set(errors) == {3, 4}
  assert "'Answer' is empty" in errors[3].reason and "strip_prefix" in errors[4].reason
  rows = by_row(samples)
  assert rows[0].images[0].path == "images/synpic100.jpg" and rows[0].answer == "yes"
  assert rows[0].meta["closed"] and rows[0].meta["subtask"] == "vqa_closed"
  assert rows[1].answer == "right upper lobe" and not rows[1].meta["closed"]
  assert rows[2].images[0].path == "synpic102.jpg" and rows[2].answer == "2"
  assert all(s.source == "vqa_rad" and at_question_end_or_start(s) for s in samples)
  samples, errors = run("vqa_rad", FX / "vqa_rad.csv", tmp_path, strip_prefix="/elsewhere/abs/")
  assert by_row(samples)[4].images[0].path == "synpic104.jpg" and set(errors) == {3}
  # absolute paths under image_root become relative; '..' may not leave it
  src = write_csv(tmp_path / "abs.csv", ["img_root_dir", "Figure_path", "Question", "Answer"],
                  [[str(tmp_path / "imgs"), "a.png", "Q?", "no"], ["..", "b.png", "Q?", "no"]])
  samples, errors = run("slake", src, tmp_path)
  assert samples[0].images[0].path == "imgs/a.png" and "outside image_root" in errors[1].reason


def test_split_handling(tmp_path):
  samples, _ = run("vqa_rad", FX / "vqa_rad.csv", tmp_path, split="test")
  assert {s.split for s in samples} == {"test"}
  assert run("vqa_rad", FX / "vqa_rad.csv", tmp_path, split="validation")[0][0].split == "val"
  src = write_csv(tmp_path / "s.csv", ["Figure_path", "Question", "Answer", "split"],
                  [["a.png", "Q?", "no", "validation"], ["b.png", "Q?", "no", ""],
                   ["c.png", "Q?", "no", "holdout"]])
  samples, errors = run("pmc_vqa", src, tmp_path, split="test")
  assert [s.split for s in samples] == ["val", "test"] and "holdout" in errors[2].reason


# ------------------------------------------------------------------------------------------ PMC


def test_pmc_case_report():
  samples, errors = run("pmc_case_report", FX / "case_report.csv")
  assert list(errors) == [2] and "'img_ref'" in errors[2].reason
  rows = by_row(samples)
  context = ("A 40-year-old woman presented with pain. A mass was seen. It enhanced. It was resected. "
             "Pathology confirmed a schwannoma.")
  s = rows[0]
  assert s.question == context + "\nWhat did pathology show?" and s.answer == "A schwannoma."
  assert [im.path for im in s.images] == ["PMC111_F1.jpg", "PMC111_F2.jpg"]
  assert {im.char for im in s.images} <= {len(context), len(s.question)}
  assert rows[1].question == "Short history. Only two sentences.\nWhat is shown?"
  chars = {by_row(run("pmc_case_report", FX / "case_report.csv", seed=k)[0])[0].images[0].char
           for k in range(12)}
  assert chars == {len(context), len(s.question)}


def test_case_context():
  assert pmc.case_context("One. Two. Three.") == "One. Two. Three."
  text = " ".join(f"S{i}." for i in range(9))
  assert pmc.case_context(text) == "S0. S5. S6. S7. S8."


def test_pmc_oa():
  samples, errors = run("pmc_oa", FX / "pmc_oa.csv")
  assert list(errors) == [1] and len(samples) == 1
  s = samples[0]
  assert s.task == "caption" and s.question in POOLS["caption"] and s.images[0].path == "PMC1_fig1.jpg"
  assert s.answer == "Axial CT of the abdomen showing a liver lesion."


def test_pmc_inline_fixture():
  samples, errors = run("pmc_inline", FX / "pmc_inline.csv")
  assert list(errors) == [1] and "papers/PMC200.json" in errors[1].reason
  got = {s.id: s for s in samples}
  assert sorted(got) == [f"pmc_inline/pmc_inline/{w}" for w in ("0/0", "0/6", "2/1")]
  a = got["pmc_inline/pmc_inline/0/0"]
  assert a.task == "interleaved" and a.question == "" and a.meta["sentences"] == [0, 6]
  assert [im.path for im in a.images] == ["PMC100_F1.jpg", "PMC100_F2.jpg", "PMC100_F3.jpg"]
  assert all(im.field == "answer" for im in a.images)
  assert a.answer[a.images[0].char:].startswith("Figure 1 shows")
  assert a.answer[a.images[1].char:].startswith("Figures 2 and 3") and a.images[1].char == a.images[2].char
  assert a.answer.startswith("Brain tumours are common. Imaging") and a.answer.endswith("The mass shrank.")
  b = got["pmc_inline/pmc_inline/0/6"]
  assert b.images[0].path == "PMC100_F4.jpg" and b.images[0].char == 0
  c = got["pmc_inline/pmc_inline/2/1"]
  assert len(c.images) == 3 and c.meta["dropped_images"] == 1 and c.answer == "The panel shows many views."
  small, _ = run("pmc_inline", FX / "pmc_inline.csv", window=5, text_only=True)
  assert [s.meta["sentences"] for s in small if s.meta["paper"] == "PMC100"] == [[0, 5], [5, 10], [10, 12]]
  assert small[2].images == []


def test_pmc_inline_windows_cover_paper(tmp_path):
  rng = random.Random(0)
  sents = [{"text": f"Sentence {i}.", "img_ref": [f"F{i}_{k}" for k in range(rng.choice([0, 0, 0, 0, 1, 2]))]}
           for i in range(130)]
  (tmp_path / "PMC9.json").write_text(json.dumps(sents))
  src = write_csv(tmp_path / "papers.csv", ["PMC_path"], [["PMC9.json"]])
  samples, errors = run("pmc_inline", src, text_only=True)
  assert not errors
  spans = [s.meta["sentences"] for s in samples]
  assert spans[0][0] == 0 and spans[-1][1] == 130
  assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
  assert all(0 < e - b <= 50 for b, e in spans) and all(len(s.images) <= 3 for s in samples)
  assert sum(len(s.images) for s in samples) == sum(len(x["img_ref"]) for x in sents)
  for s in samples:
    for im in s.images:
      sentence = int(im.path.split("_")[1][1:])
      assert s.answer[im.char:].startswith(f"Sentence {sentence}.")
  with_images, _ = run("pmc_inline", src)
  assert [s.id for s in with_images] == [s.id for s in samples if s.images]


# ------------------------------------------------------------------------------------------ RP3D


def test_rp3d_vqa(case_root):
  samples, errors = run("rp3d_vqa", FX / "rp3d_vqa.csv", case_root)
  assert list(errors) == [2] and "cases/missing.npy" in errors[2].reason
  rows = by_row(samples)
  assert [(im.path, im.index) for im in rows[0].images] == [("cases/case1.npy", i) for i in range(3)]
  assert rows[0].meta["dim"] == "3D" and at_question_end_or_start(rows[0])
  assert [(im.path, im.index) for im in rows[1].images] == [("cases/case2.npy", None)]
  assert rows[1].answer == "yes" and rows[1].meta["closed"]
  np.save(case_root / "cases" / "big.npy", np.zeros((12, 3, 2, 2, 4), np.float16))
  np.save(case_root / "cases" / "bad.npy", np.zeros((5, 5), np.float16))
  src = write_csv(case_root / "q.csv", ["image_path", "question", "answer"],
                  [["cases/big.npy", "Q?", "A."], ["cases/bad.npy", "Q?", "A."]])
  samples, errors = run("rp3d_vqa", src, case_root)
  idx = [im.index for im in samples[0].images]
  assert len(idx) == 10 and idx == sorted(idx) and set(idx) <= set(range(12))
  assert "shape (5, 5)" in errors[1].reason


def check_yes_no_labels(samples, truth_of, field):
  """Every yes/no sample: 'yes' exactly when the named value is the true one; both answers occur."""
  answers = []
  for s in samples:
    truth = truth_of(s)
    if s.meta.get("asked") is None:
      continue
    asked = s.meta["asked"]
    assert s.question == template(s).format(**{field: asked})
    assert s.answer == ("yes" if asked == truth else "no"), (s.question, truth, s.answer)
    answers.append(s.answer)
  return answers


def test_rp3d_modality_no_branch_names_another_modality(tmp_path):
  mods = ["CT", "MRI", "X-ray", "Ultrasound"]
  src = write_csv(tmp_path / "m.csv", ["image_path", "answer"],
                  [[f"v/{i}.nii.gz", mods[i % 4]] for i in range(400)])
  samples, errors = run("rp3d_modality", src, tmp_path)
  assert not errors and len(samples) == 400
  answers = check_yes_no_labels(samples, lambda s: s.meta["modality"], "modality")
  assert 70 < answers.count("yes") < 130 and 70 < answers.count("no") < 130
  for s in samples:
    assert s.task == "modality" and s.meta["dim"] == "3D" and len(s.images) == 1
    if s.meta["subtask"] == "modality_open":
      assert s.question in POOLS["modality_open"] and s.answer == s.meta["modality"]
      assert s.meta["choices"] == sorted(mods)
  # a file with a single modality has nothing to say "no" with: never a wrong label
  src = write_csv(tmp_path / "one.csv", ["image_path", "answer"],
                  [[f"v/{i}.nii.gz", "CT"] for i in range(60)])
  answers = {s.answer for s in run("rp3d_modality", src, tmp_path)[0]}
  assert answers == {"yes", "CT"}
  forced = run("rp3d_modality", src, tmp_path, modalities=["CT", "PET"], p_yes_no=1.0)[0]
  assert {(s.meta["asked"], s.answer) for s in forced} == {("CT", "yes"), ("PET", "no")}


def test_rp3d_modality_fixture(tmp_path):
  samples, errors = run("rp3d_modality", FX / "rp3d_modality.csv", tmp_path)
  assert list(errors) == [3]
  assert [s.images[0].path for s in samples] == ["vols/a.nii.gz", "vols/b.nii.gz", "vols/c.nii.gz"]
  check_yes_no_labels(samples, lambda s: s.meta["modality"], "modality")


def test_rp3d_caption(case_root):
  samples, errors = run("rp3d_caption", FX / "rp3d_cases.json", case_root)
  assert set(errors) == {2, 3}
  assert "both findings and impression are empty" in errors[2].reason and "object" in errors[3].reason
  rows = by_row(samples)
  s = rows[0]
  patient = "Patient: 45 year old female. Presentation: headache for two weeks."
  assert s.question == f"{patient} {template(s)}" and s.meta["prompt_pool"] == "report"
  assert s.answer == ("Findings: A rim-enhancing mass in the right temporal lobe. "
                      "Impression: Likely high-grade glioma.")
  assert [im.index for im in s.images] == [0, 1, 2] and at_question_end_or_start(s)
  assert rows[1].answer == "Findings: Enlarged lateral ventricles."
  assert rows[1].question == f"Patient: 8 year old male. {template(rows[1])}"


def test_rp3d_rationale(case_root):
  samples, errors = run("rp3d_rationale", FX / "rp3d_cases.json", case_root, p_yes_no=0.0)
  assert set(errors) == {2, 3} and "'radiographic_features'" in errors[2].reason
  rows = by_row(samples)
  s = rows[0]
  assert s.meta["subtask"] == "rationale" and s.meta["prompt_pool"] == "rationale"
  assert s.task == "rationale" and s.meta["diagnosis"] == "Glioblastoma"
  assert s.question.endswith(template(s)) and s.question.startswith("Patient: 45 year old female.")
  assert s.answer == ("Diagnosis: Glioblastoma. "
                      "Radiographic features: Irregular rim enhancement. Central necrosis.")
  assert rows[1].answer == "Diagnosis: Hydrocephalus. Radiographic features: Ventricular enlargement."
  # yes/no branch: the true title -> yes, another title -> no
  cases = [{"pre": "", "pat": "", "npy_path": "cases/case1.npy", "title": f"Disease {i % 5}",
            "radiographic_features": ["f."], "articles": []} for i in range(200)]
  (case_root / "many.json").write_text(json.dumps(cases))
  samples, errors = run("rp3d_rationale", case_root / "many.json", case_root)
  assert not errors
  assert {s.task for s in samples} == {"rationale"}
  yes_no = [s for s in samples if s.meta["subtask"] == "rationale_yes_no"]
  answers = check_yes_no_labels(yes_no, lambda s: s.meta["diagnosis"], "disease")
  assert 30 < answers.count("yes") < 70 and 30 < answers.count("no") < 70
  assert 70 < len(samples) - len(yes_no) < 130


def test_deterministic_given_seed(case_root):
  for name, src in [("medpix_single", "medpix_single.csv"), ("rp3d_rationale", "rp3d_cases.json"),
                    ("pmc_case_report", "case_report.csv"), ("chestxray_binary", "binary.csv")]:
    a = list(adapters.get(name)(str(FX / src), str(case_root), seed=7))
    b = list(adapters.get(name)(str(FX / src), str(case_root), seed=7))
    assert a == b, name
  seeds = {tuple(s.question for s in run("medpix_single", FX / "medpix_single.csv", seed=k)[0])
           for k in range(5)}
  assert len(seeds) > 1


# ------------------------------------------------------------------------------------------ end to end


def test_build_cli_radfm_vqa(tmp_path):
  """`python -m radfm_jax.data.build --from=radfm`: real JPEGs, one missing image, two bad rows."""
  from PIL import Image  # noqa: PLC0415
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415
  from radfm_jax.data.store import Store  # noqa: PLC0415
  root = tmp_path / "vqarad"
  (root / "images").mkdir(parents=True)
  pixels = {}
  for i, name in enumerate(["synpic100.jpg", "synpic101.jpg"]):
    arr = (np.add.outer(np.arange(32), np.arange(48)) * 2 + 60 * i).astype(np.uint8)
    Image.fromarray(arr).save(root / "images" / name, quality=100)
    pixels[f"images/{name}"] = arr
  out = tmp_path / "store"
  cmd = [sys.executable, "-m", "radfm_jax.data.build", "--from=radfm", "--dataset=vqa_rad",
         f"--src={FX / 'vqa_rad.csv'}", f"--image_root={root}", f"--out={out}", "--split=test",
         "--workers=0", "--noprogress"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 3, proc.stdout + proc.stderr  # rows 3 and 4, and the missing synpic102.jpg
  store = Store.open(str(out))
  expected = {s.id: s for s in run("vqa_rad", FX / "vqa_rad.csv", root, split="test")[0]}
  records = store.records()
  assert sorted(r["id"] for r in records) == ["vqa_rad/vqa_rad/0", "vqa_rad/vqa_rad/1"]
  for r in records:
    s = expected[r["id"]]
    assert (r["split"], r["task"], r["question"], r["answer"]) == ("test", "vqa", s.question, s.answer)
    assert r["images"][0]["char"] == s.images[0].char and r["meta"] == s.meta
    assert r["provenance"]["images"][0]["path"] == s.images[0].path
    vol = store.read_volume(r["images"][0]["key"])
    assert vol.shape == (32, 48, 1, 1)
    assert np.abs(vol[..., 0, 0].astype(int) - pixels[s.images[0].path]).max() <= 4
  reasons = " | ".join(f["reason"] for f in store.report["failures"])
  assert "'Answer' is empty" in reasons and "synpic102.jpg" in reasons and "strip_prefix" in reasons


def test_build_radfm_rp3d_case(case_root, tmp_path):
  """An RP3D case .npy (N x 3 x H x W x D) through ingest_samples: one volume per scan index."""
  from radfm_jax.data.ingest import build  # noqa: PLC0415
  from radfm_jax.data.store import Store  # noqa: PLC0415
  scans = np.random.default_rng(0).random((3, 1, 8, 8, 4), dtype=np.float32).repeat(3, axis=1)
  np.save(case_root / "cases" / "case1.npy", scans)
  np.save(case_root / "cases" / "case2.npy", scans[1])  # a single 3 x H x W x D scan (index None)
  out = tmp_path / "store3d"
  report = build.ingest_samples(adapters.get("rp3d_caption")(str(FX / "rp3d_cases.json"), str(case_root)),
                                src_root=str(case_root), out=str(out), progress=False)
  assert report["n_records"] == 2 and report["n_failed"] == 2, report["failures"]
  store = Store.open(str(out))
  recs = {r["id"]: r for r in store.records()}
  assert [p["index"] for p in recs["rp3d_caption/rp3d_cases/1"]["provenance"]["images"]] == [None]
  rec = recs["rp3d_caption/rp3d_cases/0"]
  assert rec["task"] == "report" and rec["answer"].startswith("Findings: A rim-enhancing mass")
  keys = [im["key"] for im in rec["images"]]
  assert len(set(keys)) == 3 and [p["index"] for p in rec["provenance"]["images"]] == [0, 1, 2]
  for n, key in enumerate(keys):
    np.testing.assert_array_equal(store.read_volume(key)[..., 0], scans[n, 0])


def test_build_cli_adapter_opts(tmp_path):
  """--adapter_opts passes JSON options through to the adapter; bad JSON is a usage error naming the flag."""
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415
  from radfm_jax.data.store import Store  # noqa: PLC0415
  base = [sys.executable, "-m", "radfm_jax.data.build", "--from=radfm", "--dataset=vqa_rad",
          f"--src={FX / 'vqa_rad.csv'}", f"--image_root={tmp_path}", "--workers=0", "--noprogress"]
  proc = subprocess.run(base + [f"--out={tmp_path / 'a'}", '--adapter_opts={"dataset": "vqa_rad_v2"}'],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode > 0  # the fixture's images are absent here: every row fails, all recorded
  failures = Store.open(str(tmp_path / "a")).report["failures"]
  assert failures and all(str(f["sample"]).startswith("vqa_rad_v2/") for f in failures if f["sample"])
  proc = subprocess.run(base + [f"--out={tmp_path / 'b'}", "--adapter_opts={window: 3"],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and "--adapter_opts is not valid JSON" in proc.stderr
