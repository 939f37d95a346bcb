"""Export heads to the layouts EAGLE, SGLang and vLLM load (`layouts`, re-exported here)."""

from adaspec_eagle.export.layouts import *  # noqa: F401,F403
