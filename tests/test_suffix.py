"""GCG on tiny models: the cached candidate loss equals a full forward, and optimizing lowers the loss."""

import torch
from tiny import tiny_model

from refdir.analyses.suffix import _batch_loss, _pieces, affirmative_target, gcg
from refdir.core.prefix import prefix_cache
from refdir.core.templates import PromptFormat

INS = ["Write a poem about rain.", "Explain photosynthesis briefly."]


def test_candidate_loss_with_cached_prefix_equals_full_forward():
    model, tok = tiny_model("qwen2")
    pre, post, tgt = _pieces(tok, INS[0], affirmative_target(INS[0]), PromptFormat())
    g = torch.Generator().manual_seed(0)
    sufs = [torch.randint(10, 600, (5,), generator=g) for _ in range(3)]
    got = _batch_loss(model, prefix_cache(model, torch.tensor(pre)), len(pre), sufs, post, tgt)
    for k, s in enumerate(sufs):
        ids = torch.tensor([pre + s.tolist() + post + tgt])
        lp = torch.log_softmax(model(input_ids=ids).logits[0, -len(tgt) - 1 : -1].float(), -1)
        ref = -lp[torch.arange(len(tgt)), torch.tensor(tgt)].mean()
        assert abs(float(got[k]) - float(ref)) < 1e-4


def test_gcg_lowers_the_target_loss():
    model, tok = tiny_model("llama")
    res = gcg(
        model,
        tok,
        INS,
        [affirmative_target(x) for x in INS],
        n_tokens=6,
        steps=6,
        topk=16,
        batch=16,
        seed=0,
        progress=False,
    )
    assert res.steps == 6 and res.losses[-1] < res.losses[0] - 1e-3
    assert tok(res.suffix, add_special_tokens=False)["input_ids"] == res.token_ids  # round-trip safe
