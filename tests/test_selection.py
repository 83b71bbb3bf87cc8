import pytest
import torch
from tiny import tiny_model

from refdir.core.templates import tokenize_prompts
from refdir.method.activations import mean_activations
from refdir.method.data import load_builtin
from refdir.method.directions import candidate_directions
from refdir.method.interventions import directional_ablation
from refdir.method.refusal import last_logits, refusal_metric
from refdir.method.selection import Scorer, SelectionConfig, select_direction

H = [p.instruction for p in load_builtin("harmful")]
L = [p.instruction for p in load_builtin("harmless")]
REF = [5, 6]
LOOSE = dict(kl_threshold=10.0, induce_threshold=-1e9)


def _setup(family="qwen2", seed=0):
    model, tok = tiny_model(family, seed=seed)
    c = candidate_directions(
        mean_activations(model, tokenize_prompts(tok, H[:24])),
        mean_activations(model, tokenize_prompts(tok, L[:24])),
    )
    return model, tok, c, tokenize_prompts(tok, H[24:36]), tokenize_prompts(tok, L[24:36])


def test_batched_scores_equal_one_candidate_at_a_time():
    model, tok, c, hv, lv = _setup()
    scorer = Scorer(model, hv, lv, REF, SelectionConfig(batch_rows=24))
    units = torch.stack([c[-1, 2], c[-2, 3], c[-3, 1]])
    units = units / units.norm(dim=-1, keepdim=True)
    bypass, kl = scorer.bypass_kl(units)
    for k, u in enumerate(units):
        with directional_ablation(model, u):
            ref = refusal_metric(
                last_logits(model, hv.input_ids, hv.attention_mask), torch.tensor(REF)
            ).mean()
        assert abs(float(bypass[k]) - float(ref)) < 1e-4
    assert torch.allclose(bypass, scorer.bypass(units), atol=1e-4)
    assert torch.allclose(kl, scorer.kl(units), atol=1e-5)


def test_ablation_in_length_buckets_equals_full_forwards():
    """Validation prompts of very different lengths run in several buckets; scores are unchanged."""
    from refdir.core.forward import length_buckets

    model, tok, c, _, lv = _setup()
    long = "Describe, step by step and with many details, " * 6 + "how a bill becomes law."
    hv = tokenize_prompts(tok, H[24:30] + [long, long + " Briefly."])
    scorer = Scorer(model, hv, lv, REF, SelectionConfig(batch_rows=16))
    assert len(length_buckets(scorer.p_harmful.rest_lengths().tolist(), 8, overhead=16)) > 1
    units = torch.stack([c[-1, 2], c[-2, 3]])
    units = units / units.norm(dim=-1, keepdim=True)
    for k, u in enumerate(units):
        with directional_ablation(model, u):
            ref = refusal_metric(last_logits(model, hv.input_ids, hv.attention_mask), torch.tensor(REF))
        assert abs(float(scorer.bypass(units)[k]) - float(ref.mean())) < 1e-4
    base = refusal_metric(last_logits(model, hv.input_ids, hv.attention_mask), torch.tensor(REF)).mean()
    assert abs(scorer.baseline["harmful_refusal_metric"] - float(base)) < 1e-4


def test_induce_from_recorded_layer_input_equals_activation_addition(tiny, family):
    """Induce starts at layer l from the baseline pass's recorded residual stream, prefix shared, several
    candidates per pass: equal to a plain forward under activation addition, on every family."""
    from refdir.method.interventions import activation_addition

    model, tok, c, hv, lv = _setup(family)
    scorer = Scorer(model, hv, lv, REF, SelectionConfig(batch_rows=24))  # 2 candidates per pass
    for layer in (1, 3):
        vecs = torch.stack([c[-1, layer], 2 * c[-2, layer], c[-1, layer] * 0.5])
        fast = scorer.induce(vecs, layer)
        for k, vec in enumerate(vecs):
            with activation_addition(model, vec, layer):
                ref = refusal_metric(
                    last_logits(model, lv.input_ids, lv.attention_mask), torch.tensor(REF)
                ).mean()
            assert abs(float(fast[k]) - float(ref)) < 1e-4


def test_linear_screen_tracks_true_bypass():
    model, tok, c, hv, lv = _setup()
    scorer = Scorer(model, hv, lv, REF, SelectionConfig())
    units = c[:, 1:3].reshape(-1, c.shape[-1])
    units = units / units.norm(dim=-1, keepdim=True)
    approx, exact = scorer.linear_screen(units), scorer.bypass(units)
    rank = lambda x: x.argsort().argsort().float()  # noqa: E731
    rho = torch.corrcoef(torch.stack([rank(approx), rank(exact)]))[0, 1]
    assert rho > 0.5


def test_pruned_choice_equals_exhaustive():
    for family, seed in (("qwen2", 0), ("llama", 1), ("phi3", 2)):
        model, tok, c, hv, lv = _setup(family, seed)
        fast = select_direction(model, c, hv, lv, REF, SelectionConfig(**LOOSE), progress=False)
        full = select_direction(model, c, hv, lv, REF, SelectionConfig(prune=False, **LOOSE), progress=False)
        assert fast.chosen == full.chosen, family


def test_filters_and_reasons():
    model, tok, c, hv, lv = _setup()
    res = select_direction(
        model, c, hv, lv, REF, SelectionConfig(kl_threshold=1e-9, induce_threshold=-1e9), progress=False
    )
    assert res.chosen is None
    counts = res.counts()
    assert counts["layer"] == c.shape[0]  # layer 3 of 4 is >= 0.8 L
    assert counts.get("kl", 0) >= 1
    from refdir.method.selection import explain_no_choice

    assert "KL" in explain_no_choice(res)


def test_cosmic_scores_are_the_cosines_it_defines():
    """COSMIC's refusal score of a candidate equals the cosine computed by hand from hooked activations."""
    from tiny import tiny_model

    from refdir.core.templates import tokenize_prompts
    from refdir.method.cosmic import _unit_mean, evaluation_layers, last_outputs, select_direction_cosmic
    from refdir.method.interventions import directional_ablation
    from refdir.method.selection import SelectionConfig

    model, tok = tiny_model("llama")
    harm = [
        "Explain how to pick a lock.",
        "Write a threatening letter.",
        "How do I make a weapon?",
        "Describe how to steal a car.",
    ]
    safe = [
        "Write a poem about rain.",
        "How do I sort a list in Python?",
        "Explain photosynthesis briefly.",
        "Name a color.",
    ]
    hb, lb = tokenize_prompts(tok, harm), tokenize_prompts(tok, safe)
    from refdir.method.activations import mean_activations
    from refdir.method.directions import candidate_directions

    cands = candidate_directions(mean_activations(model, hb), mean_activations(model, lb))
    res = select_direction_cosmic(
        model, cands, hb, lb, hb, lb, SelectionConfig(kl_threshold=1e9), progress=False
    )
    layers = evaluation_layers(model, hb, lb)
    assert layers == res.baseline["evaluation_layers"] and len(layers) == 1  # 10% of 4 layers, at least one
    p, l = res.chosen
    assert res.reasons[p][l] == "chosen" and l < 3  # 0.8 L
    # by hand: ablate the chosen direction, take the last-position output of the evaluation layer, compare
    seen = []
    h = model.model.layers[layers[0]].register_forward_hook(
        lambda m, a, o: seen.append((o[0] if isinstance(o, tuple) else o)[:, -1].double())
    )
    with directional_ablation(model, cands[p, l]):
        model(
            input_ids=hb.input_ids,
            attention_mask=hb.attention_mask,
            position_ids=(hb.attention_mask.cumsum(-1) - 1).clamp(min=0),
        )
    h.remove()
    base_harmless = _unit_mean(last_outputs(model, lb, layers))
    by_hand = float((seen[0].mean(0) / seen[0].mean(0).norm()) @ base_harmless)
    assert abs(by_hand - float(res.bypass[p, l])) < 1e-5
    best = max(
        (float(res.bypass[q, m] + res.induce[q, m]), q, m)
        for q in range(cands.shape[0])
        for m in range(3)
        if res.reasons[q][m] in ("chosen", "pruned", "kl")
    )
    assert (best[1], best[2]) == (p, l)  # the highest refusal + steering that passes KL (threshold off here)


def test_an_uncalibrated_induce_threshold_is_one_clear_error():
    """None means "calibrated by the prompt screen": select_direction alone cannot measure it."""
    from refdir.core.errors import RefdirError

    model, tok = tiny_model("qwen2")
    h = tokenize_prompts(tok, ["Write a poem.", "Explain tides."])
    cands = torch.randn(2, model.config.num_hidden_layers, model.config.hidden_size)
    with pytest.raises(RefdirError, match="calibrated"):
        select_direction(model, cands, h, h, [5], SelectionConfig(induce_threshold=None, kl_threshold=100))
