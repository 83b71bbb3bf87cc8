import torch

from refdir.activations import mean_activations
from refdir.templates import tokenize_prompts
from tiny import tiny_model

PROMPTS = ["Write a poem about rain.", "Sort a list?", "Explain photosynthesis in a few simple sentences please.",
           "Hi"]


def test_mean_activations_equal_direct_computation_and_ignore_padding():
    model, tok = tiny_model("llama")
    b = tokenize_prompts(tok, PROMPTS)
    fast = mean_activations(model, b, batch_size=3)  # [n_post, L, d]
    per = []
    for p in PROMPTS:  # one prompt at a time: no padding at all
        one = tokenize_prompts(tok, [p])
        hs = model(input_ids=one.input_ids, output_hidden_states=True).hidden_states  # L+1 x [1, T, d]
        per.append(torch.stack([h[0, -b.n_post:] for h in hs[:-1]], 1).double())  # [n_post, L, d]
    direct = torch.stack(per).mean(0)
    assert fast.dtype == torch.float64
    assert (fast - direct).abs().max() < 1e-4
