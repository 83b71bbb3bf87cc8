"""Type names for the model and tokenizer objects refdir's functions take, for annotations only.

Any Hugging Face causal LM (a ``PreTrainedModel``, dense or MoE, possibly dispatched over devices or
quantized) and its tokenizer. Resolved only under type checking, so importing this costs nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    Model = PreTrainedModel
    Tokenizer = PreTrainedTokenizerBase
else:
    Model = Any
    Tokenizer = Any
