"""What the transformers face returns, as transformers' output records: `Output` (a forward: logits, rope deltas,
the loss with labels) and `GenerateOutput` (generate with return_dict_in_generate). A floor below the model and
the engines, so that the training forward (finetune/forward.py) and beam search return them without importing
model.py or generation.py."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Output:
    logits: object               # (B, L, vocab) mindspore Tensor
    rope_deltas: np.ndarray      # (B,)
    loss: object = None          # with labels: the mean cross-entropy over the shifted trained tokens (a Tensor)


@dataclass
class GenerateOutput:
    """transformers' GenerateDecoderOnlyOutput, as far as this port goes: sequences (B, prompt + new); ours:
    timings (prefill_s, first_step_s, decode_s, decode_steps, new_tokens, prompt_tokens, reused_tokens)."""
    sequences: np.ndarray
    timings: dict = field(default_factory=dict)

    def __getitem__(self, key):   # out["sequences"] as well as out.sequences, as transformers' ModelOutput
        return getattr(self, key)
