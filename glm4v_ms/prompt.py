"""One prompt as the inner code reads it: the processor's output made into one typed record at the two doors
(`model.generate`, `Engine.submit`), so that nothing below them picks a dict apart again.

Rows are left-padded (the processor's rule): `mask` marks the real tokens, and a row's real ids are
`ids[b][mask[b]]`. Images are counted over the whole batch in order: image k has grid `image_grid[k]` and the
patches `pixel_values[edges[k]:edges[k + 1]]`. `media` names, per row, each image's run of tokens among the row's
real ids with a digest of its grid and pixels: what tells two images with the same grid (hence the same token ids)
apart when a cached prefix is matched.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from . import rope
from .shapes import host_array

# the processor's outputs a prompt is made of; the rest (token types, video metadata) follow from these
KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
        "inputs_embeds")


@dataclass
class Prompt:
    ids: np.ndarray                            # (B, L) int64; -1 where only embeddings were given
    mask: np.ndarray                           # (B, L) bool: the real tokens
    marks: tuple                               # (image token, video start, video end) ids: the token types
    pixel_values: np.ndarray | None = None     # (patches, C*T*P*P), every image of the batch in order
    image_grid: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int64))   # (images, 3): t, h, w
    pixel_values_videos: np.ndarray | None = None
    video_grid: np.ndarray | None = None       # (videos, 3)
    inputs_embeds: np.ndarray | None = None    # (B, L, D)
    given_ids: bool = True                     # False: inputs_embeds alone (generate returns the new tokens only)

    @classmethod
    def of(cls, config, inputs: dict) -> "Prompt":
        """The record of a processor output (or generate()'s arguments); keys outside KEYS are ignored."""
        ids, embeds = host_array(inputs.get("input_ids"), np.int64), host_array(inputs.get("inputs_embeds"))
        if ids is None and embeds is None:
            raise ValueError("generate needs input_ids or inputs_embeds")
        if embeds is not None:
            B, L = embeds.shape[:2]
            if ids is not None and ids.reshape(B, -1).shape[1] != L:
                raise ValueError(f"input_ids have {ids.reshape(B, -1).shape[1]} tokens, inputs_embeds {L}")
        given = ids is not None
        ids = np.full(embeds.shape[:2], -1, np.int64) if ids is None else (ids[None] if ids.ndim == 1 else ids)
        B, L = ids.shape
        mask = host_array(inputs.get("attention_mask"))
        mask = np.ones((B, L), bool) if mask is None else mask.reshape(B, L) > 0
        grid = host_array(inputs.get("image_grid_thw"), np.int64)
        vgrid = host_array(inputs.get("video_grid_thw"), np.int64)
        return cls(ids, mask, (config.image_token_id, config.video_start_token_id, config.video_end_token_id),
                   host_array(inputs.get("pixel_values")), np.zeros((0, 3), np.int64) if grid is None else
                   grid.reshape(-1, 3), host_array(inputs.get("pixel_values_videos")),
                   None if vgrid is None else vgrid.reshape(-1, 3), embeds, given)

    @property
    def shape(self) -> tuple:
        return self.ids.shape

    def real(self, b: int) -> np.ndarray:
        """Row b's real ids (its padding dropped)."""
        return self.ids[b][self.mask[b]]

    @cached_property
    def edges(self) -> np.ndarray:
        """Image k's patches are pixel_values[edges[k]:edges[k + 1]]."""
        return np.concatenate([[0], np.cumsum(self.image_grid.prod(-1))]).astype(np.int64)

    def images(self, which) -> tuple:
        """(pixels, grid) of images `which` (indices over the batch), or (None, None) for none."""
        if not len(which):
            return None, None
        e = self.edges
        return np.concatenate([self.pixel_values[e[k]:e[k + 1]] for k in which]), self.image_grid[list(which)]

    @cached_property
    def media(self) -> list:
        """Per row, [(start, end, digest, k)]: image k's tokens are the row's real ids [start, end)."""
        out, k = [], 0
        for b in range(self.shape[0]):
            img = rope.token_types(self.real(b), *self.marks) == rope.IMAGE
            starts = np.nonzero(img & ~np.r_[False, img[:-1]])[0]
            ends = np.nonzero(img & ~np.r_[img[1:], False])[0] + 1
            row = []
            for a, e in zip(starts, ends):
                digest = None
                if self.pixel_values is not None and k < len(self.image_grid):
                    digest = hashlib.blake2b(self.image_grid[k].tobytes() + np.ascontiguousarray(
                        self.pixel_values[self.edges[k]:self.edges[k + 1]]).tobytes(), digest_size=16).digest()
                row.append((int(a), int(e), digest, k))
                k += 1
            out.append(row)
        return out

    def network_inputs(self) -> dict:
        """The network's prompt arguments (model.prompt)."""
        return dict(input_ids=self.ids, attention_mask=self.mask, pixel_values=self.pixel_values,
                    image_grid_thw=self.image_grid if len(self.image_grid) else None,
                    pixel_values_videos=self.pixel_values_videos, video_grid_thw=self.video_grid,
                    inputs_embeds=self.inputs_embeds)
