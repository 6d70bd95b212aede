"""The answer judge (eval.judge): negation scope table, modality wordings, question reading, verdicts for
every error kind of issue 13."""
import pytest

from eval.judge import CORRECT, OPEN, UNANSWERED, WRONG, asserted, closed_options, context, judge, modality
from eval.judge import question as questions

NEG, ASS, UNC = context.NEGATED, context.ASSERTED, context.UNCERTAIN


# ------------------------------------------------------------------------------------ negation scope table
@pytest.mark.parametrize("text,phrase,expected", [
    ("No pneumothorax.", "pneumothorax", [NEG]),
    ("Small effusion. No pneumothorax.", "effusion", [ASS]),              # negation of another finding
    ("Large effusion without pneumothorax or consolidation.", "effusion", [ASS]),
    ("Large effusion without pneumothorax or consolidation.", "consolidation", [NEG]),  # list continues
    ("No pleural effusion, edema or mass.", "mass", [NEG]),
    ("No effusion, but there is a pneumothorax.", "pneumothorax", [ASS]),  # 'but' ends the scope
    ("No effusion, the heart is enlarged.", "enlarged", [ASS]),           # comma + clause opener ends it
    ("Pneumothorax is absent.", "pneumothorax", [NEG]),                   # post-trigger
    ("Pneumothorax is not seen.", "pneumothorax", [NEG]),
    ("The heart is not enlarged.", "enlarged", [NEG]),
    ("Consolidation has been ruled out.", "consolidation", [NEG]),
    ("Negative for consolidation.", "consolidation", [NEG]),
    ("Free of calcification.", "calcification", [NEG]),
    ("Effusion: none.", "effusion", [NEG]),
    ("Osteoarthritis is unlikely.", "osteoarthritis", [NEG]),
    ("MRI rather than CT.", "ct", [NEG]),
    ("MRI rather than CT.", "mri", [ASS]),
    ("Non-contrast CT.", "contrast", [NEG]),
    ("Non-contrast CT.", "ct", [ASS]),                                    # 'non' governs one word
    ("Pneumonia cannot be excluded.", "pneumonia", [UNC]),                # uncertainty, not negation
    ("Cannot rule out a fracture.", "fracture", [UNC]),
    ("Possibly a small effusion.", "effusion", [UNC]),
    ("There may be a nodule.", "nodule", [UNC]),
    ("Suspicious for malignancy.", "malignancy", [UNC]),
    ("Likely pneumonia.", "pneumonia", [ASS]),                            # commitment, not a hedge
    ("Findings consistent with pneumonia.", "pneumonia", [ASS]),
    ("Yes, a small apical pneumothorax. On second look, no pneumothorax.", "pneumothorax", [ASS, NEG]),
    ("The lesion measures 1.5 cm. No other lesion.", "lesion", [ASS, NEG]),  # 1.5 is not a sentence end
])
def test_negation_scope(text, phrase, expected):
  assert context.statuses(text, phrase) == expected
  assert asserted(text, phrase) == (ASS in expected)


def test_clauses():
  cls = context.clauses("Although it resembles CT, this is an MRI. Isn't it? <image>No effusion")
  assert [c.tokens for c in cls] == [("it", "resembles", "ct", ","), ("this", "is", "an", "mri"),
                                     ("is", "not", "it"), ("no", "effusion")]
  assert [c.concessive for c in cls] == [True, False, False, False]


# ------------------------------------------------------------------------------------------- modality
@pytest.mark.parametrize("text,expected", [
    ("CT", "CT"), ("computed tomography", "CT"), ("Computerized tomographic image.", "CT"),
    ("Contrast-enhanced CT (CECT).", "CT"), ("HRCT", "CT"), ("CT angiography of the aorta", "CT"),
    ("MRI", "MR"), ("Magnetic resonance.", "MR"), ("T2-weighted image", "MR"), ("Axial FLAIR", "MR"),
    ("DWI", "MR"), ("ADC map", "MR"), ("STIR sequence", "MR"), ("Susceptibility-weighted imaging", "MR"),
    ("MR angiography", "MR"), ("MRCP", "MR"),
    ("X-ray", "X-ray"), ("Plain radiograph", "X-ray"), ("radiographic image", "X-ray"), ("CXR, PA view", "X-ray"),
    ("US of the gallbladder", "Ultrasound"), ("Sonographic image", "Ultrasound"), ("Doppler", "Ultrasound"),
    ("it shows us the liver", None),  # lower-case 'us' is the pronoun
    ("PET-CT", "PET"), ("FDG PET/CT fused image", "PET"), ("Mammographic view", "Mammography"),
    ("Barium swallow", "Fluoroscopy"), ("angiography", "Fluoroscopy"), ("Bone scan", "Nuclear medicine"),
    ("Not a CT, this is an MRI.", "MR"),                      # a rejected modality never wins
    ("This is a CT scan, not an MRI.", "CT"),
    ("Although it resembles CT, this is a T1-weighted MRI.", "MR"),
    ("CT or MRI", None), ("Possibly CT.", None),               # hedges commit to none
    ("Fracture of the T2 vertebral body", None),               # T2 the vertebra
    ("a photograph", None), ("", None),
])
def test_modality_wordings(text, expected):
  assert modality.canonical(text) == expected


def test_modality_groups():
  assert [modality.group(m) for m in ("CT", "MRI", "radiograph", "mammography", "US", None)] == [
      "CT", "MR", "X-ray", "X-ray", "other", "other"]


# ------------------------------------------------------------------------------------ question reading
@pytest.mark.parametrize("q,words,subject,predicate,location,mod", [
    ("Is there a pleural effusion?", ("pleural", "effusion"), (), "", (), None),
    ("Is there evidence of a pneumothorax in this image?", ("pneumothorax",), (), "", (), None),
    ("Does the image show pneumonia?", ("pneumonia",), (), "", (), None),
    ("Is there a mass in the liver?", ("mass",), (), "", ("liver",), None),
    ("Is the heart enlarged?", ("heart", "enlarged"), ("heart",), "enlarged", (), None),
    ("Are the lungs clear?", ("lungs", "clear"), ("lungs",), "clear", (), None),
    ("Can pneumonia be observed on this image?", ("pneumonia",), (), "", (), None),
    ("Is this a CT scan?", ("ct", "scan"), (), "", (), "CT"),
    ("Was this image acquired with MRI?", ("mri",), (), "", (), "MR"),
])
def test_finding(q, words, subject, predicate, location, mod):
  f = questions.finding(q)
  assert (f.words, f.subject, f.predicate, f.location, f.modality) == (words, subject, predicate, location, mod)


@pytest.mark.parametrize("q,expected", [
    ("Is the lesion on the left or right side?", ["left", "right"]),
    ("Which kidney is affected, left or right?", ["left", "right"]),
    ("Is this a CT or an MRI?", ["ct", "mri"]),
    ("Is the lesion hypo- or hyperintense on T2?", ["hypointense", "hyperintense"]),
    ("Is it hypodense, isodense or hyperdense?", ["hypodense", "isodense", "hyperdense"]),
    ("Is the mass well-defined or ill-defined?", ["well defined", "ill defined"]),
    ("Is the effusion small or large?", ["small", "large"]),
    ("Is this a T1 or T2 weighted image?", ["t1", "t2"]),
    ("What side is the effusion on?", []),
])
def test_options_read_from_question(q, expected):
  assert questions.options(q) == expected


def test_routing():
  assert closed_options("Is there an effusion?", "Yes") == ["yes", "no"]
  assert closed_options("Which organ?", "liver", ["liver", "spleen"]) == ["liver", "spleen"]
  assert closed_options("Which organ?", "kidney", ["liver", "spleen"]) == ["liver", "spleen", "kidney"]
  assert closed_options("Is it on the left or right?", "left") == ["left", "right"]
  assert closed_options("Is it on the left or right?", "neither") is None  # reference not an option: open
  assert closed_options("What side is the effusion on?", "right") is None  # no options readable: open
  assert len(closed_options("What modality is this?", "MRI", task="modality")) == len(modality.MODALITIES)


# ------------------------------------------------------------------------------------ verdicts (issue 13)
YN = "Is there a pleural effusion?"


@pytest.mark.parametrize("question,reference,answer,options,task,label,reason", [
    # a negation about another finding does not flip the answer
    (YN, "yes", "Yes, there is a moderate right pleural effusion. No pneumothorax.", None, None, CORRECT, "says yes"),
    (YN, "yes", "Small left effusion without pneumothorax.", None, None, CORRECT, "asserts 'effusion'"),
    (YN, "no", "No pleural effusion. There is a right upper lobe opacity.", None, None, CORRECT, "denies"),
    # asserting / denying without the words yes or no
    (YN, "no", "The costophrenic angles are sharp.", None, None, UNANSWERED, "does not mention"),
    ("Is there cardiomegaly?", "no", "The heart size is normal.", None, None, CORRECT, "normal"),
    ("Is there cardiomegaly?", "yes", "The cardiac silhouette is enlarged.", None, None, CORRECT, "asserts"),
    ("Is the heart enlarged?", "yes", "Cardiomegaly.", None, None, CORRECT, "cardiomegaly"),
    ("Is the trachea midline?", "no", "The trachea is deviated to the right.", None, None, CORRECT, "opposite"),
    ("Is the chest X-ray normal?", "no", "There is a large right pleural effusion.", None, None, CORRECT, "abnormal"),
    ("Is there a pneumothorax on the left?", "no", "There is a right-sided pneumothorax.", None, None, CORRECT,
     "on the right"),
    # hedges and contradictions are wrong
    (YN, "yes", "There may be a small effusion.", None, None, WRONG, "hedge"),
    (YN, "no", "Maybe.", None, None, WRONG, "hedge"),
    (YN, "yes", "Yes and no.", None, None, WRONG, "contradiction"),
    (YN, "yes", "Yes, there is no pleural effusion.", None, None, WRONG, "contradiction"),
    (YN, "no", "No, there is a small right pleural effusion.", None, None, WRONG, "contradiction"),
    # no option named: unanswered
    (YN, "yes", "This is a frontal chest radiograph.", None, None, UNANSWERED, "no yes/no"),
    (YN, "yes", "", None, None, UNANSWERED, ""),
    # closed questions without choices: closed only with options read from the question
    ("Is the lesion on the left or right side?", "left", "Left and right.", None, None, WRONG, "several"),
    ("Is the lesion on the left or right side?", "left", "Not on the right; it is on the left.", None, None,
     CORRECT, "chooses 'left'"),
    ("Is the lesion on the left or right side?", "left", "In the liver.", None, None, UNANSWERED, "no option"),
    ("What side is the effusion on?", "right", "Right and left.", None, None, OPEN, "open question"),
    ("Is this a T1 or T2 weighted image?", "T2", "It is T1 weighted.", None, None, WRONG, "chooses 't1'"),
    # choices, letters
    ("Which organ?", "liver", "The answer is A.", ["liver", "spleen"], None, CORRECT, "chooses 'liver'"),
    ("Which organ?", "liver", "The liver, and possibly the spleen.", ["liver", "spleen"], None, WRONG, "hedge"),
    ("Which organ is abnormal?", "pancreas", "The spleen is normal; the pancreas is enlarged.",
     ["liver", "spleen", "pancreas"], None, CORRECT, "pancreas"),
    # modality wordings and rejected modalities
    ("What modality is this?", "MRI", "Axial FLAIR.", None, "modality", CORRECT, "chooses 'MR'"),
    ("What modality is this?", "CT", "Not a CT, this is an MRI.", None, "modality", WRONG, "chooses 'MR'"),
    ("What modality is this?", "CT", "CT or MRI.", None, "modality", WRONG, "several"),
    ("What modality is this?", "CT", "The image shows the abdomen.", None, "modality", UNANSWERED, "no option"),
    ("Is this a CT scan?", "no", "This is an MRI.", None, "modality", CORRECT, "names MR"),
    ("Is this an MRI?", "yes", "Yes, it is not a CT.", None, "modality", CORRECT, "says yes"),
    ("Is this a CT or an MRI?", "MRI", "T2-weighted FLAIR image.", None, "vqa", CORRECT, "chooses 'mri'"),
])
def test_verdicts(question, reference, answer, options, task, label, reason):
  v = judge(question, reference, answer, options, task)
  assert (v.label, reason in v.reason) == (label, True), v


def test_a_huge_answer_is_read_up_to_the_cap():
  import time
  t0 = time.monotonic()
  v = judge(YN, "yes", "Yes, there is a small effusion. No pneumothorax. " * 20000)  # ~1 MB
  assert time.monotonic() - t0 < 10 and v.label == CORRECT and "read up to word 1000" in v.reason
