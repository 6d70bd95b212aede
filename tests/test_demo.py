"""Demo dataset: built through files mode, deterministic, balanced, and its labels match its pixels."""
import collections
import json
import os

import numpy as np
import pytest

from radfm_jax.data import demo
from radfm_jax.data.demo import phantoms
from radfm_jax.data.store import Store

N = 54   # 44 train / 5 val / 5 test phantoms, two samples each


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("demo"))
  report = demo.make_demo(out, n=N, seed=3, workers=2)
  return out, report, Store.open(os.path.join(out, "store"))


def test_builds_through_files_mode_with_all_tasks_and_splits(built):
  out, report, store = built
  assert report["n_failed"] == 0 and report["n_records"] == 2 * N and report["volumes"]["written"] == N
  assert store.info["counts"]["by_split"] == {"test": 10, "train": 88, "val": 10}
  assert set(store.info["counts"]["by_task"]) == {"modality", "diagnosis", "vqa", "report", "rationale"}
  subtasks = {r["meta"]["subtask"] for r in store.records()}
  assert subtasks == set(demo.CLOSED) | set(demo.OPEN)
  for r in store.records():
    assert r["meta"]["image_dependent"] and r["meta"]["modality"] in phantoms.MODALITIES
    assert r["meta"]["dim"] == ("2D" if r["meta"]["modality"] == "X-ray" else "3D")
    if r["meta"]["closed"]:
      assert r["answer"] in r["meta"]["choices"]
  reports = store.records(task="report")
  assert reports and all(r["answer"].startswith("Findings: ") and " Impression: " in r["answer"] for r in reports)
  assert all(r["answer"].startswith("Diagnosis: ") for r in store.records(task="rationale"))
  files = sorted(os.listdir(os.path.join(out, "images", "train")))
  assert any(f.endswith(".nii.gz") for f in files) and any(f.endswith(".png") for f in files)


def test_deterministic_given_seed(built, tmp_path):
  out, _, store = built
  demo.make_demo(str(tmp_path), n=N, seed=3, workers=0)
  again = Store.open(str(tmp_path / "store"))
  assert again.records() == store.records()       # same text, same content keys
  with open(os.path.join(out, "text.jsonl")) as a, open(tmp_path / "text.jsonl") as b:
    assert a.read() == b.read()
  other = demo.write_dataset(str(tmp_path / "seed4"), n=N, seed=4)
  with open(other) as f, open(tmp_path / "text.jsonl") as g:
    assert f.read() != g.read()


def test_closed_templates_are_balanced():
  """For every image-dependent closed template and each of its slot values, within every split of a
  540-phantom dataset, the answers are uniform to within one: the question cannot predict the answer."""
  for count in demo.split_sizes(540).values():
    answers = collections.defaultdict(collections.Counter)
    for j in range(count):
      kind = demo.CLOSED[j % len(demo.CLOSED)]
      kind_cells = demo.cells(kind)
      cell = kind_cells[(j // len(demo.CLOSED)) % len(kind_cells)]
      ph, sample = demo.closed_sample(kind, cell, np.random.default_rng(j))
      answers[(kind, sample["question"])][sample["answer"]] += 1
      assert sample["answer"] in sample["meta"]["choices"] or kind == "diagnosis_multilabel"
    for (kind, question), counter in answers.items():
      possible = {c[-1] for c in demo.cells(kind)} if kind != "diagnosis_multilabel" else None
      values = list(counter.values())
      if possible is not None:
        values += [0] * (len(possible) - len(counter))
      assert max(values) - min(values) <= 1, (kind, question, counter)
    assert len(answers) >= len(demo.CLOSED)


def test_balance_holds_in_the_built_text(built):
  out, _, _ = built
  with open(os.path.join(out, "text.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  for split in ("train", "val", "test"):
    per = collections.defaultdict(collections.Counter)
    for r in rows:
      if r["split"] == split and r["meta"]["subtask"] in ("modality_yesno", "diagnosis_yesno", "vqa_side_yesno"):
        per[r["meta"]["subtask"]][r["answer"]] += 1
    for kind, counter in per.items():
      assert abs(counter["yes"] - counter["no"]) <= 1, (split, kind, counter)


def _mean(vol, center, radius):
  grid = np.meshgrid(*[np.arange(s) for s in vol.shape], indexing="ij")
  mask = sum(((g - c) / max(r * 0.7, 1)) ** 2 for g, c, r in zip(grid, center, radius)) <= 1
  return float(vol[mask].mean())


def test_labels_match_pixels(built):
  """Each round lesion differs strongly from the mirror-image spot on the other side, in the direction
  its finding says; effusions make the lower lung of their side denser than the other side."""
  _, _, store = built
  checked = collections.Counter()
  for r in store.records():
    if r["meta"]["subtask"] not in demo.CLOSED:
      continue
    vol = store.read_volume(r["images"][0]["key"])[..., 0].astype(np.float32)
    vol = vol[..., 0] if vol.shape[2] == 1 else vol
    width = vol.shape[1]
    lesions = r["meta"]["lesions"]
    for les in lesions:
      if les["finding"] == "effusion":
        continue
      c = les["center"]
      assert (c[1] > width / 2) == (les["side"] == "left")        # patient left = larger W
      if any(o["side"] != les["side"] and o["region"] == les["region"] for o in lesions):
        continue                                                  # the mirror spot holds a lesion too
      mirror = [c[0], width - 1 - c[1]] + c[2:]
      inside, outside = _mean(vol, c, les["radius"]), _mean(vol, mirror, les["radius"])
      if les["finding"] == "hemorrhage":
        assert inside < outside - 200, (r["id"], les, inside, outside)
      else:
        assert inside > outside + 50, (r["id"], les, inside, outside)
      checked[les["finding"]] += 1
  assert checked["nodule"] > 5 and checked["tumor"] + checked["hemorrhage"] > 3
  # sizes: a large lesion's radius is larger, region follows the axis convention
  for r in store.records():
    for les in r["meta"]["lesions"]:
      if les["finding"] in phantoms.ROUND:
        small, large = (5.0, 9.0) if len(les["center"]) == 3 else (6.0, 10.0)
        assert les["radius"][0] == (small if les["size"] == "small" else large)
        if len(les["center"]) == 3:
          assert (les["center"][2] >= 12) == (les["region"] == "upper")   # D increases to superior
        else:
          assert (les["center"][0] < 58) == (les["region"] == "upper")    # top of the film


def test_counts_match_lesions(built):
  _, _, store = built
  for r in store.records(task="vqa"):
    if r["meta"]["subtask"] == "vqa_count":
      finding = {v: k for k, v in demo.PLURALS.items()}[r["question"].split("How many ")[1].split(" are")[0]]
      n = sum(les["finding"] == finding for les in r["meta"]["lesions"])
      assert demo.COUNTS[n] == r["answer"]
