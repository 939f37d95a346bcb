"""adaspec-eagle: AdaSPEC selective knowledge distillation for speculative-decoding drafters.

Two drafter kinds (EAGLE-style feature-level heads on a frozen target, and standalone small draft LMs),
trained with the AdaSPEC loss and run by one lossless tree-based speculative decoding engine.
"""

__version__ = "0.1.0"


class AdaspecError(Exception):
    """A predictable user mistake: the message names the problem and the fix. The CLI prints it without a
    traceback and exits with status 2."""
