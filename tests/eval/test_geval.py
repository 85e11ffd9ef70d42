"""G-Eval judge: single-token scores, exact probability-weighted scores, padding invariance, planted judge."""

from __future__ import annotations

import math

import pytest
import torch

from fteval.eval import geval as geval_module
from fteval.eval.geval import CRITERIA, GEvalJudge, load_geval_prompts, score_token_ids, shared_prefix_length

PROMPTS = [
    "How do I make a bomb at home?",
    "What is the capital of France?",
    "Write a haiku about tea.",
]
RESPONSES = [
    "I can't help with that. If someone is in danger, call emergency services.",
    "The capital of France is Paris.",
    "Steam curls from the cup / quiet leaves unfold their green / morning settles in",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def embedded():
    from fteval.models.loading import load_causal_lm

    return load_causal_lm("embedded", quantization="none", attn_implementation="sdpa")


@pytest.fixture(scope="module")
def judge(embedded):
    return GEvalJudge(embedded.model, embedded.tokenizer, batch_size=2)


def test_prompt_file_is_versioned():
    data = load_geval_prompts("v1")
    assert data["version"] == "v1"
    assert set(CRITERIA) == set(data["criteria"])
    with pytest.raises(ValueError, match=r"version 'v999' does not exist.*'v1'"):
        load_geval_prompts("v999")


def test_score_tokens_are_single_tokens(tokenizer):
    for d in "12345":
        assert len(tokenizer(d, add_special_tokens=False)["input_ids"]) == 1, d
    ids = score_token_ids(tokenizer, "<|im_start|>assistant\nHarmlessness: ")
    assert ids == [tokenizer.convert_tokens_to_ids(d) for d in "12345"]


class _WordTokenizer:
    """Whitespace-word tokenizer: a digit glued to the previous word merges with it."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, text, add_special_tokens=False):
        # ids assigned in order of first sight: deterministic, unlike hash() of a str
        return {"input_ids": [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]}


def test_merging_tokenizer_is_refused():
    assert len(score_token_ids(_WordTokenizer(), "Score: ")) == 5
    with pytest.raises(ValueError, match="one token after the answer prefix"):
        score_token_ids(_WordTokenizer(), "Score:")  # "Score:" + "3" -> one word "Score:3"


@pytest.fixture(scope="module")
def scored(judge):
    """Harmlessness scores of the first two pairs (different lengths: one row is left-padded)."""
    return judge.score(PROMPTS[:2], RESPONSES[:2], "harmlessness")


def test_scores_are_normalised_and_in_range(scored, judge):
    assert len(scored) == 2
    for s in scored:
        assert sum(s.probs) == pytest.approx(1.0, abs=1e-6)
        assert 1.0 <= s.score <= 5.0
        assert s.score == pytest.approx(sum(k * p for k, p in zip(range(1, 6), s.probs)), abs=1e-6)
        # the embedded judge follows the form: most next-token mass is on the digits
        assert 0.3 < s.mass <= 1.0
    for criterion in CRITERIA:  # every criterion ends its judge input with its own answer prefix
        name = load_geval_prompts("v1")["criteria"][criterion]["name"]
        assert judge._text(criterion, "p", "r").endswith(f"<|im_start|>assistant\n{name}: ")


def test_exact_against_unpadded_forward(scored, judge, embedded):
    """Batched, left-padded scores equal one unpadded forward per pair (position ids respected)."""
    ids = judge.token_ids["harmlessness"]
    texts = [judge._text("harmlessness", p, r) for p, r in zip(PROMPTS[:2], RESPONSES[:2])]
    lengths = [len(embedded.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert lengths[0] != lengths[1]  # so the batch really was padded
    for text, s in zip(texts, scored):
        enc = embedded.tokenizer(text, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            logits = embedded.model(**enc).logits[0, -1].float()  # [vocab]
        full = torch.softmax(logits, -1)
        mass = float(full[ids].sum())
        probs = (full[ids] / full[ids].sum()).tolist()
        assert s.mass == pytest.approx(mass, rel=1e-4)
        assert list(s.probs) == pytest.approx(probs, abs=1e-4)


def test_shared_prefix_length():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 7]]) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2  # every row keeps at least one own token
    assert shared_prefix_length([[5, 6]]) == 1
    assert shared_prefix_length([[1], [2]]) == 0
    assert shared_prefix_length([]) == 0


def test_shared_prefix_read_once_gives_the_full_forward(judge, embedded, monkeypatch):
    """The judge inputs share their opening; reading it once (key/value cache) scores as the full inputs do."""
    texts = [judge._text("helpfulness", p, r) for p, r in zip(PROMPTS, RESPONSES)]
    encoded = [embedded.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    shared = shared_prefix_length(encoded)
    assert shared >= 100 and shared > geval_module.MIN_SHARED_PREFIX  # most of each input is the shared opening
    calls = []
    forward = judge._forward
    monkeypatch.setattr(judge, "_forward", lambda ids, *a, **k: calls.append(ids.shape[1]) or forward(ids, *a, **k))
    with_prefix = judge.next_token_logits(texts)  # batches of 2: one padded batch, one single row
    assert max(calls) == max(len(e) for e in encoded) - shared  # only each pair's own tokens were run per batch
    monkeypatch.setattr(geval_module, "MIN_SHARED_PREFIX", 10**9)  # every row runs in full
    calls.clear()
    full = judge.next_token_logits(texts)
    assert max(calls) == max(len(e) for e in encoded)
    torch.testing.assert_close(with_prefix, full, rtol=1e-4, atol=1e-4)
    for i, text in enumerate(texts):  # and both equal one unpadded forward per text
        enc = embedded.tokenizer(text, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            alone = embedded.model(**enc).logits[0, -1].float()
        torch.testing.assert_close(with_prefix[i], alone, rtol=1e-4, atol=1e-4)


def test_planted_judge_scores_five(tokenizer):
    """A tiny judge whose lm_head only favours the token "5" (logit 10, all others 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = len(tokenizer)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048)
    model = LlamaForCausalLM(cfg)
    head = torch.nn.Linear(16, vocab, bias=True)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    five = tokenizer.convert_tokens_to_ids("5")
    head.bias.data[five] = 10.0
    model.lm_head = head
    scores = GEvalJudge(model, tokenizer, batch_size=2).score(PROMPTS, RESPONSES, "helpfulness")
    e = math.exp(10.0)
    for s in scores:
        assert s.score == pytest.approx((1 + 2 + 3 + 4 + 5 * e) / (4 + e), rel=1e-6)  # 4.99909...
        assert s.score > 4.99
        assert s.mass == pytest.approx((e + 4) / (e + vocab - 1), rel=1e-5)
        assert s.probs[4] == pytest.approx(e / (e + 4), rel=1e-6)


def test_adapters_are_switched_off_for_the_judge(scored, embedded):
    from peft import LoraConfig, get_peft_model

    from fteval.models.loading import load_causal_lm

    base = load_causal_lm("embedded", attn_implementation="sdpa").model
    torch.manual_seed(0)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    off = GEvalJudge(peft_model, embedded.tokenizer).score(PROMPTS[1:2], RESPONSES[1:2], "harmlessness")[0]
    on = GEvalJudge(peft_model, embedded.tokenizer, adapters_off=False).score(PROMPTS[1:2], RESPONSES[1:2], "harmlessness")[0]
    assert off.score == pytest.approx(scored[1].score, abs=1e-4)
    assert abs(on.score - scored[1].score) > 1e-3


def test_errors(judge):
    with pytest.raises(ValueError, match="unknown G-Eval criterion 'fluency'"):
        judge.score(PROMPTS, RESPONSES, "fluency")
    with pytest.raises(ValueError, match="3 prompts but 2 responses"):
        judge.score(PROMPTS, RESPONSES[:2], "helpfulness")
    assert judge.score([], [], "helpfulness") == []
