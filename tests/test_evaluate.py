"""Perplexity and lm-eval-style zero-shot scoring in spinquant.evaluation.scoring."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from conftest import byte_tokenizer

from spinquant.errors import SpinQuantError
from spinquant.evaluation import scoring as evaluate
from spinquant.evaluation.data import shared_data_dir
from spinquant.evaluation.scoring import MCItem, encode_pair, load_task, loglikelihoods, perplexity, zero_shot

VOCAB = 260


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return transformers.LlamaForCausalLM(config).eval()


class BiasModel(torch.nn.Module):
    """Ignores its input and predicts the same next-token distribution everywhere."""

    def __init__(self, bias: torch.Tensor) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(bias.float())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(*input_ids.shape, -1)


@pytest.fixture
def shared():
    if shared_data_dir() is None:
        pytest.skip(
            "shared data folder not found (set SPINQUANT_DATA_DIR or put shared/data beside the repo)"
        )


# -- perplexity -------------------------------------------------------------------------------------------


def test_perplexity_equals_hf_loss(llama):
    ids = torch.randint(0, VOCAB, (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hf = math.exp(llama(ids, labels=ids).loss.item())
    assert perplexity(llama, ids, progress=False) == pytest.approx(hf, rel=1e-4)


def test_perplexity_combines_uneven_batches(llama):
    windows = torch.randint(0, VOCAB, (3, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        losses = [llama(w[None], labels=w[None]).loss.item() for w in windows]
    expected = math.exp(sum(losses) / len(losses))  # equal-length windows: mean of means is the mean
    one = perplexity(llama, windows, batch_size=1, progress=False)
    two = perplexity(llama, windows, batch_size=2, progress=False)  # batches of 2 and 1
    assert one == pytest.approx(two, rel=1e-5)
    assert one == pytest.approx(expected, rel=1e-4)


def test_perplexity_restores_training_mode(llama):
    llama.train()
    try:
        perplexity(llama, torch.zeros(1, 8, dtype=torch.long), progress=False)
        assert llama.training
    finally:
        llama.eval()


def test_perplexity_nan_logits_raise():
    bias = torch.zeros(VOCAB)
    bias[3] = float("nan")
    with pytest.raises(
        SpinQuantError, match=r"not finite \(nan/inf\): the quantized model diverged; try more"
    ):
        perplexity(BiasModel(bias), torch.zeros(2, 8, dtype=torch.long), progress=False)


def test_perplexity_uniform_model_is_vocab_size():
    assert perplexity(BiasModel(torch.zeros(VOCAB)), torch.ones(2, 9, dtype=torch.long), progress=False) == (
        pytest.approx(VOCAB, rel=1e-6)
    )


def test_perplexity_rejects_bad_windows():
    with pytest.raises(SpinQuantError, match="windows shaped"):
        perplexity(BiasModel(torch.zeros(VOCAB)), torch.zeros(8, dtype=torch.long))


# -- log-likelihood scoring -------------------------------------------------------------------------------


def test_encode_pair_moves_trailing_space(tok):
    ctx, cont = encode_pair(tok, "Answer: ", "yes")
    assert ctx == tok.encode("Answer:", add_special_tokens=False)
    assert cont == tok.encode(" yes", add_special_tokens=False)


def test_loglikelihood_matches_direct_computation(llama, tok):
    context, continuation = "Question: Is the sky blue?\nAnswer:", " yes, mostly"
    ctx = tok.encode(context, add_special_tokens=False)
    cont = tok.encode(continuation, add_special_tokens=False)
    with torch.no_grad():
        logprobs = llama(torch.tensor([ctx + cont])).logits[0].float().log_softmax(-1)
    direct = sum(logprobs[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont))

    requests = [(context, continuation), ("Q: short\nA:", " no"), (context, " a much longer answer here")]
    batched = loglikelihoods(llama, tok, requests, batch_size=3, progress=False)
    single = loglikelihoods(llama, tok, requests, batch_size=1, progress=False)
    assert batched[0] == pytest.approx(direct, rel=1e-5)
    assert batched == pytest.approx(single, rel=1e-5)  # right padding does not change any score


def _toy_task(monkeypatch, items):
    monkeypatch.setitem(evaluate.TASK_LOADERS, "toy", lambda: items)


def test_model_biased_to_gold_scores_perfectly(monkeypatch, tok):
    items = [
        MCItem("Pick one:", ["aaa", "bbb", "ccc"], 0),
        MCItem("Pick one:", ["bbb", "aaa"], 1),
        MCItem("Pick again:", ["ccc", "bbb", "aaa", "ddd"], 2),
    ]
    _toy_task(monkeypatch, items)
    bias = torch.zeros(VOCAB)
    bias[tok.encode("a", add_special_tokens=False)[0]] = 8.0
    result = zero_shot(BiasModel(bias), tok, ["toy"], batch_size=4, progress=False)
    assert result == {"toy": {"acc": 1.0, "acc_norm": 1.0, "n": 3}}


def test_acc_norm_divides_by_characters(monkeypatch, tok):
    # Under a uniform model every token costs log(V): " x" costs 2, " xxxxxx" costs 7. acc prefers the short
    # answer; per character (2/1 vs 7/6) the long one wins.
    _toy_task(monkeypatch, [MCItem("Q:", ["x", "xxxxxx"], 1)])
    result = zero_shot(BiasModel(torch.zeros(VOCAB)), tok, ["toy"], progress=False)
    assert result["toy"]["acc"] == 0.0 and result["toy"]["acc_norm"] == 1.0


def test_limit_keeps_first_items(monkeypatch):
    _toy_task(monkeypatch, [MCItem(str(i), ["a", "b"], 0) for i in range(5)])
    assert [item.context for item in load_task("toy", limit=2)] == ["0", "1"]
    with pytest.raises(SpinQuantError, match="limit must be positive"):
        load_task("toy", limit=0)


def test_unknown_task_lists_local_tasks(tok):
    with pytest.raises(
        SpinQuantError, match="unknown task 'mmlu'; the local tasks are: piqa, arc_easy, hellaswag"
    ):
        zero_shot(BiasModel(torch.zeros(VOCAB)), tok, ["piqa", "mmlu"], progress=False)


# -- local task files -------------------------------------------------------------------------------------


@pytest.mark.usefixtures("shared")
@pytest.mark.parametrize(
    "name, count, n_choices", [("piqa", 1838, {2}), ("arc_easy", 2376, {3, 4}), ("hellaswag", 10042, {4})]
)
def test_task_loaders_parse_local_files(name, count, n_choices):
    items = load_task(name)
    assert len(items) == count
    assert {len(item.choices) for item in items} <= n_choices
    assert all(0 <= item.gold < len(item.choices) for item in items)
    # Choices are kept as lm-eval sees them (piqa's stray trailing spaces included), never blank.
    assert all(item.context and all(c.strip() for c in item.choices) for item in items)


@pytest.mark.usefixtures("shared")
def test_task_prompt_formats():
    piqa = load_task("piqa", limit=2)
    assert piqa[0].context == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert piqa[0].gold == 0 and piqa[1].gold == 1
    arc = load_task("arc_easy", limit=1)[0]
    assert arc.context.startswith("Question: Which statement") and arc.context.endswith("?\nAnswer:")
    hella = load_task("hellaswag", limit=2)
    # lm-eval builds "{activity}: {ctx_a} {ctx_b.capitalize()}"; the local file has ctx_b in lower case.
    assert hella[0].context == "Roof shingle removal: A man is sitting on a roof. He"
    assert hella[0].choices[3] == "starts pulling up roofing on a roof." and hella[0].gold == 3
    assert hella[1].context.endswith("She bends down and grabs the pole. The lady")


@pytest.mark.usefixtures("shared")
def test_zero_shot_end_to_end_on_piqa(llama, tok):
    result = zero_shot(llama, tok, ["piqa", "arc_easy"], limit=3, batch_size=4, progress=False)
    assert set(result) == {"piqa", "arc_easy"}
    for metrics in result.values():
        assert metrics["n"] == 3
        assert 0.0 <= metrics["acc"] <= 1.0 and 0.0 <= metrics["acc_norm"] <= 1.0
