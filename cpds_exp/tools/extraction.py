"""One-step extraction scores (Webster 2023, SPEC §6): flag captions whose generations copy training images.

Both scores come from one denoising step at the highest noise level t = T − 1 (999 for SD),
starting from pure noise z_T = ε (the VP form of Webster's σ₁ε), with classifier-free guidance:

    ε̂ = ε̂(z_T, T, ∅) + w · (ε̂(z_T, T, c) − ε̂(z_T, T, ∅)),     x̂₀ = (z_T − √(1 − ᾱ_T) ε̂) / √ᾱ_T.

* Denoising Confidence Score (whitebox). Here the denoiser D(ε, c) = ε̂ is the model's one-step
  estimate of the noise that made z_T, and

      DCS(c) = 1/J Σ_j mean_elements (ε_j − ε̂(ε_j, c))²,

  the squared distance averaged over latent elements and over the J seeds. At t = T the data
  term √ᾱ_T x₀ is tiny, so a model that has not memorised c predicts ε̂ ≈ ε (DCS near 0); a
  memorised caption makes it commit to one image, ε − ε̂ ≈ √(ᾱ_T / (1 − ᾱ_T)) x̂₀ grows, and so
  does DCS.
* Edge Consistency Score (blackbox). For J seeds the one-step images (x̂₀ decoded by the VAE)
  go to grey, Sobel edge magnitude (kernels / 4, so a unit step gives 1), binary edges where the
  magnitude ≥ ``edge_threshold``; the maps are averaged over seeds, thresholded at γ, and

      ECS(c) = ‖1[mean_j E_j ≥ γ]‖² / (H·W),

  the fraction of pixels that are an edge in at least a γ share of the seeds: high when every
  seed draws the same picture.

The same J noises (seeds ``seed``..``seed+J−1``) are used for every caption so that scores compare.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from cpds_exp.conditioning import Conditioning
from cpds_exp.data import to_pil
from cpds_exp.errors import CpdsError
from cpds_exp.models import SDStack
from cpds_exp.scores import guided
from cpds_exp.evaluation.report import labelled_grid
from cpds_exp.results import csv_text, save_image, write_text

SCORES = ("dcs", "ecs")
TABLE_COLUMNS = ("rank", "caption", "dcs", "ecs")


@dataclass
class ExtractionSettings:
    """The knobs of both scores; Webster's defaults where the paper gives them."""

    seeds: int = 4
    gamma: float = 0.5
    edge_threshold: float = 0.1
    guidance_scale: float = 7.5
    seed: int = 0
    rank_by: str = "dcs"
    thumbnail: int = 192


@dataclass
class OneStep:
    """One caption's single denoising step for J noises: the noise, the guided ε̂, and x̂₀ decoded."""

    noise: torch.Tensor
    eps: torch.Tensor
    images: torch.Tensor


def read_captions(path: str | Path) -> list[str]:
    """One caption a line; blank lines are skipped, duplicates kept once (in order)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CpdsError(f"captions file {str(path)!r} does not exist: pass --captions a text file, one caption a line")
    captions = list(dict.fromkeys(line.strip() for line in path.read_text().splitlines() if line.strip()))
    if not captions:
        raise CpdsError(f"captions file {str(path)!r} has no captions: write one caption a line")
    return captions


@torch.no_grad()
def noises(stack: SDStack, count: int, seed: int) -> torch.Tensor:
    """(J, C, h, w) float32 pure noise, seeded per index so that J=2 is a prefix of J=4."""
    config = stack.unet.config
    shape = (config.in_channels, config.sample_size, config.sample_size)
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + j)) for j in range(count)])


def last_timestep(stack: SDStack) -> int:
    return stack.scheduler.config.num_train_timesteps - 1


@torch.no_grad()
def one_step(stack: SDStack, caption: str, noise: torch.Tensor, guidance_scale: float) -> OneStep:
    """The guided noise prediction at t = T from z_T = noise, and x̂₀ decoded to [0, 1] images."""
    count = noise.shape[0]
    t = last_timestep(stack)
    alpha_bar = stack.scheduler.alphas_cumprod[t].float()
    text = stack.encode_prompts(["", caption])
    cond = Conditioning.cat([text[:1]] * count + [text[1:]] * count)
    z_t = noise.to(stack.device).repeat(2, 1, 1, 1)
    timesteps = torch.full((2 * count,), t, device=stack.device, dtype=torch.long)
    pred = stack.predict_noise(z_t, timesteps, cond).cpu()
    uncond, conditional = pred.chunk(2)
    eps = guided(uncond, conditional, guidance_scale)
    x0 = (noise - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
    return OneStep(noise=noise, eps=eps, images=stack.decode(x0).cpu())


def dcs(noise: torch.Tensor, eps: torch.Tensor) -> float:
    """Denoising Confidence Score: mean over seeds and latent elements of (ε − ε̂)²."""
    return float((noise.float() - eps.float()).pow(2).mean())


def sobel_magnitude(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] → (N, H, W) gradient magnitude of the grey image (replicate padding)."""
    grey = (images * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 4
    kernels = torch.stack([kx, kx.T])[:, None]
    gradients = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kernels)
    return gradients.pow(2).sum(1).sqrt()


def edge_maps(images: torch.Tensor, edge_threshold: float) -> torch.Tensor:
    """Binary Sobel edges, (N, H, W) of 0/1 floats."""
    return (sobel_magnitude(images) >= edge_threshold).float()


def ecs(edges: torch.Tensor, gamma: float) -> float:
    """Edge Consistency Score of J binary edge maps (J, H, W): ‖1[mean ≥ γ]‖² / (H·W)."""
    consistent = (edges.float().mean(0) >= gamma).float()
    return float(consistent.pow(2).sum() / consistent.numel())


def check_settings(settings: ExtractionSettings) -> None:
    """Refuse settings that would make the scores meaningless."""
    if settings.seeds < 1:
        raise CpdsError(f"--seeds {settings.seeds} must be at least 1")
    if not 0 < settings.gamma <= 1:
        raise CpdsError(f"--gamma {settings.gamma} must be in (0, 1]: the share of seeds an edge must appear in")
    if settings.rank_by not in SCORES:
        raise CpdsError(f"--rank-by {settings.rank_by!r}: use one of {', '.join(SCORES)}")


def score_captions(stack: SDStack, captions: Sequence[str],
                   settings: ExtractionSettings = ExtractionSettings()) -> list[dict[str, Any]]:
    """Per caption: DCS, ECS and thumbnails of its one-step images, ranked best (highest) first."""
    check_settings(settings)
    if not captions:
        raise CpdsError("no captions to score: pass --captions a file with one caption a line")
    noise = noises(stack, settings.seeds, settings.seed)
    rows = []
    for caption in captions:
        step = one_step(stack, caption, noise, settings.guidance_scale)
        thumbs = [img.resize((settings.thumbnail, settings.thumbnail)) for img in to_pil(step.images)]
        rows.append({"caption": caption, "dcs": dcs(step.noise, step.eps),
                     "ecs": ecs(edge_maps(step.images, settings.edge_threshold), settings.gamma), "images": thumbs})
    rows.sort(key=lambda row: -row[settings.rank_by])
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
    return rows


def to_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The ranking as a Markdown table (pipes in captions escaped)."""
    lines = ["| rank | caption | DCS | ECS |", "|---:|---|---:|---:|"]
    for r in rows:
        caption = r["caption"].replace("|", "\\|")
        lines.append(f"| {r['rank']} | {caption} | {r['dcs']:.5g} | {r['ecs']:.4f} |")
    return "\n".join(lines) + "\n"


def top_grid(rows: Sequence[dict[str, Any]], top: int = 8) -> Image.Image:
    """The top captions' one-step images: a row per caption, a column per seed."""
    shown = rows[:top]
    seeds = len(shown[0]["images"])
    return labelled_grid([r["images"] for r in shown], [f"seed {j}" for j in range(seeds)],
                         [f"#{r['rank']} {r['caption']}" for r in shown], tile=shown[0]["images"][0].width)


def log_wandb(rows: Sequence[dict[str, Any]], grid: Image.Image, out: Path, project: str = "cpds-exp",
              mode: str = "auto", settings: ExtractionSettings | None = None) -> str:
    """The ranking as a W&B table (one-step images included) and the grid; returns the run's path."""
    import wandb

    from cpds_exp.loggers import resolve_wandb_mode

    run = wandb.init(project=project, mode=resolve_wandb_mode(mode), job_type="extraction", dir=str(out),
                     config=vars(settings) if settings else {})
    table = wandb.Table(columns=[*TABLE_COLUMNS, "one_step"])
    for row in rows:
        table.add_data(row["rank"], row["caption"], row["dcs"], row["ecs"], wandb.Image(row["images"][0]))
    run.log({"extraction/scores": table, "extraction/top_grid": wandb.Image(grid)})
    path = str(Path(run.dir).parent)
    run.finish()
    return path


def write_extraction(out: str | Path, rows: Sequence[dict[str, Any]], grid: Image.Image) -> dict[str, Path]:
    """scores.csv, scores.md and top_grid.png under ``out``."""
    out = Path(out).expanduser()
    return {"csv": write_text(out / "scores.csv", csv_text(rows, TABLE_COLUMNS)),
            "markdown": write_text(out / "scores.md", to_markdown(rows)),
            "grid": save_image(out / "top_grid.png", grid)}
