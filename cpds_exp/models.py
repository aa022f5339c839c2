"""Stable Diffusion components: loaded from the hub or a local folder, or built tiny offline.

Both paths produce an :class:`SDStack`. The tiny stack has SD's shape (cross-attention up
blocks, an 8× VAE, a CLIP text encoder with the real CLIP tokenizer, SD's noise schedule) with
seeded random weights, so the whole framework runs and is tested without a network.
"""
from __future__ import annotations

import contextlib
import gzip
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from typing import Sequence

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from cpds_exp.errors import CpdsError
from cpds_exp.hub import SD_DOWNLOAD_SIZE, is_hub_id, offline_reason, one_line, weights_unavailable

CLIP_VOCAB_SIZE = 49408

#: SD v1.x's training noise schedule (SPEC §1).
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@dataclass
class SDStack:
    """The pieces of Stable Diffusion an edit needs, on one device and dtype."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDPMScheduler
    device: torch.device
    dtype: torch.dtype
    resolution: int

    @property
    def latent_scale(self) -> float:
        return self.vae.config.scaling_factor

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    # the SD operations every user of a stack shares (the editor, the extraction scores)
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP text-encoder hidden states, padded to the tokenizer's length as SD's pipeline does."""
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                                max_length=self.tokenizer.model_max_length, return_tensors="pt")
        return self.text_encoder(tokens.input_ids.to(self.device))[0]

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [−1, 1] → float32 latents (the posterior mean, scaled)."""
        x = images.to(self.device, self.dtype)
        return self.vae.encode(x).latent_dist.mean.float() * self.latent_scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → (B, 3, H, W) images in [0, 1], on the stack's device."""
        x = self.vae.decode((latents.to(self.device) / self.latent_scale).to(self.dtype)).sample
        return (x.float() / 2 + 0.5).clamp(0, 1)

    def freeze(self) -> "SDStack":
        """No parameter requires grad; only the latent is optimised."""
        for module in (self.unet, self.vae, self.text_encoder):
            module.requires_grad_(False).eval()
        return self

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write a diffusers-layout folder that :func:`load_stack` reads back."""
        folder = Path(folder)
        for sub, part in [("unet", self.unet), ("vae", self.vae), ("text_encoder", self.text_encoder),
                          ("tokenizer", self.tokenizer), ("scheduler", self.scheduler)]:
            part.save_pretrained(folder / sub)
        (folder / "model_index.json").write_text(json.dumps({
            "_class_name": "StableDiffusionPipeline",
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "DDPMScheduler"],
            "safety_checker": [None, None], "feature_extractor": [None, None],
        }, indent=2))


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when present; anything else is passed to torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise CpdsError(f"device={device!r} is not a torch device: use auto, cpu or cuda[:N]") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise CpdsError(f"device={device} but CUDA is not available here: use device=cpu")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' is float16 on CUDA and float32 elsewhere (SD's published settings)."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise CpdsError(f"dtype={dtype!r} is unknown: use auto, float32, float16 or bfloat16")
    return names[dtype]


def offline_clip_tokenizer(cache_dir: str | os.PathLike | None = None) -> CLIPTokenizer:
    """SD's CLIP tokenizer built from the BPE merges that open_clip ships (no download).

    The vocabulary is the 256 byte symbols, the same with '</w>', the 48,894 merges joined,
    then the start and end tokens: 49,408 entries, the ids of openai/clip-vit-large-patch14.
    """
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode

    folder = Path(cache_dir or Path(tempfile.gettempdir()) / "cpds_exp_clip_tokenizer")
    if not (folder / "vocab.json").exists():
        bpe_path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
        lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1: CLIP_VOCAB_SIZE - 512 - 2 + 1]]
        symbols = list(bytes_to_unicode().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder))
        (staging / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
        (staging / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        for name in ("merges.txt", "vocab.json"):  # vocab.json last: it marks the folder complete
            os.replace(staging / name, folder / name)
        staging.rmdir()
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), pad_token="<|endoftext|>", model_max_length=77)
    _check_tokenizer(tokenizer, str(folder))
    return tokenizer


def _check_tokenizer(tokenizer: CLIPTokenizer, source: str) -> None:
    """transformers can hand back a 2-token tokenizer instead of failing; refuse it."""
    if len(tokenizer) != CLIP_VOCAB_SIZE:
        raise CpdsError(f"the CLIP tokenizer from {source} has {len(tokenizer)} tokens, not {CLIP_VOCAB_SIZE}: "
                        "the download is incomplete; delete it from the cache and retry, or use model=tiny")


def build_tiny(seed: int = 0) -> SDStack:
    """An SD-shaped stack (~2 M parameters) with seeded random weights, built in well under a second."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64), norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1,
        block_out_channels=(8, 16, 16, 16), norm_num_groups=8, scaling_factor=0.18215,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    stack = SDStack(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=offline_clip_tokenizer(),
                    scheduler=DDPMScheduler(**SD_SCHEDULE), device=torch.device("cpu"),
                    dtype=torch.float32, resolution=64)
    return stack.freeze()


def load_pretrained(pretrained: str, revision: str | None = None) -> SDStack:
    """Load the SD components of a hub id or a local diffusers folder, in float32 on the CPU.

    Offline (see :mod:`cpds_exp.hub`), a hub id loads from the cache at once or fails at once."""
    from diffusers.utils import is_accelerate_available

    local = Path(pretrained).expanduser().is_dir()
    if not local and not is_hub_id(pretrained):
        raise CpdsError(f"cannot load model {pretrained!r}: there is no such folder and it is not a hub id such as "
                        f"CompVis/stable-diffusion-v1-4; check model.pretrained, or use model=tiny for an offline run")
    offline = None if local else offline_reason()
    kwargs = dict(revision=revision) if revision else {}
    kwargs["local_files_only"] = offline is not None
    # without accelerate, diffusers' default (low_cpu_mem_usage=True) falls back with a notice per component
    diffusers_kwargs = dict(kwargs, low_cpu_mem_usage=is_accelerate_available())
    try:
        with quiet_loading():
            unet = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", **diffusers_kwargs)
            vae = AutoencoderKL.from_pretrained(pretrained, subfolder="vae", **diffusers_kwargs)
            text_encoder = CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", **kwargs)
            tokenizer = CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer", **kwargs)
            scheduler = DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler", **kwargs)
    except (OSError, ValueError) as err:
        if offline:
            raise weights_unavailable(f"model {pretrained!r}", SD_DOWNLOAD_SIZE, offline,
                                      ", or model.pretrained=/path/to/a/diffusers/folder") from err
        where = "the folder" if local else "the hub"
        raise CpdsError(f"cannot load model {pretrained!r}: {where} refused it ({one_line(err)}); check "
                        "model.pretrained (a hub id or a local diffusers folder), or use model=tiny for an offline run"
                        ) from err
    _check_tokenizer(tokenizer, pretrained)
    resolution = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    return SDStack(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                   device=torch.device("cpu"), dtype=torch.float32, resolution=resolution).freeze()


@contextlib.contextmanager
def quiet_loading():
    """Loading SD printed, per component, huggingface_hub's warning about an argument diffusers still
    passes and transformers' "Loading weights" bar: nothing a user can act on."""
    from transformers.utils import logging as transformers_logging

    bar_was_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The `local_dir_use_symlinks` argument is deprecated",
                                    category=UserWarning)
            yield
    finally:
        if bar_was_on:
            transformers_logging.enable_progress_bar()


def load_stack(pretrained: str | None, device: str = "auto", dtype: str = "auto", seed: int = 0,
               revision: str | None = None) -> SDStack:
    """The one entry point: ``pretrained`` None builds the tiny stack, else loads it; then moves it."""
    target_device = resolve_device(device)
    target_dtype = resolve_dtype(dtype, target_device)
    stack = build_tiny(seed) if pretrained is None else load_pretrained(pretrained, revision)
    for module in (stack.unet, stack.vae, stack.text_encoder):
        module.to(target_device)
        if target_dtype != torch.float32:  # building and loading give float32
            module.to(target_dtype)
    stack.device, stack.dtype = target_device, target_dtype
    return stack
