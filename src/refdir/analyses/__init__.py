"""Analyses beyond one direction: the refusal cone, the refusal monitor, GCG suffixes and how they
suppress the direction, base vs chat."""
