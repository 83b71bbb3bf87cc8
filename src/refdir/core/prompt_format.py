"""The prompt format: everything that decides the exact token sequence a model sees, torch-free.

Its own module because both the settings schema (torch-free, for ``refdir --help``) and the template
code (which tokenizes) need it: keeping it in either made the two import each other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from refdir.core.errors import RefdirError

SYSTEM_DEFAULT = None  # the template's own default (Qwen inserts one); "" gives an empty system turn


def canonical_json_object(text, flag: str = "--template-kwargs") -> str | None:
    """A JSON object given as text (or a dict) as canonical JSON (sorted keys); None for an empty one."""
    if text is None or text == "" or text == {}:
        return None
    try:
        obj = json.loads(text) if isinstance(text, str) else text
    except ValueError as e:
        raise RefdirError(f"{flag} is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise RefdirError(f"{flag} must be a JSON object, e.g. '{{\"enable_thinking\": false}}'")
    return json.dumps(obj, sort_keys=True)


@dataclass(frozen=True)
class PromptFormat:
    """Everything that decides the exact token sequence a model sees; recorded in every run."""

    system: str | None = SYSTEM_DEFAULT
    chat_template: str | None = None  # user-supplied Jinja template when the tokenizer has none
    template_kwargs: str | None = None  # JSON object of extra apply_chat_template variables

    def to_json(self) -> dict:
        out = {"system": self.system, "chat_template": self.chat_template}
        if self.template_kwargs:  # only when set: older run folders keep their stage keys
            out["template_kwargs"] = json.loads(self.template_kwargs)
        return out

    def kwargs(self) -> dict:
        return json.loads(self.template_kwargs) if self.template_kwargs else {}
