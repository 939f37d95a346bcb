"""Data: sources (ShareGPT, the paper's tasks, local files, tokenized files), chat rendering and masking, splits,
collation and evaluation prompts (`datasets`, re-exported here); the target's own answers (`regen`). Imports
`models` (regen runs the target), `config` and `io`."""

from adaspec_eagle.data.datasets import *  # noqa: F401,F403
