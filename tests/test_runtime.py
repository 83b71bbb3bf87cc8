"""The runtime object: one path from text to tensors, and the batch policy."""

import pytest
import torch
from tiny import tiny_model

from refdir.core.runtime import BatchPolicy, Runtime, _grow, autotune
from refdir.core.templates import PromptFormat, tokenize_prompts


def test_encode_is_the_one_path_to_the_models_device():
    model, tok = tiny_model("llama")
    rt = Runtime(model, tok, PromptFormat(system="Be brief."))
    b = rt.encode(["Name a color.", "Write a haiku about rain."])
    ref = tokenize_prompts(
        tok, ["Name a color.", "Write a haiku about rain."], PromptFormat(system="Be brief.")
    )
    assert torch.equal(b.input_ids, ref.input_ids) and b.n_post == ref.n_post
    assert b.input_ids.device == rt.device == next(model.parameters()).device
    assert rt.with_format(PromptFormat()).encode(["Name a color."]).input_ids.shape[1] < b.input_ids.shape[1]


def test_cpu_keeps_the_measured_defaults():
    model, tok = tiny_model("qwen2")
    assert autotune(Runtime(model, tok)) == BatchPolicy()


def test_batch_growth_stops_at_out_of_memory_or_when_it_stops_paying():
    def saturating(n):  # throughput rises until 128 rows, then flat
        return min(n, 128) * 10.0

    def oom_at_256(n):
        if n >= 256:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return n * 10.0

    assert _grow(saturating, 1024) == 128
    assert _grow(oom_at_256, 1024) == 128
    assert _grow(lambda n: float(n), 64) == 64


def test_run_config_batch_policy():
    from refdir.run.settings import RunConfig

    assert RunConfig().batch_policy() is None  # the runtime decides
    p = RunConfig(gen_batch_size=50).batch_policy()
    assert (p.gen_rows, p.prompt_rows, p.source) == (50, 32, "user")


@pytest.mark.parametrize("family", ["mixtral", "llama"])
def test_runtime_reports_placement_and_dtype(family):
    model, tok = tiny_model(family)
    rt = Runtime(model, tok)
    assert rt.dtype == torch.float32 and rt.load_info["dtype"] == "float32"
