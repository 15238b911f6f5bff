"""Test-wide settings: the test suites' own model factories are trusted when artifacts are loaded."""

from __future__ import annotations

import os

# Artifacts whose base is `tiny_models:...` (and the other test factories) rebuild through that
# factory; outside tests a factory base needs explicit trust (see surgery.artifacts.load).
os.environ.setdefault("SURGERY_TRUSTED_FACTORIES", "tiny_models,cli_models,engine_helpers")
