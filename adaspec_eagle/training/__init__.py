"""Training: the AdaSPEC and KD losses (`losses`), the Accelerate training loop (`loop`), the target-feature cache
(`features`), the head pipeline and its held-out evaluation (`head`) and the draft-LM pipeline (`draft_lm`)."""
