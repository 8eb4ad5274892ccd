"""Hypothesis profiles for the fuzz tests: a quick default that keeps the
suite fast, and ``long`` for a deliberate fuzzing run (docs/fuzzing.md)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# Default: a few hundred messages per property, a few seconds in all.
settings.register_profile("default", max_examples=150, deadline=None)
# CI can raise the volume without slowing developers down.
settings.register_profile("ci", max_examples=1000, deadline=None, print_blob=True)
# A long fuzz: HYPOTHESIS_PROFILE=long (and HYPOTHESIS_MAX_EXAMPLES to taste).
settings.register_profile(
    "long",
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "200000")),
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
