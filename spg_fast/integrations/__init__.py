"""Callbacks that run SPG inside training frameworks: ``spg_fast.integrations.lightning``
(Lightning) and ``spg_fast.integrations.transformers`` (the Hugging Face ``Trainer``).

Each submodule imports its framework when it is imported itself, never before: ``import spg_fast``
(and this package) imports neither. Install them with the ``lightning`` and ``transformers`` extras.
"""
