"""The speculative-decoding engine: token trees (`tree`), verification (`verify`), drafters and the generate loops
and budget tuner (`speculative`), the transformers cache adapter (`compat`) and the CPU routing of small-batch
linear layers (`linear_routing`). Imports `models`, `config` and `io` only."""
