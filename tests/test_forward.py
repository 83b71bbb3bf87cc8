"""The shared-prefix forward and greedy loop equal plain full forwards, on every family."""

import torch
from tiny import tiny_model

from refdir.core.forward import end_token_ids, greedy_generate, last_logits_shared, split_prefix
from refdir.core.templates import tokenize_prompts
from refdir.method.interventions import activation_addition, directional_ablation
from refdir.method.refusal import last_logits

PROMPTS = [
    "Write a poem about rain.",
    "How do I sort a list in Python?",
    "Explain photosynthesis briefly.",
    "Give me three tips for sleeping better, please, in a short list.",
]


def _full_greedy(model, ids, mask, n, end_ids):
    """Reference: a full forward per step, no cache, no prefix sharing."""
    out = []
    for i in range(ids.shape[0]):
        row = ids[i][mask[i].bool()][None]
        new = []
        for _ in range(n):
            logits = model(input_ids=row, use_cache=False).logits[0, -1]
            t = int(logits.argmax())
            if t in end_ids:
                break
            new.append(t)
            row = torch.cat([row, torch.tensor([[t]])], 1)
        out.append(new)
    return out


def test_split_prefix_shares_the_template_head():
    model, tok = tiny_model("qwen2")
    b = tokenize_prompts(tok, PROMPTS)
    pb = split_prefix(b)
    # "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    assert pb.n_prefix >= 8
    for i in range(len(PROMPTS)):
        full = b.input_ids[i][b.attention_mask[i].bool()]
        rest = pb.input_ids[i][pb.attention_mask[i, pb.n_prefix :].bool()]
        assert torch.equal(torch.cat([pb.prefix, rest]), full)
    assert split_prefix(b, share=False).n_prefix == 0


def test_shared_prefix_logits_equal_full_forward(tiny, family):
    model, tok = tiny_model(family)
    b = tokenize_prompts(tok, PROMPTS)
    pb = split_prefix(b, model=model)
    r = torch.randn(64, generator=torch.Generator().manual_seed(3))
    for ctx in (
        lambda: torch.no_grad(),
        lambda: directional_ablation(model, r),
        lambda: activation_addition(model, r, 1),
    ):
        with ctx():
            full = last_logits(model, b.input_ids, b.attention_mask)
            shared = last_logits_shared(model, pb)
        assert (full - shared).abs().max() < 1e-4


def test_greedy_generate_equals_stepwise_full_forwards(tiny, family):
    model, tok = tiny_model(family)
    b = tokenize_prompts(tok, PROMPTS)
    ends = end_token_ids(model, tok)
    n = 12
    ref = _full_greedy(model, b.input_ids, b.attention_mask, n, ends)
    got, first = greedy_generate(model, split_prefix(b, model=model, extra=n), n, ends, first_logits=True)
    assert got == ref
    assert (first - last_logits(model, b.input_ids, b.attention_mask)).abs().max() < 1e-4


def test_rows_leave_the_batch_when_they_end():
    model, tok = tiny_model("llama")
    b = tokenize_prompts(tok, PROMPTS)
    ends = end_token_ids(model, tok)
    with torch.no_grad():
        model.get_output_embeddings().weight[ends[0]] *= 6
    got, _ = greedy_generate(model, split_prefix(b), 20, ends)
    ref = _full_greedy(model, b.input_ids, b.attention_mask, 20, ends)
    assert got == ref and min(map(len, got)) < 20


def test_no_sharing_across_a_sliding_window():
    """Padding between prefix and rest would eat into the window: gemma3 (window 8) falls back."""
    model, tok = tiny_model("gemma3")
    b = tokenize_prompts(tok, PROMPTS)
    assert split_prefix(b).n_prefix > 0 and split_prefix(b, model=model).n_prefix == 0


def test_kl_and_ce_equal_a_direct_computation():
    """Streaming, prefix-shared KL/CE == full forwards of prompt+completion, one prompt at a time."""
    from refdir.core.templates import PromptFormat, add_special, format_prompt
    from refdir.evaluation.conditions import kl_and_ce

    model, tok = tiny_model("qwen2")
    comps = [
        "Sure, here is a poem about rain",
        "",
        "Photosynthesis is how plants make food from light",
        "1. Sleep",
    ]
    r = torch.randn(64, generator=torch.Generator().manual_seed(5))
    n = 6
    got = kl_and_ce(
        model,
        tok,
        PROMPTS,
        comps,
        PromptFormat(),
        {"baseline": torch.no_grad, "ablation": lambda: directional_ablation(model, r)},
        n_tokens=n,
        batch_size=3,
    )
    kl_first, kl_mean, ce, ce_n = [], [], 0.0, 0
    for p, c in zip(PROMPTS, comps):
        text = format_prompt(tok, p, PromptFormat())
        pid = tok(text, add_special_tokens=add_special(tok, text))["input_ids"]
        cid = tok(c, add_special_tokens=False)["input_ids"][:n]
        ids = torch.tensor([pid + cid])
        lb = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        with directional_ablation(model, r):
            la = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        sl = slice(len(pid) - 1, len(pid) - 1 + max(len(cid), 1))
        kl = (lb[sl].exp() * (lb[sl] - la[sl])).sum(-1)
        kl_first.append(float(kl[0]))
        kl_mean.append(float(kl.mean()))
        ce += (
            float(-la[sl][torch.arange(len(cid)), torch.tensor(cid, dtype=torch.long)].sum()) if cid else 0.0
        )
        ce_n += len(cid)
    a = got["ablation"]
    assert abs(a["kl_first"] - sum(kl_first) / 4) < 1e-5 and abs(a["kl_mean"] - sum(kl_mean) / 4) < 1e-5
    assert abs(a["ce"] - ce / ce_n) < 1e-5 and a["ce_tokens"] == ce_n
    assert got["baseline"]["kl_first"] == 0 and a["kl_first"] > 1e-4


def test_single_prompt_keeps_its_post_instruction_tokens():
    model, tok = tiny_model("qwen2")
    b = tokenize_prompts(tok, PROMPTS[:1])
    pb = split_prefix(b)
    assert pb.input_ids.shape[1] == b.n_post
    from refdir.method.activations import mean_activations

    assert (mean_activations(model, b) - mean_activations(model, b, share_prefix=False)).abs().max() < 1e-4


def test_length_buckets_partition_rows_and_cut_padding():
    from refdir.core.forward import length_buckets

    lengths = [5, 40, 6, 41, 7, 39, 5, 8]
    groups = length_buckets(lengths, max_rows=3, overhead=4)
    assert sorted(i for g in groups for i in g) == list(range(8)) and max(map(len, groups)) <= 3
    cost = sum(4 + len(g) * max(lengths[i] for i in g) for g in groups)
    assert cost < 4 * 3 + 8 * 41 / 2  # far below padding everything to 41
    assert length_buckets(lengths, 8, overhead=10_000) == [sorted(range(8), key=lambda i: (lengths[i], i))]


LONG = PROMPTS + [
    "Summarise, in plain words and at some length, the main differences between the economic "
    "policies of several countries over the last century, with examples from each decade and "
    "a closing paragraph on what historians still disagree about."
]


def test_bucketed_prefill_equals_one_padded_pass(tiny, family):
    """Prompts of very different lengths: the prefill runs in buckets and decoding is unchanged."""
    from refdir.core.forward import bucketed_prefill, length_buckets

    model, tok = tiny_model(family)
    b = tokenize_prompts(tok, LONG)
    pb = split_prefix(b, model=model, extra=12)
    if family != "gemma3":  # gemma3's sliding window keeps one pass
        assert len(length_buckets(pb.rest_lengths().tolist(), len(LONG))) > 1
    ends = end_token_ids(model, tok)
    ref = _full_greedy(model, b.input_ids, b.attention_mask, 12, ends)
    got, first = greedy_generate(model, pb, 12, ends, first_logits=True)
    assert got == ref
    assert (first - last_logits(model, b.input_ids, b.attention_mask)).abs().max() < 1e-4
    _, one = bucketed_prefill(model, pb, bucket=False)
    assert (first - one).abs().max() < 1e-4


def test_actadd_teacher_forcing_from_its_layer_equals_the_full_pass(tiny, family):
    """kl_and_ce runs activation addition only from its layer on the baseline's residual stream: same
    numbers."""
    from refdir.core.templates import PromptFormat
    from refdir.evaluation.conditions import ActAddFactory, kl_and_ce

    model, tok = tiny_model(family)
    comps = ["Sure, here is a poem about rain", "", "Photosynthesis is how plants make food", "1. Sleep"]
    v = 3 * torch.randn(64, generator=torch.Generator().manual_seed(7))
    fast = ActAddFactory(model, v, 1, -1.0)
    slow = lambda: activation_addition(model, v, 1, -1.0)  # noqa: E731
    got = kl_and_ce(
        model,
        tok,
        PROMPTS,
        comps,
        PromptFormat(),
        {"baseline": torch.no_grad, "fast": fast, "slow": slow},
        n_tokens=5,
        batch_size=3,
    )
    assert got["slow"]["kl_mean"] > 1e-3
    for key in ("kl_first", "kl_mean", "ce"):
        assert abs(got["fast"][key] - got["slow"][key]) < 1e-5, (key, got)


def test_conditions_sharing_batches_equal_one_condition_at_a_time(tiny, family):
    """Rows of baseline, ablation and +-r in one batch (per-row hooks, per-condition prefix caches, rows
    leaving as they end) generate exactly what each condition generates alone."""
    from refdir.core.templates import PromptFormat
    from refdir.evaluation.conditions import GenJob, condition, generate_conditions, generate_judged
    from refdir.method.directions import Direction

    model, tok = tiny_model(family)
    ends = end_token_ids(model, tok)
    with torch.no_grad():  # make some rows end early so that the batch shrinks
        model.get_output_embeddings().weight[ends[0]] *= 2
    v = 4 * torch.randn(64, generator=torch.Generator().manual_seed(11))
    d = Direction(vector=v, layer=1, pos=-1)
    cats = [None] * len(PROMPTS)
    jobs = [
        GenJob(f"j{i}", c, PROMPTS[i % 2 :], cats[i % 2 :])
        for i, c in enumerate(("baseline", "ablation", "actadd+", "actadd-", "baseline"))
    ]
    got = generate_conditions(model, tok, jobs, d, PromptFormat(), 10, batch_size=7)
    for job in jobs:
        with condition(model, job.condition, d):
            ref = generate_judged(model, tok, job.prompts, job.categories, PromptFormat(), 10, 16, None)
        assert [j.completion for j in got[job.name]] == [j.completion for j in ref], job.condition
    texts = {k: [j.completion for j in v] for k, v in got.items()}
    assert texts["j0"] == texts["j4"] and texts["j0"] != texts["j2"]  # the conditions do differ


def test_settled_rows_leave_with_what_they_have():
    """A row whose verdict is settled (the screen: a refusal phrase appeared) stops; the others go on
    unchanged."""
    model, tok = tiny_model("qwen2")
    b = tokenize_prompts(tok, PROMPTS)
    ends = end_token_ids(model, tok)
    ref, _ = greedy_generate(model, split_prefix(b, model=model, extra=12), 12, ends)
    stop = ref[0][2]
    got, _ = greedy_generate(
        model, split_prefix(b, model=model, extra=12), 12, ends, settled=lambda t: t[-1] == stop
    )
    want = [r[: r.index(stop) + 1] if stop in r else r for r in ref]
    assert got == want and got != ref


def test_progress_hears_of_every_row_once():
    """``on_done`` counts finished rows (progress bars move with the rows): every row exactly once."""
    model, tok = tiny_model("qwen2")
    b = tokenize_prompts(tok, PROMPTS)
    ends = end_token_ids(model, tok)
    with torch.no_grad():
        model.get_output_embeddings().weight[ends[0]] *= 2  # some rows end early
    seen = []
    new, _ = greedy_generate(model, split_prefix(b, model=model, extra=12), 12, ends, on_done=seen.append)
    ref, _ = greedy_generate(model, split_prefix(b, model=model, extra=12), 12, ends)
    assert sum(seen) == len(PROMPTS) and new == ref


def _full_logprob(model, seq, c):
    """Reference: one unpadded full forward of the row, log-softmax over every position."""
    logp = model(input_ids=torch.tensor([seq[:-1]]), use_cache=False).logits[0].float().log_softmax(-1)
    tgt = torch.tensor(seq[-c:])
    part = logp[-c:]
    return float(part.gather(-1, tgt[:, None]).sum()), bool((part.argmax(-1) == tgt).all())


def test_continuation_logprobs_equal_full_forwards(tiny, family):
    """Benchmark scoring: a shared preamble, items whose answers share the question, a repeated input
    (one-token answers of one question), rows of different lengths, a greedy continuation."""
    from refdir.core.forward import continuation_logprobs

    model, _ = tiny_model(family)
    g = torch.Generator().manual_seed(5)
    pre = torch.randint(3, 600, (20,), generator=g).tolist()
    seqs, n_cont = [], []
    for q in range(3):
        question = pre + torch.randint(3, 600, (3 + 2 * q,), generator=g).tolist()
        for a in range(3):
            ans = torch.randint(3, 600, (1 + a,), generator=g).tolist()
            seqs.append(question + ans)
            n_cont.append(len(ans))
    seqs += [seqs[0][:-1] + [7], seqs[0][:-1] + [9]]  # same input as row 0, other one-token answers
    n_cont += [1, 1]
    with torch.no_grad():
        row = pre[:5]
        for _ in range(4):  # a continuation greedy decoding reproduces
            row = row + [int(model(input_ids=torch.tensor([row]), use_cache=False).logits[0, -1].argmax())]
        seqs.append(row)
        n_cont.append(4)
        ref = [_full_logprob(model, s, c) for s, c in zip(seqs, n_cont)]
    got = continuation_logprobs(model, seqs, n_cont, max_rows=4)
    for (a, ga), (b, gb) in zip(got, ref):
        assert abs(a - b) < 1e-4 and ga == gb
    assert got[-1][1] and not all(gr for _, gr in got)
    # one chunk: a row whose whole input is shorter than another row's continuation (HellaSwag's endings)
    # (alone in its length bucket)
    mixed, mixed_c = [pre[:3], pre + torch.randint(3, 600, (60,), generator=g).tolist()], [2, 7]
    with torch.no_grad():
        ref = [_full_logprob(model, s, c) for s, c in zip(mixed, mixed_c)]
    for (a, ga), (b, gb) in zip(continuation_logprobs(model, mixed, mixed_c, max_rows=4), ref):
        assert abs(a - b) < 1e-4 and ga == gb


def test_room_cache_equals_a_growing_one():
    """Decoding writes into preallocated room (grown by halves) instead of concatenating: same keys and
    values at every step, through growth past the first room and through rows leaving the batch."""
    from transformers import DynamicCache

    from refdir.core.forward import _make_room

    g = torch.Generator().manual_seed(0)

    def kv(b: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(b, 2, t, 8, generator=g), torch.randn(b, 2, t, 8, generator=g)

    plain, room = DynamicCache(), DynamicCache()
    for li in range(2):
        k, v = kv(6, 5)
        plain.update(k, v, li)
        room.update(k.clone(), v.clone(), li)
    _make_room(room, 150)
    assert type(room.layers[0]).__name__ == "RoomDynamicLayer"
    b = 6
    for step in range(150):
        if step in (40, 90):  # rows finish
            keep = torch.tensor([0, 2, 3]) if b == 6 else torch.tensor([1, 2])
            plain.batch_select_indices(keep)
            room.batch_select_indices(keep)
            b = len(keep)
        for li in range(2):
            k, v = kv(b, 1)
            pk, pv = plain.update(k, v, li)
            rk, rv = room.update(k, v, li)
            assert torch.equal(pk, rk) and torch.equal(pv, rv)
    assert room.get_seq_length() == plain.get_seq_length() == 155
    assert room.layers[0]._kbuf.shape[-2] <= 155 * 1.5
