"""Shared pytest configuration.

Hypothesis explores new examples on every local run (which finds bugs); under CI (the CI
environment variable is set) it is derandomized, so a CI run is reproducible.
"""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
