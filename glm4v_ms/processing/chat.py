"""Chat template rendering, the tokenizer wrapper, and the thinking/answer helpers.

The template is rendered with jinja2 the way transformers renders it (sandboxed, trim_blocks, lstrip_blocks,
loopcontrols, its `tojson` / `raise_exception` / `strftime_now` helpers, the special tokens as variables).
The tokenizer is the checkpoint's tokenizer.json run by the `tokenizers` library directly.
"""
from __future__ import annotations

import json
import os
import warnings
from datetime import datetime
from functools import lru_cache

import numpy as np

from .errors import ProcessorError
from .reply import split


@lru_cache(maxsize=8)
def _compile(template):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        from jinja2.exceptions import TemplateError

        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters; templates expect plain JSON
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat(template, messages, add_generation_prompt=False, **variables):
    """One conversation -> the prompt string. Keys whose value is None are dropped first, as transformers does."""
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)


class Tokenizer:
    """tokenizer.json + tokenizer_config.json, with the few methods the processor and generation need."""

    def __init__(self, path_or_dir):
        from tokenizers import Tokenizer as _Tokenizer

        folder = path_or_dir if os.path.isdir(path_or_dir) else os.path.dirname(path_or_dir)
        file = os.path.join(folder, "tokenizer.json") if os.path.isdir(path_or_dir) else path_or_dir
        if not os.path.isfile(file):
            raise ProcessorError(f"no tokenizer.json in {folder}")
        self._tok = _Tokenizer.from_file(file)
        self._tok.no_padding()
        self._tok.no_truncation()
        config_file = os.path.join(folder, "tokenizer_config.json")
        self.config = json.load(open(config_file, encoding="utf-8")) if os.path.isfile(config_file) else {}
        self.eos_token = _content(self.config.get("eos_token")) or "<|endoftext|>"
        self.pad_token = _content(self.config.get("pad_token")) or self.eos_token
        self.padding_side = self.config.get("padding_side", "left")
        self.truncation_side = self.config.get("truncation_side", "right")
        self.model_max_length = int(self.config.get("model_max_length") or 10**30)   # as transformers: no limit
        self.bos_token = _content(self.config.get("bos_token"))
        self.eos_token_id = self.token_to_id(self.eos_token)
        self.pad_token_id = self.token_to_id(self.pad_token)
        self.chat_template = self.config.get("chat_template")
        # transformers hands the special tokens to the template as variables
        self.template_variables = {k: _content(self.config[k]) for k in ("eos_token", "pad_token", "bos_token",
                                                                         "unk_token") if self.config.get(k)}
        extra = self.config.get("additional_special_tokens") or self.config.get("extra_special_tokens")
        if isinstance(extra, list):
            self.template_variables["additional_special_tokens"] = [_content(t) for t in extra]

    def __len__(self):
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token):
        return self._tok.token_to_id(token)

    def convert_tokens_to_ids(self, tokens):
        return self.token_to_id(tokens) if isinstance(tokens, str) else [self.token_to_id(t) for t in tokens]

    def encode(self, text, add_special_tokens=True):
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts, add_special_tokens=True):
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=None):
        text = self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=skip_special_tokens)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.config.get("clean_up_tokenization_spaces", False)
        if not clean_up_tokenization_spaces:
            return text
        if type(self._tok.model).__name__ == "BPE" and not self.config.get(
                "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"):
            # as transformers 5: the clean-up was made for WordPiece and deletes real spaces from BPE output
            warnings.warn("clean_up_tokenization_spaces=True is ignored for this BPE tokenizer (as transformers "
                          "does): it would strip real spaces before punctuation", stacklevel=3)
            return text
        return _clean_up(text)

    def batch_decode(self, sequences, skip_special_tokens=False, clean_up_tokenization_spaces=None):
        return [self.decode(s, skip_special_tokens, clean_up_tokenization_spaces) for s in sequences]

    def pad(self, sequences, padding_side=None, length=None):
        """Lists of ids -> (input_ids, attention_mask) int64 arrays, padded with the pad id to `length`
        (default: the longest)."""
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ProcessorError(f"padding_side must be 'left' or 'right', got {side!r}")
        n = max([len(s) for s in sequences] + [length or 0])
        ids = np.full((len(sequences), n), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(sequences), n), dtype=np.int64)
        for row, s in enumerate(sequences):
            sl = slice(n - len(s), n) if side == "left" else slice(0, len(s))
            ids[row, sl], mask[row, sl] = s, 1
        return ids, mask


_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def _clean_up(text):
    """transformers' clean_up_tokenization_spaces: drop the space a word-level tokenizer left before punctuation."""
    for a, b in _CLEAN_UP:
        text = text.replace(a, b)
    return text


def _content(token):
    return token.get("content") if isinstance(token, dict) else token


# --- thinking / answer -------------------------------------------------------------------------------------

def split_thinking(text):
    """A generated `<think>...</think><answer>...</answer>` -> (thinking, answer), both stripped (reply.split's
    rule: GLM-4.5V's answer without <answer> tags too).

    Tolerates what generation cuts short or leaves out: no closing `</think>` (all of it is thinking, no
    answer yet), no `<answer>` tags (the answer is whatever follows `</think>`), no `<think>` at all (all answer).
    """
    thinking, answer = split(text)
    return thinking.strip(), answer.strip()


def strip_thinking(message_or_text):
    """Drop the thinking from an assistant turn before it goes back into the history (as the official demo does).

    A string gives the answer string; a message dict gives a copy with its content (string or text items)
    reduced to the answer. Other roles are returned unchanged.
    """
    if isinstance(message_or_text, str):
        return split_thinking(message_or_text)[1]
    message = dict(message_or_text)
    if message.get("role") != "assistant":
        return message
    content = message.get("content")
    if isinstance(content, str):
        message["content"] = split_thinking(content)[1]
    elif isinstance(content, list):
        message["content"] = [
            {**item, "text": split_thinking(item["text"])[1]} if item.get("type") == "text" else item
            for item in content
        ]
    return message
