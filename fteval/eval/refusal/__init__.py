"""Refusal detection: full refusal, partial refusal or compliance, by a fitted rule detector or a model judge.

* :mod:`.features`: cue families and content measures of a response;
* :mod:`.lexicon`: cues in other languages, impersonal and guard-model refusals, chat-template clean-up;
* :mod:`.detector`: the fitted weights (plain JSON) and :func:`classify_refusal`;
* :mod:`.fit`: refits the weights on the development set (``python -m fteval.eval.refusal.fit``);
* :mod:`.compose`: composes the development set's second part (``python -m fteval.eval.refusal.compose.build``);
* :mod:`.judges`: ``rules`` / ``openai`` / ``hf`` judges behind one interface;
* :mod:`.agreement`: accuracy, kappa, precision/recall and confusion matrices against reference labels;
* :mod:`.rates`: refusal and over-refusal rates with exact (Clopper-Pearson) intervals;
* :mod:`.command`: ``fteval classify-refusals``.
"""

from fteval.eval.refusal.command import classify_refusals
from fteval.eval.refusal.detector import COMPLY, FULL, LABELS, PARTIAL, RefusalResult, classify_refusal
from fteval.eval.refusal.judges import HFJudge, OpenAIJudge, RefusalJudge, RulesJudge, make_judge
from fteval.eval.refusal.rates import refusal_rates

__all__ = [
    "COMPLY",
    "FULL",
    "HFJudge",
    "LABELS",
    "OpenAIJudge",
    "PARTIAL",
    "RefusalJudge",
    "RefusalResult",
    "RulesJudge",
    "classify_refusal",
    "classify_refusals",
    "make_judge",
    "refusal_rates",
]
