"""A run: the settings schema (flags, presets, TOML), the run folder and the stage table over it."""
