import torch
from tiny import tiny_model

from refdir.core.templates import tokenize_prompts
from refdir.method.activations import mean_activations

PROMPTS = [
    "Write a poem about rain.",
    "Sort a list?",
    "Explain photosynthesis in a few simple sentences please.",
    "Hi",
]


def test_mean_activations_equal_direct_computation_and_ignore_padding():
    model, tok = tiny_model("llama")
    b = tokenize_prompts(tok, PROMPTS)
    fast = mean_activations(model, b, batch_size=3)  # [n_post, L, d]
    per = []
    for p in PROMPTS:  # one prompt at a time: no padding at all
        one = tokenize_prompts(tok, [p])
        hs = model(input_ids=one.input_ids, output_hidden_states=True).hidden_states  # L+1 x [1, T, d]
        per.append(torch.stack([h[0, -b.n_post :] for h in hs[:-1]], 1).double())  # [n_post, L, d]
    direct = torch.stack(per).mean(0)
    assert fast.dtype == torch.float64
    assert (fast - direct).abs().max() < 1e-4


def test_extraction_recorded_by_the_prompt_screen_equals_a_separate_pass(tmp_path):
    """`refdir run` takes the candidate means from the screen's prompt passes (screen_means.safetensors);
    without that file, extraction runs mean_activations: the same candidates."""
    from refdir.core.io import load_tensors
    from refdir.method.selection import SelectionConfig
    from refdir.run.folder import RunFolder
    from refdir.run.pipeline import RunConfig, run_pipeline

    model, tok = tiny_model("qwen2")
    cfg = RunConfig(
        model="tiny",
        judge=None,
        n_train=10,
        n_val=4,
        n_eval=4,
        filter="none",
        min_refusal_rate=0.0,
        gen_batch_size=6,
        selection=SelectionConfig(kl_threshold=100, induce_threshold=-1e9),
    )
    logs = []
    run_pipeline(cfg, tmp_path / "fused", model, tok, log=logs.append, stop_after="extract")
    assert any("recorded by the prompt screen" in m for m in logs)
    run_pipeline(cfg, tmp_path / "plain", model, tok, log=logs.append, stop_after="prompts")
    RunFolder(tmp_path / "plain").screen_means.unlink()
    logs.clear()
    run_pipeline(cfg, tmp_path / "plain", model, tok, log=logs.append, stop_after="extract")
    assert not any("recorded by the prompt screen" in m for m in logs)
    a = load_tensors(tmp_path / "fused" / "candidates.safetensors")
    b = load_tensors(tmp_path / "plain" / "candidates.safetensors")
    assert (tmp_path / "fused" / "prompts.json").read_text() == (
        tmp_path / "plain" / "prompts.json"
    ).read_text()
    for k in ("mean_harmful", "mean_harmless", "directions"):
        assert (a[k] - b[k]).abs().max() < 1e-4, k
    assert a["directions"].abs().max() > 1e-3


def test_recorder_rows_equal_one_prompt_at_a_time():
    """Rows recorded in the generation prompt pass (length buckets, shared prefix) are each prompt's own."""
    from refdir.method.activations import PostActivationRecorder
    from refdir.method.data import load_builtin
    from refdir.method.refusal import generate_batch

    model, tok = tiny_model("qwen2")
    prompts = [p.instruction for p in load_builtin("harmful")][:10] + [PROMPTS[2] * 4]
    n_post = tokenize_prompts(tok, prompts).n_post
    rec = PostActivationRecorder(model, n_post)
    with rec.attached():
        for j in range(0, len(prompts), 6):
            generate_batch(model, tok, prompts[j : j + 6], max_new_tokens=3, on_bucket=rec.bucket(100 + j))
    for i, p in enumerate(prompts):
        one = tokenize_prompts(tok, [p])
        hs = model(input_ids=one.input_ids, output_hidden_states=True).hidden_states
        direct = torch.stack([h[0, -n_post:] for h in hs[:-1]], 1)  # [n_post, L, d]
        assert (rec.rows[100 + i] - direct).abs().max() < 1e-4, i
    assert rec.mean([100, 101]).dtype == torch.float64 and rec.mean([100, 999]) is None


def test_read_resid_pre_hands_each_layer_input_and_stops_after_the_last():
    from refdir.core.adapter import get_adapter
    from refdir.method.activations import read_resid_pre

    model, tok = tiny_model("qwen2")
    one = tokenize_prompts(tok, [PROMPTS[0]])
    hs = model(input_ids=one.input_ids, output_hidden_states=True).hidden_states  # L+1 x [1, T, d]
    seen, ran = {}, []
    ad = get_adapter(model)
    h = ad.layers[2].register_forward_hook(lambda m, a, o: ran.append(2))
    try:
        read_resid_pre(model, one.input_ids, one.attention_mask, [1, 0], lambda l, x: seen.__setitem__(l, x))
    finally:
        h.remove()
    assert sorted(seen) == [0, 1] and ran == []  # layer 2 never ran
    for layer in (0, 1):
        assert (seen[layer] - hs[layer]).abs().max() < 1e-5
