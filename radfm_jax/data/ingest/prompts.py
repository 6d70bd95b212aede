"""Prompt pools per task, in our own wording, and a seeded picker.

The RadFM data adapters (`radfm_jax.data.ingest.adapters`) turn label-only rows (a report, a modality name, a
disease label) into question/answer samples by drawing a question from one of these pools. Pool sizes
follow the published setup (report 20, caption 15, classification 11, yes/no 14, modality 5 open +
3 yes/no, rationale 10); the MedPix case pools cover the extra MedPix task types. Templates with a
placeholder (`{disease}`, `{modality}`, `{plane}`) are filled by `pick`.

Every draw records its pool and index (`Prompt.pool`, `Prompt.index`) so a sample's prompt can be traced
and ablated later.
"""
from __future__ import annotations

import dataclasses
import random
import string

POOLS: dict[str, tuple[str, ...]] = {
    # Report generation (chest X-ray reports, RP3D case reports).
    "report": (
        "Write a radiology report for this study.",
        "Draft the findings and impression for these images.",
        "Please produce a structured report describing this examination.",
        "Report on this imaging study, listing findings and an impression.",
        "What does this study show? Answer in the form of a radiology report.",
        "Compose a concise radiology report for the scan.",
        "Describe the findings of this examination and give your impression.",
        "Act as the reading radiologist and report this study.",
        "Generate the report that would accompany these images.",
        "Summarise the imaging findings and conclude with an impression.",
        "Provide a findings section and an impression section for this exam.",
        "Interpret this study and write up the report.",
        "Review the images and dictate a report.",
        "Give a full radiological description of this examination.",
        "What are the findings, and what is your overall impression?",
        "Prepare a diagnostic report based on the images provided.",
        "Read this examination and report what you observe.",
        "Write the findings and impression you would send to the referring clinician.",
        "Produce a radiology report, noting both normal and abnormal findings.",
        "Report this imaging examination in the usual findings and impression format.",
    ),
    # Captioning (PMC-OA figures, MedPix single images).
    "caption": (
        "Write a caption for this figure.",
        "Describe what this image shows.",
        "Give a short description of the image.",
        "What is depicted in this medical image?",
        "Provide a caption suitable for a journal figure.",
        "Summarise the content of this image in a few sentences.",
        "Explain what can be seen in this picture.",
        "Caption this medical figure.",
        "How would you describe this image to a colleague?",
        "Write a brief legend for this image.",
        "What does this figure illustrate?",
        "Describe the key visual content of this image.",
        "Give a one-paragraph description of this figure.",
        "State what this image demonstrates.",
        "Provide a descriptive caption for this image.",
    ),
    # Multi-label classification (CXR, PCXR, mammography, spine X-ray sets).
    "classification": (
        "Which abnormalities are present in this image?",
        "List the findings visible on this radiograph.",
        "What conditions can be identified in this image? List all that apply.",
        "Name every abnormality you can detect.",
        "Classify this image: which diseases or findings are present?",
        "What diagnoses does this image support? Give all of them.",
        "Identify the pathologies shown in this image.",
        "Which labels apply to this image?",
        "What is abnormal in this image, if anything?",
        "Enumerate the findings present in this study.",
        "Which diseases are visible here?",
    ),
    # Binary diagnosis; answer "yes" or "no".
    "yes_no": (
        "Is there evidence of {disease} in this image?",
        "Does this image show {disease}?",
        "Can {disease} be seen here?",
        "Is {disease} present?",
        "Does the patient have {disease} according to this image?",
        "Are there signs of {disease}?",
        "Would you diagnose {disease} from this image?",
        "Is this image consistent with {disease}?",
        "Do the findings indicate {disease}?",
        "Is {disease} visible on this scan?",
        "Answer yes or no: is there {disease}?",
        "Does this study demonstrate {disease}?",
        "Based on the image, is {disease} present?",
        "Is {disease} depicted in this image?",
    ),
    "modality_open": (
        "Which imaging modality was used for this scan?",
        "What kind of scan is this?",
        "Name the modality of this image.",
        "Which imaging technique produced this image?",
        "What is the imaging modality here?",
    ),
    "modality_yes_no": (
        "Is this a {modality} scan?",
        "Was this image acquired with {modality}?",
        "Is the modality of this image {modality}?",
    ),
    "plane_open": (
        "In which plane was this image taken?",
        "What is the orientation of this image?",
        "Which view does this image show?",
        "Name the imaging plane of this picture.",
        "From which direction was this image acquired?",
        "What plane is this slice in?",
    ),
    "plane_yes_no": (
        "Is this image shown in the {plane} plane?",
        "Was this image taken in a {plane} view?",
        "Is the orientation of this image {plane}?",
        "Does this picture show a {plane} view?",
    ),
    # Rationale diagnosis (RP3D): diagnosis plus the imaging features that support it.
    "rationale": (
        "What is the most likely diagnosis, and which imaging features support it?",
        "Diagnose this case and describe the radiographic features behind your diagnosis.",
        "Give a diagnosis and explain the imaging findings that lead to it.",
        "What disease does this patient have? Justify it with the features on the scans.",
        "Make a diagnosis and summarise the characteristic radiological signs.",
        "Which condition is shown, and what features on the images point to it?",
        "Provide your diagnosis along with the supporting imaging evidence.",
        "Identify the disease and describe its appearance on these scans.",
        "What is your diagnosis? Describe the radiographic features you rely on.",
        "State the diagnosis and the key imaging characteristics of this case.",
    ),
    # MedPix multi-image cases, one pool per case section.
    "case_findings": (
        "Describe the imaging findings in this case.",
        "What do these images show?",
        "Summarise the findings of this patient's studies.",
        "Write up the findings for this case.",
        "What are the notable observations on these images?",
        "Give an account of what is seen in this case.",
    ),
    "case_diagnosis": (
        "What is the diagnosis in this case?",
        "Which disease do these images indicate?",
        "What condition does this patient most likely have?",
        "Give the diagnosis suggested by these studies.",
        "Name the disease shown in this case.",
        "Based on the images, what is the patient's diagnosis?",
    ),
    "case_differential": (
        "What is the differential diagnosis for this case?",
        "Which conditions should be considered given these images?",
        "List the differential diagnoses for these findings.",
        "What else could explain the appearance on these images?",
        "Give a differential for this patient's imaging.",
    ),
    "case_exam": (
        "Summarise the examination results for this patient.",
        "What did the clinical examination and tests show?",
        "Describe the patient's exam findings.",
        "What are the key results of this patient's work-up?",
        "Report the examination findings for this case.",
    ),
    "case_discussion": (
        "Discuss this case.",
        "What background knowledge helps to interpret this case?",
        "Explain the condition shown in this case in more depth.",
        "Which imaging patterns are typical of this disease?",
        "Give a short teaching discussion of this case.",
    ),
    "case_treatment": (
        "How should this patient be treated and followed up?",
        "What management would you recommend for this case?",
        "What are the treatment options for this patient?",
        "Describe the appropriate treatment and follow-up.",
        "What is the recommended course of care here?",
    ),
    "case_imaging": (
        "Which imaging studies were used to make this diagnosis?",
        "What imaging techniques appear in this case?",
        "Name the imaging examinations shown here.",
        "How was this diagnosis established by imaging?",
        "Which modalities were used to image this patient?",
    ),
}


@dataclasses.dataclass(frozen=True)
class Prompt:
  text: str
  pool: str
  index: int

  def meta(self) -> dict[str, str | int]:
    """The provenance keys stored in a sample's meta."""
    return {"prompt_pool": self.pool, "prompt_index": self.index}


def placeholders(template: str) -> set[str]:
  """Names of the `{name}` fields in a template."""
  return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def pool_fields(pool: str) -> set[str]:
  """The placeholder names every template of `pool` takes."""
  return placeholders(get(pool)[0])


def get(pool: str) -> tuple[str, ...]:
  try:
    return POOLS[pool]
  except KeyError:
    raise KeyError(f"unknown prompt pool {pool!r}; known: {sorted(POOLS)}") from None


def pick(pool: str, rng: random.Random, **values: str) -> Prompt:
  """Draws one template of `pool` with `rng` and fills its placeholders from `values`."""
  templates = get(pool)
  missing = pool_fields(pool) - set(values)
  if missing:
    raise ValueError(f"prompt pool {pool!r} needs values for {sorted(missing)}")
  index = rng.randrange(len(templates))
  return Prompt(templates[index].format(**values), pool, index)
