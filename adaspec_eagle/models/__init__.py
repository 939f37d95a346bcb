"""Models: the registry and loader, tokenizer and target-identity checks, target features and tiny test models
(`registry`, re-exported here); EAGLE heads (`heads`); draft LMs (`draft_lm`). Imports only `config` and `io`."""

from adaspec_eagle.models.registry import *  # noqa: F401,F403
