"""Rank classification (pha_core.scoring): scores are the decoder's own sequence log-likelihoods, each token's
normalised among the words the candidates put after its prefix."""

import pytest
import torch

from pha_core import scoring
from pha_core.collate import collate
from pha_core.evaluate import predict_examples
from pha_core.inference import Engine
from pha_core.model import PHAModel
from pha_core.scoring import STSB_BINS, AnswerSpace, answer, candidate_ids, label_log_likelihoods, rank
from pha_core.tasks import Example
from tests.support.tiny import tiny_config

EXAMPLES = [
    Example("sentence: a fine film", "positive", "sst2"),
    Example("sentence1: a cat sat. sentence2: a cat was sitting.", "entailment", "rte"),
    Example("premise: it rains. hypothesis: the street is dry.", "contradiction", "mnli"),
]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return PHAModel(tiny_config(tasks=["sst2", "rte", "mnli", "stsb"])).eval()


def _encoded(model, examples):
    index = {t: i for i, t in enumerate(model.tasks)}
    batch = collate(model.backbone, examples, index, 64, 8, by_field=model.config.by_field)
    hidden, mask = model.encode(batch.source)
    return batch, hidden, mask


def _teacher_forced(model, ex, word, hidden, mask, adapters, candidates) -> float:
    """The reference score: one teacher-forced pass of the full decoder (`decode`, the whole output layer), each
    token's log-probability taken among the words that the candidates sharing its prefix put next."""
    ids = model.backbone.target_ids(word)
    one = collate(model.backbone, [Example(ex.input, word, ex.task)], {ex.task: 0}, 64, 8)
    with model.decoder_context.use(adapters):
        logits, _ = model.backbone.decode(one.decoder_input_ids, hidden, mask)
    total = 0.0
    for t, token in enumerate(ids):
        after = sorted({c[t] for c in candidates if c[:t] == ids[:t]})
        total += float(logits[0, t, token] - logits[0, t, after].logsumexp(-1))
    return total


@torch.no_grad()
def test_scores_equal_teacher_forced_log_likelihood(model):
    ex = EXAMPLES[2]
    space = AnswerSpace.of_task("mnli")
    batch, hidden, mask = _encoded(model, [ex])
    adapters = model.decoder_adapters(batch.task_ids)
    candidates = candidate_ids(model.backbone, space)
    (scores,) = label_log_likelihoods(model, hidden, mask, adapters, [candidates])
    for word, score in zip(space.words, scores.tolist(), strict=True):
        expected = _teacher_forced(model, ex, word, hidden, mask, adapters, candidates)
        assert score == pytest.approx(expected, abs=1e-4), word


@pytest.mark.parametrize("max_pair_tokens", [scoring.MAX_PAIR_TOKENS, 3])
@torch.no_grad()
def test_mixed_task_batch_equals_one_at_a_time(model, max_pair_tokens, monkeypatch):
    """Rows of different lengths and tasks in one batch, in one group or in groups sorted by length and cut
    to their own widest row (a budget of 3 pair-tokens: a group per row): each row scores as it does alone."""
    monkeypatch.setattr(scoring, "MAX_PAIR_TOKENS", max_pair_tokens)
    examples = [
        *EXAMPLES,
        Example("sentence: no", "negative", "sst2"),
        Example("sentence1: a. sentence2: b.", "1.0", "stsb"),
    ]
    spaces = [AnswerSpace.of_task(e.task) for e in examples]
    batch, hidden, mask = _encoded(model, examples)
    assert len(set(mask.sum(1).tolist())) == len(examples)  # every row its own length: the groups differ
    mixed = rank(model, hidden, mask, model.decoder_adapters(batch.task_ids), spaces)
    for i, ex in enumerate(examples):
        b1, h1, m1 = _encoded(model, [ex])
        (alone,) = rank(model, h1, m1, model.decoder_adapters(b1.task_ids), [spaces[i]])
        assert alone.output == mixed[i].output
        for word, p in alone.probabilities.items():
            assert mixed[i].probabilities[word] == pytest.approx(p, abs=1e-5)


def test_every_answer_is_a_label_with_probabilities(model):
    out = predict_examples(model, EXAMPLES * 3, batch_size=4)
    for ex, given, retrieved, route in zip(EXAMPLES * 3, out["given"], out["retrieved"], out["routes"], strict=True):
        assert given in AnswerSpace.of_task(ex.task).words
        assert retrieved in AnswerSpace.of_task(route).words + STSB_BINS or float(retrieved) >= 0
    batch, hidden, mask = _encoded(model, EXAMPLES)
    scored = rank(model, hidden, mask, model.decoder_adapters(batch.task_ids), [AnswerSpace.of_task("rte")] * 3)
    for s in scored:
        assert set(s.probabilities) == {"entailment", "not_entailment"}
        assert sum(s.probabilities.values()) == pytest.approx(1.0)
        assert s.output == max(s.probabilities, key=s.probabilities.get)


def test_regression_answer_is_the_expectation_over_bins():
    space = AnswerSpace(STSB_BINS, regression=True)
    loglik = torch.full((26,), -50.0)
    loglik[STSB_BINS.index("2.0")] = 0.0
    loglik[STSB_BINS.index("4.0")] = 0.0
    scored = answer(space, loglik)
    assert float(scored.output) == pytest.approx(3.0, abs=1e-6)
    assert scored.probabilities["2.0"] == pytest.approx(0.5, abs=1e-6)


def test_stsb_rank_outputs_a_score_in_range(model):
    ex = Example("sentence1: a man sings. sentence2: a man is singing.", "4.4", "stsb")
    out = predict_examples(model, [ex])
    assert 0.0 <= float(out["given"][0]) <= 5.0


def test_answer_space_refuses_bad_candidates():
    with pytest.raises(ValueError, match="distinct"):
        AnswerSpace(("yes", "yes"))
    with pytest.raises(ValueError, match="at least one"):
        AnswerSpace(())
    with pytest.raises(ValueError):
        AnswerSpace(("low", "high"), regression=True)
    assert AnswerSpace.of_labels(None) is None
    with pytest.raises(ValueError, match="1 label offsets for 2 labels"):
        AnswerSpace.of_labels(["yes", "no"], [0.5])
    with pytest.raises(ValueError, match="finite"):
        AnswerSpace.of_labels(["yes", "no"], [0.5, float("nan")])
    with pytest.raises(ValueError, match="finite"):
        AnswerSpace.of_labels(["yes", "no"], [0.5, None])
    for bad in (0.0, -1.0, 1e-300, 1e6, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature must be a number in"):
            AnswerSpace.of_labels(["yes", "no"], None, bad)


def test_a_temperature_divides_the_offset_log_likelihoods_and_keeps_the_answer():
    loglik = torch.tensor([-0.1, -2.5, -4.0])
    plain = answer(AnswerSpace.of_labels(["a", "b", "c"], [0.0, 1.0, 0.0]), loglik)
    soft = answer(AnswerSpace.of_labels(["a", "b", "c"], [0.0, 1.0, 0.0], 2.0), loglik)
    expected = torch.softmax((loglik.double() + torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)) / 2.0, dim=0)
    assert [soft.probabilities[w] for w in "abc"] == pytest.approx(expected.tolist())
    assert soft.output == plain.output == "a" and soft.probabilities["a"] < plain.probabilities["a"]


def test_greedy_decoding_stays_available(model):
    out = predict_examples(model, EXAMPLES, decoding="greedy", max_new_tokens=3)
    assert len(out["given"]) == len(EXAMPLES)
    with pytest.raises(ValueError, match="decoding"):
        predict_examples(model, EXAMPLES, decoding="beam")


@pytest.mark.parametrize("kind", ["minilm", "t5"])
@torch.no_grad()
def test_start_states_equal_the_decoders_first_step(kind):
    """`start_states` (MiniLM: cross-attention folded so the memory is never projected) gives the states of a
    teacher-forced pass over the start token: rows of different lengths (padding masked) and tasks, each with
    its own generated adapters."""
    torch.manual_seed(0)
    model = PHAModel(tiny_config(kind, tasks=["sst2", "rte", "mnli", "stsb"])).eval()
    rows = EXAMPLES + [Example("sentence: " + "a long one " * 12, "negative", "sst2")]
    batch, hidden, mask = _encoded(model, rows)
    assert len(set(mask.sum(1).tolist())) > 1  # the rows are padded to the longest
    bb = model.backbone
    start = torch.full((len(rows), 1), bb.decoder_start_token_id)
    with model.decoder_context.use(model.decoder_adapters(batch.task_ids)):
        expected, _ = bb.decode_states(start, hidden, mask)
        got = bb.start_states(hidden, mask)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_folded_states_equal_the_decoders_teacher_forced_states(model):
    """MiniLM's `folded_states` (causal self-attention, cross-attention without projecting the memory) gives
    `decode_states` for sequences of several tokens, padded after their end, over padded memories."""
    rows = EXAMPLES + [Example("sentence: " + "a long one " * 12, "negative", "sst2")]
    batch, hidden, mask = _encoded(model, rows)
    bb = model.backbone
    assert bb.reads_memory_unprojected and len(set(mask.sum(1).tolist())) > 1
    dec_in = torch.tensor([[bb.decoder_start_token_id, 1010 + i, 1020 + i, bb.pad_token_id] for i in range(len(rows))])
    dec_in[0, 2:] = bb.pad_token_id  # a shorter sequence: padding after it changes no state before it
    with model.decoder_context.use(model.decoder_adapters(batch.task_ids)):
        expected, _ = bb.decode_states(dec_in, hidden, mask)
        got = bb.folded_states(dec_in, hidden, mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_rows_that_need_the_start_state_alone_share_one_pass(model):
    """Where the backbone reads the memory unprojected, every row whose labels differ in their first word goes
    in one pass whatever its width, and STS-B's rows (bins that branch later) in another; otherwise all are cut
    by width."""
    plans = [scoring._Plan.of(candidate_ids(model.backbone, AnswerSpace.of_task(t))) for t in ("sst2", "stsb")]
    rows = [plans[0], plans[1], plans[0], plans[1]]
    spans = torch.tensor([10, 12, 240, 250])
    assert scoring._passes(rows, spans, unprojected=True) == [[0, 2], [1, 3]]
    assert scoring._passes(rows, spans, unprojected=False) == [[0, 1], [2, 3]]


@pytest.mark.parametrize("kind", ["minilm", "t5"])
@pytest.mark.parametrize("row_cache", [True, False])
@torch.no_grad()
def test_shared_prefixes_score_as_each_candidate_alone(kind, row_cache, monkeypatch):
    """STS-B's 26 bins share their first tokens: the head runs once per distinct prefix, the scores are those of
    each bin's own teacher-forced pass, for both backbones, with the row cache (candidates decoded from their
    row's start-token cache) and with one pass over the pairs."""
    monkeypatch.setattr(scoring, "SHARED_CACHE_MIN_TOKENS", 0 if row_cache else 10**9)
    torch.manual_seed(0)
    model = PHAModel(tiny_config(kind, tasks=["stsb", "sst2"])).eval()
    rows = [Example("sentence1: a b. sentence2: a c.", "3.8", "stsb"), Example("sentence: fine", "positive", "sst2")]
    batch, hidden, mask = _encoded(model, rows)
    adapters = model.decoder_adapters(batch.task_ids)
    spaces = [AnswerSpace.of_task("stsb"), AnswerSpace.of_task("sst2")]
    scores = label_log_likelihoods(model, hidden, mask, adapters, [candidate_ids(model.backbone, s) for s in spaces])
    for row, (space, got) in enumerate(zip(spaces, scores, strict=True)):
        one_adapters = [w.index_select(torch.tensor([row])) for w in adapters]
        candidates = candidate_ids(model.backbone, space)
        for word, score in zip(space.words, got.tolist(), strict=True):
            expected = _teacher_forced(
                model, rows[row], word, hidden[row : row + 1], mask[row : row + 1], one_adapters, candidates
            )
            assert score == pytest.approx(expected, abs=1e-4), (kind, word)


@pytest.mark.parametrize("kind", ["minilm", "t5"])
@torch.no_grad()
def test_labels_that_share_words_score_as_teacher_forced(kind):
    """Labels of several words that share their first (the decoder runs to where they branch, not to their
    end), next to a single-label space: one candidate is certain (log-likelihood 0, probability 1)."""
    torch.manual_seed(0)
    model = PHAModel(tiny_config(kind, tasks=["sst2"])).eval()
    ex = Example("sentence: fine", "very good", "sst2")
    batch, hidden, mask = _encoded(model, [ex, ex])
    adapters = model.decoder_adapters(batch.task_ids)
    shared = candidate_ids(model.backbone, AnswerSpace(("very good", "very bad", "not good at all", "fine")))
    single = candidate_ids(model.backbone, AnswerSpace(("only",)))
    assert len({ids[0] for ids in shared}) < len(shared)  # some labels share their first token
    got, certain = label_log_likelihoods(model, hidden, mask, adapters, [shared, single])
    for ids, score in zip(shared, got.tolist(), strict=True):
        word = model.backbone.decode_text(ids[:-1])
        one = [w.index_select(torch.tensor([0])) for w in adapters]
        expected = _teacher_forced(model, ex, word, hidden[:1], mask[:1], one, shared)
        assert score == pytest.approx(expected, abs=1e-4), (kind, word)
    assert certain.tolist() == [0.0]
    assert rank(model, hidden, mask, adapters, [AnswerSpace(("only",))] * 2)[1].probabilities == {"only": 1.0}


def test_other_order_swaps_the_two_fields_of_a_task_read_both_ways():
    stsb = AnswerSpace.of_task("stsb")
    assert scoring.other_order(stsb, "sentence1: a b. sentence2: a c.") == "sentence1: a c. sentence2: a b."
    assert scoring.other_order(stsb, "sentence1: same. sentence2: same.") is None  # the swap changes nothing
    assert scoring.other_order(stsb, "sentence: not the template") is None
    assert scoring.other_order(AnswerSpace.of_task("mrpc"), "sentence1: a b. sentence2: a c.") is None
    assert scoring.other_order(None, "sentence1: a b. sentence2: a c.") is None
    with pytest.raises(ValueError, match="two fields"):
        AnswerSpace(("x",), both_orders="sentence: {sentence}")


@torch.no_grad()
def test_both_orders_answer_is_the_mean_of_the_two_readings_in_serving_and_evaluation():
    """An STS-B row is answered with the mean of its two readings' bin probabilities (so the expectation is the
    mean of the two expectations), by the engine the server calls and by evaluation alike; a row of another
    task, in the same batch, as it is written."""
    torch.manual_seed(0)
    model = PHAModel(tiny_config(tasks=["sst2", "stsb"])).eval()
    # At the tiny model's initial scale (std 0.02) its bin probabilities are near uniform whatever it reads, and
    # the two orders (the same tokens) differ by ~1e-6: larger weights make the readings differ.
    for weight in (p for p in model.backbone.parameters() if p.dim() == 2):
        torch.nn.init.normal_(weight, std=0.3)
    rows = [Example("sentence1: a cat sat. sentence2: a dog ran far.", "1.0", "stsb"), EXAMPLES[0]]
    swapped = Example("sentence1: a dog ran far. sentence2: a cat sat.", "1.0", "stsb")
    spaces = [AnswerSpace.of_task(e.task) for e in rows]
    readings = []
    for ex in (rows[0], swapped):
        batch, hidden, mask = _encoded(model, [ex])
        readings += rank(model, hidden, mask, model.decoder_adapters(batch.task_ids), [spaces[0]])
    first, second = (_expectation(r.probabilities) for r in readings)
    assert abs(first - second) > 0.1  # the two orders read differently: the test can tell them apart
    mean = {w: (readings[0].probabilities[w] + readings[1].probabilities[w]) / 2 for w in STSB_BINS}

    engine = Engine(model)
    prototypes = engine.trained_prototypes()
    sets = [engine.adapters_for_prototype(prototypes[model.tasks.index(e.task)]) for e in rows]
    texts = [e.input for e in rows]
    served = engine.answer(engine.encode(texts), sets, spaces, 4, texts)
    one_order = engine.answer(engine.encode(texts), sets, spaces, 4)
    assert _expectation(served[0].probabilities) == pytest.approx((first + second) / 2, abs=1e-6)
    assert _expectation(one_order[0].probabilities) == pytest.approx(first, abs=1e-6)
    assert served[0].output == f"{(first + second) / 2:.3f}"
    for word, p in mean.items():
        assert served[0].probabilities[word] == pytest.approx(p, abs=1e-7)
    assert served[1] == one_order[1]
    assert predict_examples(model, rows)["given"][0] == served[0].output
    # The second reading rides in the batch's pass as an extra row: it must take its own row's adapters and space
    # wherever that row sits in the batch.
    backwards = engine.answer(engine.encode(texts[::-1]), sets[::-1], spaces[::-1], 4, texts[::-1])
    assert backwards[1].output == served[0].output and backwards[0].output == served[1].output
    for word, p in mean.items():
        assert backwards[1].probabilities[word] == pytest.approx(p, abs=1e-7)


def _expectation(table: dict[str, float]) -> float:
    return sum(float(w) * p for w, p in table.items())
