"""Scores of many edits at once equal the scores of each edit alone, and equal plain forward passes and
plain generation under the edit's hooks (on a tiny run folder's prompts)."""

import json

import pytest
import torch
from test_cli import LOOSE
from test_weighted import _model, _three

from refdir.cli import main
from refdir.core.errors import RefdirError
from refdir.core.runtime import Runtime
from refdir.core.templates import tokenize_prompts
from refdir.evaluation.trial_scores import ProxyScorer, confirm, trial_groups
from refdir.method.refusal import generate, is_refusal, last_logits, refusal_metric
from refdir.method.weighted import WeightedAblation


@pytest.fixture(scope="module")
def run(tiny_folder, tmp_path_factory):
    """The tiny Qwen2's runtime and its run folder's prompts, refusal tokens and threshold."""
    out = tmp_path_factory.mktemp("scores") / "r"
    assert main(["run", "--model", str(tiny_folder), "--out", str(out), *LOOSE]) == 0
    rt = Runtime.load(str(tiny_folder))
    data = json.loads((out / "prompts.json").read_text())
    return rt, data


def _prompts(data: dict, key: str) -> list[str]:
    return [r["instruction"] for r in data[key]]


def _scorer(model, tok, fmt, data: dict, batch_rows: int = 64) -> ProxyScorer:
    return ProxyScorer(
        model,
        tok,
        fmt,
        _prompts(data, "harmful_val"),
        _prompts(data, "harmless_val"),
        data["refusal_tokens"]["token_ids"],
        float(data["metric_threshold"]),
        batch_rows,
    )


def _zero() -> WeightedAblation:
    """An edit that changes nothing (every strength 0)."""
    return WeightedAblation(torch.ones(64), [0.0] * 4, [0.0] * 4)


def _same(a: list[dict], b: list[dict], tol: float = 1e-4) -> bool:
    return len(a) == len(b) and all(abs(x[k] - y[k]) < tol for x, y in zip(a, b) for k in x)


def test_batched_scores_equal_scores_alone(run):
    rt, data = run
    edits = _three(True)  # none / output / input norms, different strengths, directions and ranks
    scorer = _scorer(rt.model, rt.tokenizer, rt.fmt, data)
    together = scorer.score(edits)
    alone = [scorer.score([e])[0] for e in edits]
    assert _same(together, alone)
    assert set(together[0]) == {"refusal", "kl", "refusal_logodds"}
    assert len({round(s["kl"], 6) for s in together}) == 3  # three different edits
    n = len(data["harmful_val"]) + len(data["harmless_val"])
    for rows in (2 * n + 1, 1):  # two trials per pass, one trial per pass
        assert _same(_scorer(rt.model, rt.tokenizer, rt.fmt, data, rows).score(edits), together)


class Plain:
    """The proxy from unshared last-position logits: soft refusal = mean sigmoid(log-odds - threshold) over
    harmful prompts, KL(base || edited) on the harmless ones."""

    def __init__(self, base, tok, fmt, data: dict):
        self.hb = tokenize_prompts(tok, _prompts(data, "harmful_val"), fmt)
        self.lb = tokenize_prompts(tok, _prompts(data, "harmless_val"), fmt)
        self.ids = torch.tensor(data["refusal_tokens"]["token_ids"])
        self.tau = float(data["metric_threshold"])
        base_logits = last_logits(base, self.lb.input_ids, self.lb.attention_mask)
        self.base_logp = torch.log_softmax(base_logits.double(), -1)

    def score(self, model) -> dict[str, float]:
        """Scores of ``model`` as it is (weights edited, or under hooks the caller holds)."""
        m = refusal_metric(last_logits(model, self.hb.input_ids, self.hb.attention_mask), self.ids).double()
        logits = last_logits(model, self.lb.input_ids, self.lb.attention_mask)
        logp = torch.log_softmax(logits.double(), -1)
        kl = (self.base_logp.exp() * (self.base_logp - logp)).sum(-1).mean()
        return {
            "refusal": float(torch.sigmoid(m - self.tau).mean()),
            "kl": float(kl),
            "refusal_logodds": float(m.mean()),
        }


def test_scores_equal_plain_forward_passes(run):
    """The proxy under the edits' hooks, unshared and one edit at a time; a zero edit scores 0 KL."""
    rt, data = run
    plain = Plain(rt.model, rt.tokenizer, rt.fmt, data)
    edits = [*_three(True), _zero()]
    got = _scorer(rt.model, rt.tokenizer, rt.fmt, data).score(edits)
    want = []
    for e in edits:
        with e.hooks(rt.model):
            want.append(plain.score(rt.model))
    assert _same(got, want)
    assert abs(got[-1]["kl"]) < 1e-6 and min(g["kl"] for g in got[:3]) > 1e-4


def test_moe_scores_batched_equal_alone(run):
    _, data = run
    model, tok = _model("qwen2_moe")
    edits = _three(False)  # norm "none": per-row hooks on the MoE blocks' outputs
    assert [idx for _, idx in trial_groups(model, edits)] == [[0, 1, 2]]
    scorer = _scorer(model, tok, run[0].fmt, data)
    assert _same(scorer.score(edits), [scorer.score([e])[0] for e in edits])


def test_confirm_equals_generation_under_each_edit(run):
    """Rows of three trials share generation batches (and leave them as they finish): each trial's
    completions are those generated under its hooks alone; judges count them; KL as the proxy's."""
    rt, data = run
    model, tok = rt.model, rt.tokenizer
    harmful, harmless = _prompts(data, "eval_harmful")[:5], _prompts(data, "eval_harmless")[:4]
    edits = _three(True)
    judges = {"the": ("the",)}
    got = confirm(model, tok, rt.fmt, edits, harmful, harmless, 4, batch_size=4, judges=judges)
    scorer = ProxyScorer(model, tok, rt.fmt, harmful, harmless, [1], 0.0)
    proxy = scorer.score(edits)
    comps = []
    for e, c, p in zip(edits, got, proxy):
        with e.hooks(model):
            want = generate(model, tok, harmful, rt.fmt, 4, batch_size=16, desc=None)
        comps.append(want)
        assert c.completions == want
        assert (c.n_harmful, c.n_harmless) == (5, 4)
        assert c.refusal == sum(is_refusal(x) for x in want) / 5
        assert c.refusal_by_judge["the"] == sum(is_refusal(x, ("the",)) for x in want) / 5
        assert abs(c.kl - p["kl"]) < 1e-4
    assert comps[0] != comps[1] or comps[1] != comps[2]  # the edits changed the text
    alone = confirm(model, tok, rt.fmt, edits[1:2], harmful, harmless, 4, batch_size=3)
    assert alone[0].completions == got[1].completions and abs(alone[0].kl - got[1].kl) < 1e-4


def test_norm_keeping_edits_on_fused_moe_have_no_hook_form(run):
    """They are not scored (``refdir search`` leaves them out on fused experts: test_search)."""
    _, data = run
    model, tok = _model("mixtral")
    scorer = _scorer(model, tok, run[0].fmt, data)
    with pytest.raises(RefdirError, match="fused experts"):
        scorer.score(_three(True)[:2])  # norms none and output
