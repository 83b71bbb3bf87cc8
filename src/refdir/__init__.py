"""refdir: find, test and use the refusal direction of chat language models.

Arditi et al., "Refusal in Language Models Is Mediated by a Single Direction" (NeurIPS 2024).
"""

__version__ = "0.1.0"

from .adapter import ModelAdapter, get_adapter  # noqa: E402
from .activations import mean_activations  # noqa: E402
from .data import Prompt, load_prompts  # noqa: E402
from .directions import Direction, candidate_directions, load_direction  # noqa: E402
from .errors import RefdirError  # noqa: E402
from .interventions import activation_addition, directional_ablation, orthogonalize_weights  # noqa: E402
from .models import load_model  # noqa: E402
from .refusal import generate, is_refusal, refusal_metric  # noqa: E402
from .selection import SelectionConfig, select_direction  # noqa: E402
from .templates import PromptFormat, tokenize_prompts  # noqa: E402

__all__ = [
    "ModelAdapter", "get_adapter", "mean_activations", "Prompt", "load_prompts", "Direction",
    "candidate_directions", "load_direction", "RefdirError", "activation_addition", "directional_ablation",
    "orthogonalize_weights", "load_model", "generate", "is_refusal", "refusal_metric", "SelectionConfig",
    "select_direction", "PromptFormat", "tokenize_prompts",
]
