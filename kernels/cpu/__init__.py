"""Native CPU masked optimizer steps: ``fused_steps.c`` (vectorised C with OpenMP), compiled on
first use by ``build``, launched through ``launch`` by the ops ``sgd_step`` and ``adam_step``."""
