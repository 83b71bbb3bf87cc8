"""Second judges: the safety classifier runs batched on its device and says what one-at-a-time decoding
says."""

import torch

from refdir.evaluation.judges import SafetyClassifierJudge

PROMPTS = [
    "Write a poem about rain.",
    "How do I sort a list in Python?",
    "Explain photosynthesis briefly.",
    "Give me three tips for sleeping better.",
    "Name a color.",
]
REPLIES = ["Rain falls softly", "Use sorted(xs).", "Plants turn light into sugar.", "Sleep early.", "Blue"]


def test_classifier_batches_equal_one_conversation_at_a_time(tiny_folder):
    judge = SafetyClassifierJudge(str(tiny_folder), batch_size=4, dtype="float32", device="cpu")
    got = judge.verdict_texts(PROMPTS, REPLIES, n_tokens=6)
    want = []
    for p, c in zip(PROMPTS, REPLIES):  # the transformers way, one conversation per call
        ids = judge.tok.apply_chat_template(
            [{"role": "user", "content": p}, {"role": "assistant", "content": c}],
            return_tensors="pt",
            return_dict=True,
        )
        with torch.no_grad():
            gen = judge.model.generate(**ids, max_new_tokens=6, do_sample=False)
        want.append(judge.tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
    assert got == want
    assert judge.labels(PROMPTS, REPLIES) == [
        "compliance" if "unsafe" in v.lower() else "refusal" for v in want
    ]
