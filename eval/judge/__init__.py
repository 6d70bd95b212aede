"""The answer judge: closed answers read the way a careful radiologist reads them.

  from eval.judge import judge
  judge("Is there a pleural effusion?", "yes", "Small left effusion. No pneumothorax.")
  -> Verdict(label='correct', reason="asserts 'effusion' (expected yes)", chosen='yes', kind='yes_no')

Modules: `context` (clauses, negation / uncertainty scope), `modality` (modality wordings),
`question` (the asked finding, options written in the question), `findings` (finding concepts,
synonyms, implicit denial), `verdict` (routing and the verdict).
"""
from eval.judge.context import asserted, statuses
from eval.judge.verdict import CORRECT, LABELS, OPEN, UNANSWERED, WRONG, Verdict, closed_options, judge

__all__ = ["CORRECT", "LABELS", "OPEN", "UNANSWERED", "WRONG", "Verdict", "asserted", "closed_options", "judge",
           "statuses"]
