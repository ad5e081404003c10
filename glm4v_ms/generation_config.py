"""Generation settings: generation_config.json's defaults, a call's overrides, and the thinking tags' ids.

Plain host-side data, read by every engine (generate, beam search, the server's engine) and by the faces.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields, replace


class GenerationError(ValueError):
    """Bad generation arguments, or a prompt that does not fit the model's context."""


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 8192   # the official demo's: a thinking model needs room
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0               # 0: off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_id: tuple = ()
    pad_token_id: int | None = None
    max_thinking_tokens: int | None = None
    seed: int | None = None

    @classmethod
    def from_pretrained(cls, folder: str, fallback_eos=()) -> "GenerationConfig":
        """Defaults from generation_config.json (eos ids, sampling); the config's eos ids where it has none."""
        d = {}
        p = os.path.join(folder, "generation_config.json")
        if os.path.isfile(p):
            try:
                with open(p, encoding="utf-8") as f:
                    d = json.load(f)
            except (OSError, ValueError) as e:
                raise GenerationError(f"{p}: not valid JSON ({e})") from None
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known and v is not None}
        eos = kw.get("eos_token_id", fallback_eos)
        kw["eos_token_id"] = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        return cls(**kw)

    def updated(self, **kw) -> "GenerationConfig":
        kw = {k: v for k, v in kw.items() if v is not None}
        unknown = set(kw) - {f.name for f in fields(self)}
        if unknown:
            raise GenerationError(f"unknown generation argument(s): {', '.join(sorted(unknown))}")
        if "eos_token_id" in kw and not isinstance(kw["eos_token_id"], (list, tuple)):
            kw["eos_token_id"] = (kw["eos_token_id"],)
        cfg = replace(self, **kw)
        cfg.validate()
        return cfg

    def validate(self):
        checks = [(self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
                  (self.min_new_tokens >= 0, "min_new_tokens must be >= 0"),
                  (not self.do_sample or self.temperature > 0, "temperature must be > 0 when sampling"),
                  (self.top_k >= 0, "top_k must be >= 0"), (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
                  (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
                  (self.max_thinking_tokens is None or self.max_thinking_tokens >= 0, "max_thinking_tokens must be >= 0")]
        for ok, msg in checks:
            if not ok:
                raise GenerationError(msg)


def thinking_ids(folder: str) -> dict:
    """Ids of <think>, </think>, <answer>, </answer> from the checkpoint's tokenizer.json (added tokens)."""
    p = os.path.join(folder, "tokenizer.json")
    try:
        with open(p, encoding="utf-8") as f:
            added = json.load(f).get("added_tokens", [])
    except (OSError, ValueError):
        return {}
    want = {"<think>", "</think>", "<answer>", "</answer>"}
    return {t["content"]: t["id"] for t in added if t.get("content") in want}


def thinking_force(cfg: GenerationConfig, think_ids: dict | None) -> list:
    """The ids the thinking budget forces (</think>, then <answer> where the tokenizer has it), or []."""
    if cfg.max_thinking_tokens is None:
        return []
    think_ids = think_ids or {}
    if "</think>" not in think_ids:
        raise GenerationError("max_thinking_tokens needs the </think> token id (not in the tokenizer)")
    return [think_ids["</think>"]] + ([think_ids["<answer>"]] if "<answer>" in think_ids else [])
