"""What the UNet is conditioned on, for a batch of prompts, whatever the Stable Diffusion version.

SD 1.x and 2.x read the text encoder's hidden states alone; SDXL also reads a pooled text embedding
and six "time ids" (original size, crop corner, target size) through diffusers' ``added_cond_kwargs``.
One type carries both, so the editor batches and concatenates conditions without knowing which.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch


@dataclass
class Conditioning:
    """``hidden``: (B, tokens, width) text states; ``added``: SDXL's ``text_embeds`` (B, pooled width) and
    ``time_ids`` (B, 6), empty for SD 1.x/2.x."""

    hidden: torch.Tensor
    added: dict[str, torch.Tensor] = field(default_factory=dict)

    @staticmethod
    def cat(parts: Sequence["Conditioning"]) -> "Conditioning":
        """Rows of several conditions, in order (the branches of one UNet call)."""
        added = {key: torch.cat([part.added[key] for part in parts]) for key in parts[0].added}
        return Conditioning(torch.cat([part.hidden for part in parts]), added)

    def __getitem__(self, rows: slice) -> "Conditioning":
        return Conditioning(self.hidden[rows], {key: value[rows] for key, value in self.added.items()})

    def to(self, *args: Any, **kwargs: Any) -> "Conditioning":
        """Every tensor moved or cast as ``torch.Tensor.to`` would."""
        return Conditioning(self.hidden.to(*args, **kwargs), {k: v.to(*args, **kwargs) for k, v in self.added.items()})

    def unet_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``UNet2DConditionModel.forward`` that carry this condition."""
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.hidden}
        if self.added:
            kwargs["added_cond_kwargs"] = self.added
        return kwargs


def sdxl_time_ids(batch: int, height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """SDXL's micro-conditioning as its pipeline sets it by default: original size = target size =
    the image's, crop corner (0, 0)."""
    ids = torch.tensor([height, width, 0, 0, height, width], device=device, dtype=dtype)
    return ids.expand(batch, 6).clone()


def random_conditioning(unet_config: Any, batch: int, resolution: int, device: torch.device | str,
                        dtype: torch.dtype) -> Conditioning:
    """A condition of the shapes a UNet reads (its config: cross-attention width and, for SDXL-style
    ``addition_embed_type: text_time``, the pooled width), with random values: benchmarks and estimates."""
    hidden = torch.randn(batch, 77, unet_config.cross_attention_dim, device=device, dtype=dtype)
    if unet_config.addition_embed_type is None:
        return Conditioning(hidden)
    if unet_config.addition_embed_type != "text_time":
        raise ValueError(f"addition_embed_type={unet_config.addition_embed_type!r} is not supported")
    pooled = unet_config.projection_class_embeddings_input_dim - 6 * unet_config.addition_time_embed_dim
    return Conditioning(hidden, {"text_embeds": torch.randn(batch, pooled, device=device, dtype=dtype),
                                 "time_ids": sdxl_time_ids(batch, resolution, resolution, torch.device(device), dtype)})
