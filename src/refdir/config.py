"""The run's settings: one dataclass, presets, and a TOML file (``--config run.toml``).

Precedence, lowest first: the defaults here, the preset, the TOML file, the flags given on the command
line. The run folder's ``config.json`` records the resolved result.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .models import DEFAULT_MODEL
from .runtime import BatchPolicy
from .selection import SelectionConfig
from .templates import PromptFormat

PRESETS = {
    # CPU-sized defaults (documented in the README): the paper's sizes, 64 new tokens.
    "default": {},
    "quick": {"n_train": 32, "n_val": 8, "n_eval": 16, "max_new_tokens": 24},
    "paper": {"max_new_tokens": 512, "regenerate_ortho": True},
}


@dataclass
class RunConfig:
    model: str = DEFAULT_MODEL
    harmful: str = "builtin:harmful"
    harmless: str = "builtin:harmless"
    prompt_field: str = "instruction"  # column/key holding the instruction in user files
    eval_harmful: str | None = None  # default: held out from `harmful`
    eval_harmless: str | None = None
    ce_text: str | None = "builtin:harmless_pairs"  # instruction+response text for CE (None: skip)
    n_train: int = 128
    n_val: int = 32
    n_eval: int = 100
    seed: int = 42
    system: str | None = None  # None: the template's own default system prompt
    chat_template: str | None = None  # Jinja template for tokenizers without one
    template_kwargs: str | None = None  # JSON object passed to apply_chat_template ({"enable_thinking": false})
    filter: str = "auto"  # auto | metric | generation | none
    refusal_tokens: list[str] | None = None
    max_new_tokens: int = 64
    regenerate_ortho: bool = False
    judge: str | None = None  # second judge: None, "self" (the model itself) or a classifier's hub id/folder
    min_refusal_rate: float = 0.1
    batch_size: int | None = None  # prompts per forward pass (extraction, KL/CE); None: the batch policy
    # rows per generation batch: a decoding step's matmuls run ~3x faster per row at 200 rows than at 12
    # on this CPU, so the evaluation conditions share batches (KV cache: ~1 GB for the 1.5B at 200 rows)
    gen_batch_size: int | None = None  # None: 200 on the CPU, autotuned on accelerators
    dtype: str = "auto"  # float32 on the CPU, the checkpoint's dtype (bf16 for fp32) on accelerators
    trust_remote_code: bool = False
    device: str = "auto"
    device_map: str | None = None  # auto | balanced | FILE.json: several devices / offload (accelerate)
    max_memory: str | None = None
    revision: str | None = None
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    selection: SelectionConfig = field(default_factory=lambda: SelectionConfig(induce_threshold=None))

    def to_json(self) -> dict:
        d = asdict(self)
        d["selection"] = self.selection.to_json()
        return d

    @property
    def fmt(self) -> PromptFormat:
        return PromptFormat(system=self.system, chat_template=self.chat_template,
                            template_kwargs=self.template_kwargs)

    def batch_policy(self) -> BatchPolicy | None:
        """The user's batch sizes, or None: the runtime's policy (CPU defaults, autotuned on accelerators)."""
        if self.batch_size is None and self.gen_batch_size is None:
            return None
        d = BatchPolicy()
        return BatchPolicy(prompt_rows=self.batch_size or d.prompt_rows, gen_rows=self.gen_batch_size or d.gen_rows,
                           select_rows=self.selection.batch_rows, source="user")

    def load_options(self) -> dict:
        """Keyword arguments of :func:`refdir.models.load_model`."""
        return {"dtype": self.dtype, "device": self.device, "device_map": self.device_map,
                "max_memory": self.max_memory, "revision": self.revision, "load_in_4bit": self.load_in_4bit,
                "load_in_8bit": self.load_in_8bit, "trust_remote_code": self.trust_remote_code}
