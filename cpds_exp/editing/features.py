"""Capture of the UNet's self-attention outputs for the CUT loss (SPEC §3).

Chosen layers get a diffusers ``AttnProcessor2_0`` (scaled_dot_product_attention) that also
keeps its output, so the features come out of the same forward pass that predicts the noise.
"""
from __future__ import annotations

import fnmatch
from typing import Sequence

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from cpds_exp.errors import CpdsError

#: The self-attention layers of SD's up blocks: up_blocks.{1,2,3}.attentions.{0,1,2}...attn1.
DEFAULT_CUT_LAYERS = ("up_blocks.*.attn1",)


class CapturingAttnProcessor(AttnProcessor2_0):
    """diffusers' SDPA attention that records the layer output (after the output projection)."""

    def __init__(self, store: dict[str, torch.Tensor], name: str):
        super().__init__()
        self.store = store
        self.name = name

    def __call__(self, attn, hidden_states, *args, **kwargs):
        output = super().__call__(attn, hidden_states, *args, **kwargs)
        self.store[self.name] = output
        return output


def match_layers(unet: torch.nn.Module, patterns: Sequence[str]) -> list[str]:
    """Attention-module names (without '.processor') that match any glob pattern."""
    names = [name.removesuffix(".processor") for name in unet.attn_processors]
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not chosen:
        raise CpdsError(
            f"cut_layers={list(patterns)} matches no attention layer; "
            f"try a pattern such as 'up_blocks.*.attn1' (layers look like '{names[0]}')"
        )
    return chosen


class FeatureCapture:
    """Installs capturing processors on the chosen layers and SDPA processors elsewhere.

    After each UNet call, :meth:`features` returns the chosen layers' outputs of that call
    in forward order.
    """

    def __init__(self, unet: torch.nn.Module, patterns: Sequence[str] = DEFAULT_CUT_LAYERS):
        self.layers = match_layers(unet, patterns)
        self._store: dict[str, torch.Tensor] = {}
        chosen = set(self.layers)
        processors = {}
        for key in unet.attn_processors:
            name = key.removesuffix(".processor")
            processors[key] = CapturingAttnProcessor(self._store, name) if name in chosen else AttnProcessor2_0()
        unet.set_attn_processor(processors)

    def features(self) -> list[torch.Tensor]:
        """The last call's outputs of the chosen layers, each (B, HW, C)."""
        missing = [n for n in self.layers if n not in self._store]
        if missing:
            raise RuntimeError(f"no features were captured for {missing}: run the UNet first")
        return [self._store[n] for n in self.layers]

    def clear(self) -> None:
        """Drop the stored tensors (and the graphs they hold)."""
        self._store.clear()
