"""Foundations every stage stands on: errors, atomic I/O, model loading and placement, the
architecture adapter, prompt formats, batched forwards with a shared-prefix cache, and the ``Runtime``
that carries them."""
