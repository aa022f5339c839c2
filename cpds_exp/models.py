"""Stable Diffusion components: loaded from the hub or a local folder, or built tiny offline.

Both paths produce an :class:`SDStack`, of SD 1.x/2.x (one text encoder) or SDXL (two text
encoders, pooled embeddings and time ids), read from the folder's model_index.json. The stack turns
prompts into a :class:`~cpds_exp.conditioning.Conditioning` and any UNet output (ε, v or x₀, the
scheduler's ``prediction_type``) into ε, so the editor and the loss terms are the same for every
model. The tiny stacks have SD's or SDXL's shape with seeded random weights, so the whole
framework runs and is tested without a network.
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

from typing import Any, Sequence

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from cpds_exp.conditioning import Conditioning, sdxl_time_ids
from cpds_exp.errors import CpdsError
from cpds_exp.hub import download_size, is_hub_id, offline_reason, one_line, weights_unavailable
from cpds_exp.scores import PREDICTION_TYPES, to_epsilon

CLIP_VOCAB_SIZE = 49408

#: SD v1.x's training noise schedule (SPEC §1); SD 2.x and SDXL train on the same betas.
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

#: The architectures a stack can have: SD 1.x/2.x (one CLIP text encoder) and SDXL.
ARCHITECTURES = ("sd", "sdxl")

#: The diffusers unet/config.json of SD v1.4, SD 2.1 (768², v-prediction) and SDXL base 1.0, shipped so
#: that their exact UNets can be built with random weights offline (benchmarks, estimates).
UNET_CONFIGS = {name: Path(__file__).parent / "resources" / f"{name}_unet.json" for name in ("sd14", "sd21", "sdxl")}


def unet_config(name: str) -> dict[str, Any]:
    return json.loads(UNET_CONFIGS[name].read_text())


@dataclass
class SDStack:
    """The pieces of Stable Diffusion an edit needs, on one device and dtype. SDXL stacks also have
    ``text_encoder_2``/``tokenizer_2`` and, as SDXL's pipeline, use zeros for the empty prompt."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDPMScheduler
    device: torch.device
    dtype: torch.dtype
    resolution: int
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None
    force_zeros_for_empty_prompt: bool = False

    @property
    def latent_scale(self) -> float:
        return self.vae.config.scaling_factor

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def architecture(self) -> str:
        return "sdxl" if self.text_encoder_2 is not None else "sd"

    @property
    def prediction_type(self) -> str:
        """What the UNet predicts (epsilon, v_prediction or sample), as its scheduler says."""
        return self.scheduler.config.prediction_type

    def _token_ids(self, tokenizer: CLIPTokenizer, prompts: Sequence[str]) -> torch.Tensor:
        return tokenizer(list(prompts), padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                         return_tensors="pt").input_ids.to(self.device)

    # the SD operations every user of a stack shares (the editor, the extraction scores)
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], size: Sequence[int] | None = None) -> Conditioning:
        """The UNet's condition for each prompt, tokens padded to the tokenizer's length as SD's pipelines do.

        SD 1.x/2.x: the text encoder's last hidden states. SDXL: both encoders' penultimate hidden
        states side by side, the second's pooled projection and the time ids of an image of ``size``
        (height, width; default the model's resolution)."""
        if self.text_encoder_2 is None:
            return Conditioning(self.text_encoder(self._token_ids(self.tokenizer, prompts))[0])
        first = self.text_encoder(self._token_ids(self.tokenizer, prompts), output_hidden_states=True)
        second = self.text_encoder_2(self._token_ids(self.tokenizer_2, prompts), output_hidden_states=True)
        hidden, pooled = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1), second.text_embeds
        if self.force_zeros_for_empty_prompt:
            kept = torch.tensor([p != "" for p in prompts], device=self.device).to(hidden.dtype)
            hidden, pooled = hidden * kept.view(-1, 1, 1), pooled * kept.view(-1, 1)
        height, width = size or (self.resolution, self.resolution)
        time_ids = sdxl_time_ids(len(prompts), height, width, self.device, hidden.dtype)
        return Conditioning(hidden, {"text_embeds": pooled, "time_ids": time_ids})

    def predict_noise(self, z_t: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                      unet: torch.nn.Module | None = None) -> torch.Tensor:
        """ε(z_t, t, cond) in float32 whatever the UNet predicts; ``unet`` may be a compiled copy."""
        out = (self.unet if unet is None else unet)(z_t.to(self.dtype), t, **cond.unet_kwargs()).sample.float()
        return to_epsilon(out, z_t.float(), t, self.scheduler, self.prediction_type)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [−1, 1] → float32 latents (the posterior mean, scaled)."""
        x = images.to(self.device, self.vae.dtype)
        return self.vae.encode(x).latent_dist.mean.float() * self.latent_scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → (B, 3, H, W) images in [0, 1], on the stack's device."""
        x = self.vae.decode((latents.to(self.device) / self.latent_scale).to(self.vae.dtype)).sample
        return (x.float() / 2 + 0.5).clamp(0, 1)

    def freeze(self) -> "SDStack":
        """No parameter requires grad; only the latent is optimised."""
        for module in self.modules():
            module.requires_grad_(False).eval()
        return self

    def modules(self) -> list[torch.nn.Module]:
        return [self.unet, self.vae, self.text_encoder] + ([self.text_encoder_2] if self.text_encoder_2 else [])

    def save_pretrained(self, folder: str | os.PathLike, variant: str | None = None) -> None:
        """Write a diffusers-layout folder that :func:`load_stack` reads back (weights named for
        ``variant``, e.g. fp16, if given)."""
        folder = Path(folder)
        classes = {"unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
                   "text_encoder": ("transformers", "CLIPTextModel"), "tokenizer": ("transformers", "CLIPTokenizer"),
                   "scheduler": ("diffusers", "DDPMScheduler")}
        index: dict[str, Any] = {"_class_name": "StableDiffusionPipeline"}
        if self.architecture == "sdxl":
            classes.update(text_encoder_2=("transformers", "CLIPTextModelWithProjection"),
                           tokenizer_2=("transformers", "CLIPTokenizer"))
            index = {"_class_name": "StableDiffusionXLPipeline",
                     "force_zeros_for_empty_prompt": self.force_zeros_for_empty_prompt}
        else:
            index.update(safety_checker=[None, None], feature_extractor=[None, None])
        for sub in classes:
            part = getattr(self, sub)
            weighted = isinstance(part, torch.nn.Module)
            part.save_pretrained(folder / sub, **(dict(variant=variant) if weighted and variant else {}))
        index.update({sub: list(cls) for sub, cls in classes.items()})
        (folder / "model_index.json").write_text(json.dumps(index, indent=2))


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


def tiny_text_encoder(with_projection: bool = False) -> CLIPTextModel:
    """A 2-layer CLIP text encoder of width 32 with CLIP's vocabulary (SDXL's second one projects)."""
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )
    return CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)


def tiny_unet(architecture: str) -> UNet2DConditionModel:
    """SD's UNet layout (cross-attention in the up blocks 1–2) or SDXL's (no attention at full
    resolution, more transformer blocks deeper down, pooled text and time ids added to the time
    embedding), a few hundred thousand parameters."""
    common = dict(in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
                  norm_num_groups=8, attention_head_dim=8)
    if architecture == "sd":
        return UNet2DConditionModel(
            sample_size=8, cross_attention_dim=32, **common,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    time_ids_width = 8
    return UNet2DConditionModel(
        sample_size=16, cross_attention_dim=64, **common, use_linear_projection=True,
        transformer_layers_per_block=(1, 1, 2),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=time_ids_width,
        projection_class_embeddings_input_dim=32 + 6 * time_ids_width)


def build_tiny(seed: int = 0, architecture: str = "sd") -> SDStack:
    """An SD-shaped (64², ~2 M parameters) or SDXL-shaped (128², two text encoders) stack with seeded
    random weights and SD's noise schedule, built in well under a second."""
    check_architecture(architecture)
    torch.manual_seed(seed)
    unet = tiny_unet(architecture)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1,
        block_out_channels=(8, 16, 16, 16), norm_num_groups=8,
        scaling_factor=0.18215 if architecture == "sd" else 0.13025,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    tokenizer = offline_clip_tokenizer()
    stack = SDStack(unet=unet, vae=vae, text_encoder=tiny_text_encoder(), tokenizer=tokenizer,
                    scheduler=DDPMScheduler(**SD_SCHEDULE), device=torch.device("cpu"), dtype=torch.float32,
                    resolution=unet.config.sample_size * 8)
    if architecture == "sdxl":
        stack.text_encoder_2, stack.tokenizer_2 = tiny_text_encoder(with_projection=True), tokenizer
        stack.force_zeros_for_empty_prompt = True
    return stack.freeze()


def check_architecture(architecture: str) -> None:
    if architecture not in ARCHITECTURES:
        raise CpdsError(f"model.architecture={architecture!r} is unknown: use sd (SD 1.x/2.x), sdxl, or null to "
                        "read it from the model")


def read_model_index(pretrained: str, local: bool, **kwargs: Any) -> dict[str, Any]:
    """The folder's or hub repository's model_index.json ({} for a local folder without one)."""
    if local:
        path = Path(pretrained).expanduser() / "model_index.json"
        return json.loads(path.read_text()) if path.is_file() else {}
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(pretrained, "model_index.json", **kwargs)).read_text())


def from_pretrained(cls: Any, pretrained: str, variant: str | None, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` of the ``variant`` weights (e.g. fp16, half the download) where the
    repository has them, else of its full-precision weights."""
    from huggingface_hub.errors import EntryNotFoundError

    if variant:
        try:
            with quiet_diffusers():  # diffusers logs an error before it raises for a missing variant
                return cls.from_pretrained(pretrained, variant=variant, **kwargs)
        except (OSError, ValueError, EntryNotFoundError):
            pass  # no such variant (or not cached): the full-precision files below
    return cls.from_pretrained(pretrained, **kwargs)


def load_pretrained(pretrained: str, revision: str | None = None, variant: str | None = None,
                    vae: str | None = None, dtype: torch.dtype = torch.float32) -> SDStack:
    """Load the SD or SDXL components of a hub id or a local diffusers folder on the CPU, the UNet in
    ``dtype``, with ``vae`` (a hub id or folder) in place of the model's own.

    Offline (see :mod:`cpds_exp.hub`), a hub id loads from the cache at once or fails at once."""
    from diffusers.utils import is_accelerate_available

    local = {name: Path(name).expanduser().is_dir() for name in (pretrained, vae) if name is not None}
    for name, key in ((pretrained, "model.pretrained"), (vae, "model.vae")):
        if name is not None and not local[name] and not is_hub_id(name):
            raise CpdsError(f"cannot load model {name!r}: there is no such folder and it is not a hub id such as "
                            f"CompVis/stable-diffusion-v1-4; check {key}, or use model=tiny for an offline run")
    offline = None if all(local.values()) else offline_reason()
    kwargs: dict[str, Any] = dict(revision=revision) if revision else {}
    kwargs["local_files_only"] = offline is not None
    # without accelerate, diffusers' default (low_cpu_mem_usage=True) falls back with a notice per component
    diffusers_kwargs = dict(kwargs, low_cpu_mem_usage=is_accelerate_available())
    size = download_size(pretrained, dtype != torch.float32)
    with quiet_loading(), refused(pretrained, "model.pretrained", local[pretrained], offline, size):
        index = read_model_index(pretrained, local[pretrained], **kwargs)
        xl = "text_encoder_2" in index or (local[pretrained] and (Path(pretrained).expanduser() / "text_encoder_2").is_dir())
        parts = dict(  # the UNet, most of the weights, straight in the run's dtype
            unet=from_pretrained(UNet2DConditionModel, pretrained, variant, subfolder="unet", torch_dtype=dtype,
                                 **diffusers_kwargs),
            text_encoder=from_pretrained(CLIPTextModel, pretrained, variant, subfolder="text_encoder", **kwargs),
            tokenizer=CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer", **kwargs),
            scheduler=DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler", **kwargs))
        if vae is None:
            parts["vae"] = from_pretrained(AutoencoderKL, pretrained, variant, subfolder="vae", **diffusers_kwargs)
        if xl:
            parts.update(
                text_encoder_2=from_pretrained(CLIPTextModelWithProjection, pretrained, variant,
                                               subfolder="text_encoder_2", **kwargs),
                tokenizer_2=CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer_2", **kwargs),
                force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)))
    if vae is not None:  # a VAE repository or folder holds the VAE alone (config.json at its top)
        with quiet_loading(), refused(vae, "model.vae", local[vae], offline, None):
            parts["vae"] = from_pretrained(AutoencoderKL, vae, variant, local_files_only=offline is not None,
                                           low_cpu_mem_usage=diffusers_kwargs["low_cpu_mem_usage"])
    for tokenizer in (parts["tokenizer"], parts.get("tokenizer_2")):
        if tokenizer is not None:
            _check_tokenizer(tokenizer, pretrained)
    resolution = parts["unet"].config.sample_size * 2 ** (len(parts["vae"].config.block_out_channels) - 1)
    return SDStack(**parts, device=torch.device("cpu"), dtype=torch.float32, resolution=resolution).freeze()


@contextlib.contextmanager
def refused(name: str, key: str, local: bool, offline: str | None, size: str | None):
    """A refused load of ``name`` (the value of config ``key``) as one line naming every way on."""
    try:
        yield
    except (OSError, ValueError) as err:
        if offline and not local:
            raise weights_unavailable(f"model {name!r}", size, offline,
                                      f", or {key}=/path/to/a/diffusers/folder") from err
        where = "the folder" if local else "the hub"
        raise CpdsError(f"cannot load model {name!r}: {where} refused it ({one_line(err)}); check "
                        f"{key} (a hub id or a local diffusers folder), or use model=tiny for an offline run") from err


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


@contextlib.contextmanager
def quiet_diffusers():
    """diffusers' log silenced, for calls whose notices are expected and handled here."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL + 1)
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def load_stack(pretrained: str | None, device: str = "auto", dtype: str = "auto", seed: int = 0,
               revision: str | None = None, *, architecture: str | None = None, prediction_type: str | None = None,
               vae: str | None = None, variant: str | None = "auto") -> SDStack:
    """The one entry point: ``pretrained`` None builds the tiny stack of ``architecture`` (default sd),
    else loads it (``architecture``, if given, is checked); then moves it to the device and dtype.

    ``prediction_type`` overrides the scheduler's; ``variant`` "auto" loads fp16 weights for a
    half-precision run where the repository has them. SDXL's own VAE stays in float32 in a float16
    run, as SDXL's pipeline keeps it (it overflows in float16), unless ``vae`` replaces it."""
    target_device = resolve_device(device)
    target_dtype = resolve_dtype(dtype, target_device)
    if architecture is not None:
        check_architecture(architecture)
    if pretrained is None:
        stack = build_tiny(seed, architecture or "sd")
    else:
        if variant == "auto":
            variant = "fp16" if target_dtype in (torch.float16, torch.bfloat16) else None
        stack = load_pretrained(pretrained, revision, variant, vae, target_dtype)
        if architecture is not None and architecture != stack.architecture:
            raise CpdsError(f"model.architecture={architecture} but {pretrained} is an {stack.architecture} model: "
                            "set model.architecture=null (read from the model) or choose the matching model")
    if prediction_type is not None:
        stack.scheduler = DDPMScheduler.from_config(stack.scheduler.config, prediction_type=prediction_type)
    if stack.prediction_type not in PREDICTION_TYPES:
        raise CpdsError(f"the scheduler of {pretrained or 'the tiny model'} predicts {stack.prediction_type!r}, not one of "
                        f"{', '.join(PREDICTION_TYPES)}: set model.prediction_type to what its UNet predicts")
    with quiet_diffusers():  # diffusers warns on every dtype cast, even of a model with no float32-only modules
        for module in stack.modules():
            module.to(target_device)
            if module.dtype != target_dtype:
                module.to(target_dtype)
        if stack.architecture == "sdxl" and target_dtype == torch.float16 and stack.vae.config.force_upcast:
            stack.vae.to(torch.float32)
    stack.device, stack.dtype = target_device, target_dtype
    return stack
