"""The editing loop of SPEC §2: one optimiser step on the target latent per iteration.

Every tensor carries a batch dimension B (one edit per row), and each row gets its own timestep,
noises and selected patches, so rows never mix.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from cpds_exp.cut import Select, cut_losses
from cpds_exp.features import DEFAULT_CUT_LAYERS, FeatureCapture
from cpds_exp.models import SDStack
from cpds_exp.scores import add_noise, dds_grad, pds_dds_ratio, pds_grad, score_scale
from cpds_exp.selector_training import SelectorTrainer, SelectorTraining
from cpds_exp.selectors import PatchSelector

SCORES = ("dds", "pds")


@dataclass
class EditSettings:
    """Everything that shapes one edit besides the model, the prompts and the selector."""

    score: str = "dds"
    use_cut: bool = True
    lambda_weighting: bool = False
    score_weight: float = 1.0
    cut_weight: float = 1.0
    lr: float = 0.1
    iterations: int = 200
    guidance_scale: float = 7.5
    w_dds: float = 1.0
    w_cut: float = 3.0
    n_patches: int = 256
    patch_sizes: Sequence[int] = (1, 2)
    tau: float = 0.07
    t_min: int = 50
    t_max: int = 950
    cut_layers: Sequence[str] = DEFAULT_CUT_LAYERS
    seed: int = 0
    snapshot_every: int = 50
    log_every: int = 1
    progress: bool = True

    def __post_init__(self):
        if self.score not in SCORES:
            raise ValueError(f"score={self.score!r}: expected one of {SCORES}")


@dataclass
class Prediction:
    """Guidance-combined noise predictions at z_t and the CUT features of one iteration."""

    eps_src: torch.Tensor
    eps_trg: torch.Tensor
    ref_feats: list[torch.Tensor] = field(default_factory=list)
    trg_feats: list[torch.Tensor] = field(default_factory=list)


@dataclass
class IterationStats:
    """What one iteration measured, kept on the device until it is logged."""

    iteration: int
    t: torch.Tensor
    score_norm: torch.Tensor
    cut_per_layer: torch.Tensor | None
    seconds: float
    selector_round: dict[str, float | None] | None = None

    def to_dict(self, layer_names: Sequence[str]) -> dict[str, float]:
        """Scalars for logging (batch means); this is where the host waits for the device."""
        out = {"iteration": self.iteration, "t": self.t.float().mean().item(),
               "score/grad_norm": self.score_norm.mean().item(), "time/iteration_s": self.seconds}
        if self.cut_per_layer is not None:
            per_layer = self.cut_per_layer.detach().mean(0).cpu()
            out["cut/total"] = per_layer.sum().item()
            out.update({f"cut/{name}": v.item() for name, v in zip(layer_names, per_layer)})
        return out


class DivergenceError(RuntimeError):
    """The latent became NaN or Inf; carries the iteration at which it happened."""

    def __init__(self, iteration: int):
        super().__init__(f"the latent became NaN/Inf at iteration {iteration}")
        self.iteration = iteration


@dataclass
class EditCallbacks:
    """Hooks the editor calls; all optional."""

    on_log: Callable[[dict[str, float]], None] | None = None
    on_snapshot: Callable[[int, torch.Tensor], None] | None = None
    on_selector_round: Callable[[dict[str, float | None]], None] | None = None


@dataclass
class EditResult:
    """The edited latents, the last logged statistics and the selector's training rounds."""

    latents: torch.Tensor
    final: dict[str, float]
    selector_rounds: list[dict[str, float | None]]


@dataclass
class EditState:
    """What persists across the iterations of one edit."""

    z_src: torch.Tensor
    z_trg: torch.Tensor
    emb: dict[str, torch.Tensor]
    optimizer: torch.optim.Optimizer
    select: list[Select]
    trainer: SelectorTrainer | None


class Editor:
    """Runs DDS / PDS / CDS / CPDS edits with one SD stack (SPEC §2–3)."""

    def __init__(self, stack: SDStack, settings: EditSettings, make_selector: Callable[[], PatchSelector],
                 make_optimizer: Callable[..., torch.optim.Optimizer],
                 selector_training: SelectorTraining | None = None):
        self.stack = stack
        self.settings = settings
        self.make_selector = make_selector
        self.selector_training = selector_training or SelectorTraining()
        self.make_optimizer = make_optimizer
        self.capture = FeatureCapture(stack.unet, settings.cut_layers) if settings.use_cut else None
        self.generator = torch.Generator(stack.device)
        # PDS's ε′ has its own stream, so every method draws the same t and ε for a seed
        self.posterior_generator = torch.Generator(stack.device)

    # --- encoding and decoding -------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        tok = self.stack.tokenizer(list(prompts), padding="max_length", truncation=True,
                                   max_length=self.stack.tokenizer.model_max_length, return_tensors="pt")
        return self.stack.text_encoder(tok.input_ids.to(self.stack.device))[0]

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [−1, 1] → float32 latents (the posterior mean, scaled)."""
        x = images.to(self.stack.device, self.stack.dtype)
        return self.stack.vae.encode(x).latent_dist.mean.float() * self.stack.latent_scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → (B, 3, H, W) images in [0, 1]."""
        x = self.stack.vae.decode((latents / self.stack.latent_scale).to(self.stack.dtype)).sample
        return (x.float() / 2 + 0.5).clamp(0, 1)

    @property
    def layer_names(self) -> list[str]:
        return self.capture.layers if self.capture else []

    # --- one iteration ----------------------------------------------------------------------
    def _unet(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        out = self.stack.unet(z_t.to(self.stack.dtype), t, encoder_hidden_states=cond).sample
        return out.float()

    def _guided(self, uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return uncond + self.settings.guidance_scale * (cond - uncond)

    def predict(self, zt_src: torch.Tensor, zt_trg: torch.Tensor, t: torch.Tensor,
                emb: dict[str, torch.Tensor]) -> Prediction:
        """Step 3: the four branches in as few UNet passes as the method allows.

        Without CUT one no-grad pass takes all four. With CUT the three branches that need no
        graph go in one no-grad pass (its (z_src, y_src) features are the references) and the
        target-conditional branch runs with a graph so the CUT loss reaches z_trg.
        """
        batch = zt_src.shape[0]
        if self.capture is None:
            with torch.no_grad():
                eps = self._unet(torch.cat([zt_src, zt_src, zt_trg, zt_trg]), t.repeat(4),
                                 torch.cat([emb["uncond"], emb["src"], emb["uncond"], emb["trg"]]))
            e_su, e_sc, e_tu, e_tc = eps.chunk(4)
            return Prediction(self._guided(e_su, e_sc), self._guided(e_tu, e_tc))
        with torch.no_grad():
            eps = self._unet(torch.cat([zt_src, zt_src, zt_trg.detach()]), t.repeat(3),
                             torch.cat([emb["uncond"], emb["src"], emb["uncond"]]))
            ref_feats = [f[batch: 2 * batch] for f in self.capture.features()]
        e_su, e_sc, e_tu = eps.chunk(3)
        e_tc = self._unet(zt_trg, t, emb["trg"])
        trg_feats = self.capture.features()
        self.capture.clear()
        return Prediction(self._guided(e_su, e_sc), self._guided(e_tu, e_tc.detach()), ref_feats, trg_feats)

    def score_gradient(self, z_src, z_trg, noise, t, pred: Prediction) -> torch.Tensor:
        """Step 4: g of DDS, or of PDS with a second noise ε′ shared by source and target."""
        if self.settings.score == "dds":
            return dds_grad(pred.eps_src, pred.eps_trg)
        noise_prev = torch.randn(z_src.shape, generator=self.posterior_generator, device=z_src.device)
        return pds_grad(z_src, z_trg.detach(), noise, noise_prev, pred.eps_src, pred.eps_trg, t, t - 1,
                        self.stack.scheduler)

    def step(self, state: EditState, iteration: int) -> IterationStats:
        """One iteration, the six steps of SPEC §2."""
        s, start = self.settings, time.perf_counter()
        z_src, z_trg = state.z_src, state.z_trg
        batch, device = z_src.shape[0], z_src.device
        # 1. a timestep per row and one noise shared by source and target
        t = torch.randint(s.t_min, s.t_max, (batch,), generator=self.generator, device=device)
        noise = torch.randn(z_src.shape, generator=self.generator, device=device)
        # 2. noise both latents with it
        zt_src = add_noise(z_src, noise, t, self.stack.scheduler)
        zt_trg = add_noise(z_trg, noise, t, self.stack.scheduler)
        # 3. the UNet evaluations (and the CUT features)
        pred = self.predict(zt_src, zt_trg, t, state.emb)
        # 4. the score-distillation gradient, applied as d/dz_trg of scale * w_dds * sum(z_trg * g)
        g = self.score_gradient(z_src, z_trg, noise, t, pred)
        if s.lambda_weighting:
            g = g * pds_dds_ratio(t, t - 1, self.stack.scheduler).to(g).view(-1, 1, 1, 1)
        scale = score_scale(*z_trg.shape[-2:]) * s.w_dds * s.score_weight
        loss = scale * (z_trg * g.detach()).sum()
        # 5. the CUT term, through the UNet into z_trg
        cut = None
        if self.capture is not None:
            observe = state.trainer.observe if state.trainer else None
            cut = cut_losses(pred.ref_feats, pred.trg_feats, state.select, s.patch_sizes, s.n_patches, s.tau,
                             observe=observe)
            loss = loss + s.w_cut * s.cut_weight * cut.sum()
        # 6. the optimiser step
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        selector_round = state.trainer.after_iteration(iteration) if state.trainer else None
        return IterationStats(iteration, t, scale * g.flatten(1).norm(dim=1), cut,
                              time.perf_counter() - start, selector_round)

    def make_selection(self) -> tuple[list[Select], SelectorTrainer | None]:
        """One selector per CUT layer (or one shared), wrapped by a trainer when it learns."""
        if self.capture is None:
            return [], None
        if self.selector_training.per_layer:
            selectors = [self.make_selector() for _ in self.layer_names]
        else:
            selectors = [self.make_selector()] * len(self.layer_names)
        if not selectors[0].learns:
            return list(selectors), None
        trainer = SelectorTrainer(selectors, self.selector_training)
        return trainer.select_functions(), trainer

    # --- the loop ---------------------------------------------------------------------------
    def edit(self, images: torch.Tensor, source_prompts: Sequence[str], target_prompts: Sequence[str],
             callbacks: EditCallbacks | None = None) -> EditResult:
        """Edit (B, 3, H, W) images in [−1, 1].

        Raises :class:`DivergenceError` when the latent stops being finite.
        """
        s, callbacks = self.settings, callbacks or EditCallbacks()
        self.generator.manual_seed(2 * s.seed)
        self.posterior_generator.manual_seed(2 * s.seed + 1)
        batch = images.shape[0]
        emb = {"uncond": self.encode_prompts([""] * batch), "src": self.encode_prompts(source_prompts),
               "trg": self.encode_prompts(target_prompts)}
        z_src = self.encode_images(images)
        z_trg = z_src.clone().requires_grad_(True)
        state = EditState(z_src, z_trg, emb, self.make_optimizer(params=[z_trg], lr=s.lr), *self.make_selection())
        last: dict[str, float] = {}
        for it in tqdm(range(1, s.iterations + 1), desc="edit", disable=not s.progress, leave=False):
            stats = self.step(state, it)
            if not torch.isfinite(z_trg).all():
                raise DivergenceError(it)
            if it % s.log_every == 0 or it == s.iterations:
                last = stats.to_dict(self.layer_names)
                if callbacks.on_log:
                    callbacks.on_log(last)
            if stats.selector_round and callbacks.on_selector_round:
                callbacks.on_selector_round(stats.selector_round)
            if callbacks.on_snapshot and s.snapshot_every and it % s.snapshot_every == 0 and it != s.iterations:
                callbacks.on_snapshot(it, self.decode(z_trg.detach()))
        return EditResult(z_trg.detach(), last, state.trainer.rounds if state.trainer else [])
