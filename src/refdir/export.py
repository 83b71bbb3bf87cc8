"""Export an orthogonalized model as an ordinary Hugging Face checkpoint (no refdir needed to load)."""

from __future__ import annotations

import json

from pathlib import Path

from . import __version__
from .adapter import get_adapter
from .directions import load_direction
from .errors import RefdirError
from .interventions import orthogonalize_weights
from .io import atomic_dir


def export_orthogonalized(model, tokenizer, direction_src: str | Path, out: str | Path,
                          allow_approximate: bool = False, max_shard_size: str = "2GB") -> Path:
    """Orthogonalize ``model`` in place and save it (safetensors, sharded) with its tokenizer.

    Written to a temporary folder beside ``out`` and renamed at the end, so an interrupted or
    failed export (disk full) leaves nothing behind.
    """
    ad = get_adapter(model)
    spec = getattr(model, "refdir_spec", None)
    direction = load_direction(direction_src, expect_d_model=ad.d_model, expect_model=spec)
    orthogonalize_weights(model, direction.vector, allow_approximate)
    out = Path(out)
    meta = {"refdir": __version__, "source": str(direction_src), "source_model": spec, "layer": direction.layer,
            "pos": direction.pos, "direction_norm": float(direction.vector.norm()),
            "exact": ad.linear_writes, "method": "weight orthogonalization (Arditi et al. 2024, Eq. 5)"}
    try:
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
            tokenizer.save_pretrained(tmp)
            (tmp / "refdir.json").write_text(json.dumps(meta, indent=1) + "\n")
    except OSError as e:
        raise RefdirError(f"export to {out} failed: {e.strerror or e}; nothing was written") from None
    return out



