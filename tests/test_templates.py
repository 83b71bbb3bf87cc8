"""Chat templates seen in the wild: trimming, printed dates, template variables, thinking blocks."""

import pytest
from tiny import TEMPLATES, make_tokenizer

from refdir.core.errors import RefdirError
from refdir.core.prompt_format import canonical_json_object as template_kwargs_json
from refdir.core.templates import (
    PromptFormat,
    format_prompt,
    post_instruction_count,
    post_instruction_tokens,
    tokenize_prompts,
)

DATED = (
    "{% if not date_string is defined %}{% set date_string = strftime_now('%d %b %Y') %}{% endif %}"
    "<|start_header_id|>system<|end_header_id|>\n\nToday Date: {{ date_string }}<|eot_id|>"
    + TEMPLATES["llama3"]
)
THINKING = TEMPLATES["chatml"].replace(
    "assistant\n{% endif %}",
    "assistant\n{% if enable_thinking is not defined or enable_thinking %}<think>\n{% endif %}{% endif %}",
)


@pytest.mark.parametrize("template", ["llama3", "gemma"])
def test_whitespace_around_the_instruction_under_trimming_templates(template):
    tok = make_tokenizer(template)
    plain = tokenize_prompts(tok, ["Name a color."])
    padded = tokenize_prompts(tok, ["  Name a color.  \n", "Name a color."])
    assert padded.n_post == plain.n_post
    assert padded.input_ids[0].tolist() == padded.input_ids[1].tolist()  # the template trimmed it


def test_template_kwargs_reach_the_template_and_thinking_blocks_are_post_instruction():
    tok = make_tokenizer("chatml")
    tok.chat_template = THINKING
    on = post_instruction_tokens(tok)
    off = post_instruction_tokens(
        tok, PromptFormat(template_kwargs=template_kwargs_json('{"enable_thinking": false}'))
    )
    assert "".join(on).endswith("<think>\n") and "think" not in "".join(off)
    assert len(on) > len(off)


def test_a_pinned_date_keeps_the_prompt_fixed():
    tok = make_tokenizer("llama3")
    tok.chat_template = DATED
    pinned = PromptFormat(template_kwargs=template_kwargs_json({"date_string": "26 Jul 2024"}))
    text = format_prompt(tok, "Name a color.", pinned)
    assert "Today Date: 26 Jul 2024" in text
    assert post_instruction_count(tok, text, "Name a color.") >= 1


def test_dates_in_rendered_prompts_are_detected_for_the_stage_key():
    from refdir.run import pipeline

    assert pipeline._date_free("Today Date: 26 Jul 2024 x") != "Today Date: 26 Jul 2024 x"
    assert pipeline._date_free("no date here") == "no date here"


@pytest.mark.parametrize("bad", ["{not json", "[1, 2]"])
def test_bad_template_kwargs(bad):
    with pytest.raises(RefdirError, match="template-kwargs"):
        template_kwargs_json(bad)


def test_tokenize_prompts_pads_left_and_leaves_the_callers_tokenizer_alone():
    tok = make_tokenizer()
    tok.padding_side = "right"
    b = tokenize_prompts(tok, ["Hi.", "A much longer instruction than the first one, with more words."])
    assert tok.padding_side == "right"
    assert b.attention_mask[0, 0] == 0 and b.attention_mask[0, -1] == 1  # left-padded short row
    assert int(b.attention_mask[1].sum()) == b.attention_mask.shape[1]
