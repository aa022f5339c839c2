"""The editing loop of SPEC §2: one optimiser step on the target latents per iteration.

Every tensor carries a batch dimension B, one edit per row. Each row has its own random
streams (timesteps, noises), its own patch selectors and its own losses, so a row's result is
the same whether it is edited alone or in a batch. The loop never waits for the device except
every ``log_every`` iterations (logging, divergence check) and at snapshots.
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
    """Everything that shapes an edit besides the model, the prompts and the selector."""

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
    log_every: int = 10
    progress: bool = True
    compile: bool = False
    compile_mode: str | None = None
    compile_backend: str = "inductor"
    channels_last: bool = False
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if self.score not in SCORES:
            raise ValueError(f"score={self.score!r}: expected one of {SCORES}")


class RowRandom:
    """One pair of generators per row: (t, ε) and PDS's ε′ on separate streams, so every method
    draws the same t and ε for a seed and a row never depends on its neighbours."""

    def __init__(self, seeds: Sequence[int], device: torch.device):
        self.device = device
        self.main = [torch.Generator(device).manual_seed(2 * s) for s in seeds]
        self.posterior = [torch.Generator(device).manual_seed(2 * s + 1) for s in seeds]

    def timesteps(self, low: int, high: int) -> torch.Tensor:
        return torch.cat([torch.randint(low, high, (1,), generator=g, device=self.device) for g in self.main])

    def noise(self, shape: Sequence[int], posterior: bool = False) -> torch.Tensor:
        generators = self.posterior if posterior else self.main
        return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=self.device) for g in generators])


@dataclass
class Prediction:
    """Guidance-combined noise predictions at z_t and the CUT features of one iteration."""

    eps_src: torch.Tensor
    eps_trg: torch.Tensor
    ref_feats: list[torch.Tensor] = field(default_factory=list)
    trg_feats: list[torch.Tensor] = field(default_factory=list)


@dataclass
class RowSelection:
    """A row's patch selection: one function per CUT layer, and the trainer of learning selectors."""

    select: list[Select]
    trainer: SelectorTrainer | None


@dataclass
class EditState:
    """What persists across the iterations of one (batched) edit."""

    z_src: torch.Tensor
    z_trg: torch.Tensor
    emb: dict[str, torch.Tensor]
    optimizer: torch.optim.Optimizer
    random: RowRandom
    rows: list[RowSelection]
    first_bad: torch.Tensor  # (B,) iteration at which a row's latent stopped being finite, 0 if never


@dataclass
class IterationStats:
    """What one iteration measured, per row, kept on the device until it is logged."""

    iteration: int
    t: torch.Tensor
    score_norm: torch.Tensor
    cut_per_layer: torch.Tensor | None


@dataclass
class EditCallbacks:
    """Hooks the editor calls, each with the row (batch index) it concerns; all optional."""

    on_log: Callable[[int, dict[str, float]], None] | None = None
    on_snapshot: Callable[[int, int, torch.Tensor], None] | None = None
    on_selector_round: Callable[[int, dict[str, float | None]], None] | None = None


@dataclass
class EditResult:
    """Per row: the edited latents, the last logged statistics, the selector's training rounds
    and the iteration at which the latent diverged (None if it did not)."""

    latents: torch.Tensor
    final: list[dict[str, float]]
    selector_rounds: list[list[dict[str, float | None]]]
    diverged_at: list[int | None]


class Editor:
    """Runs DDS / PDS / CDS / CPDS edits with one SD stack (SPEC §2–3)."""

    def __init__(self, stack: SDStack, settings: EditSettings, make_selector: Callable[..., PatchSelector],
                 make_optimizer: Callable[..., torch.optim.Optimizer],
                 selector_training: SelectorTraining | None = None):
        self.stack = stack
        self.settings = settings
        self.make_selector = make_selector
        self.make_optimizer = make_optimizer
        self.selector_training = selector_training or SelectorTraining()
        self.capture = FeatureCapture(stack.unet, settings.cut_layers) if settings.use_cut else None
        self.unet = self._accelerated(stack.unet)

    def _accelerated(self, unet: torch.nn.Module) -> torch.nn.Module:
        """The UNet as the speed and memory options want it (after the capture is installed)."""
        s = self.settings
        if s.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if s.channels_last:
            unet.to(memory_format=torch.channels_last)
        return torch.compile(unet, mode=s.compile_mode, backend=s.compile_backend) if s.compile else unet

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
        out = self.unet(z_t.to(self.stack.dtype), t, encoder_hidden_states=cond).sample
        return out.float()

    def _guided(self, uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return uncond + self.settings.guidance_scale * (cond - uncond)

    def predict(self, zt_src: torch.Tensor, zt_trg: torch.Tensor, t: torch.Tensor,
                emb: dict[str, torch.Tensor]) -> Prediction:
        """Step 3: the four branches in as few UNet passes as the method allows.

        Without CUT one no-grad pass takes all 4B branches. With CUT the 3B branches that need
        no graph go in one no-grad pass (its (z_src, y_src) features are the references) and
        the B target-conditional branches run with a graph so the CUT loss reaches z_trg.
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

    def score_gradient(self, state: EditState, noise: torch.Tensor, t: torch.Tensor,
                       pred: Prediction) -> torch.Tensor:
        """Step 4: g of DDS, or of PDS with a second noise ε′ shared by source and target."""
        if self.settings.score == "dds":
            g = dds_grad(pred.eps_src, pred.eps_trg)
        else:
            noise_prev = state.random.noise(state.z_src.shape, posterior=True)
            g = pds_grad(state.z_src, state.z_trg.detach(), noise, noise_prev, pred.eps_src, pred.eps_trg, t, t - 1,
                         self.stack.scheduler)
        if self.settings.lambda_weighting:
            g = g * pds_dds_ratio(t, t - 1, self.stack.scheduler).to(g).view(-1, 1, 1, 1)
        return g

    def step(self, state: EditState, iteration: int) -> IterationStats:
        """One iteration, the six steps of SPEC §2."""
        s = self.settings
        z_src, z_trg = state.z_src, state.z_trg
        # 1. a timestep per row and one noise shared by source and target
        t = state.random.timesteps(s.t_min, s.t_max)
        noise = state.random.noise(z_src.shape)
        # 2. noise both latents with it
        zt_src = add_noise(z_src, noise, t, self.stack.scheduler)
        zt_trg = add_noise(z_trg, noise, t, self.stack.scheduler)
        # 3. the UNet evaluations (and the CUT features)
        pred = self.predict(zt_src, zt_trg, t, state.emb)
        # 4. the score-distillation gradient, applied as d/dz_trg of scale * w_dds * sum(z_trg * g)
        g = self.score_gradient(state, noise, t, pred)
        scale = score_scale(*z_trg.shape[-2:]) * s.w_dds * s.score_weight
        loss = scale * (z_trg * g.detach()).sum()
        # 5. the CUT term, through the UNet into z_trg
        cut = None
        if self.capture is not None:
            cut = cut_losses(pred.ref_feats, pred.trg_feats, [row.select for row in state.rows], s.patch_sizes,
                             s.n_patches, s.tau, observe=self._observer(state))
            loss = loss + s.w_cut * s.cut_weight * cut.sum()
        # 6. the optimiser step
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        for row in state.rows:
            if row.trainer:
                row.trainer.after_iteration(iteration)
        finite = torch.isfinite(z_trg.detach()).flatten(1).all(dim=1)
        state.first_bad = torch.where(~finite & (state.first_bad == 0), iteration, state.first_bad)
        return IterationStats(iteration, t, scale * g.flatten(1).norm(dim=1), cut)

    @staticmethod
    def _observer(state: EditState):
        """Hand each row's pooled features to that row's selector trainer (if any)."""
        if not any(row.trainer for row in state.rows):
            return None

        def observe(layer: int, ref: torch.Tensor, trg: torch.Tensor) -> None:
            for b, row in enumerate(state.rows):
                row.trainer.observe(layer, ref[b: b + 1], trg[b: b + 1])

        return observe

    # --- the loop ---------------------------------------------------------------------------
    def row_selection(self, seed: int) -> RowSelection:
        """A row's selectors (one per CUT layer, or one shared), wrapped by a trainer when they learn."""
        if self.capture is None:
            return RowSelection([], None)
        if self.selector_training.per_layer:
            selectors = [self.make_selector(seed=seed) for _ in self.layer_names]
        else:
            selectors = [self.make_selector(seed=seed)] * len(self.layer_names)
        if not selectors[0].learns:
            return RowSelection(list(selectors), None)
        trainer = SelectorTrainer(selectors, self.selector_training, self.settings.iterations)
        return RowSelection(trainer.select_functions(), trainer)

    def start(self, z_src: torch.Tensor, emb: dict[str, torch.Tensor], seeds: Sequence[int]) -> EditState:
        """The state of a fresh edit of latents ``z_src`` (B rows, one seed each)."""
        z_trg = z_src.clone().requires_grad_(True)
        return EditState(z_src, z_trg, emb, self.make_optimizer(params=[z_trg], lr=self.settings.lr),
                         RowRandom(seeds, z_src.device), [self.row_selection(seed) for seed in seeds],
                         torch.zeros(z_src.shape[0], dtype=torch.long, device=z_src.device))

    def edit(self, images: torch.Tensor, source_prompts: Sequence[str], target_prompts: Sequence[str],
             callbacks: EditCallbacks | None = None, seeds: Sequence[int] | None = None) -> EditResult:
        """Edit (B, 3, H, W) images in [−1, 1], row b with ``seeds[b]`` (default: the settings' seed)."""
        s, callbacks = self.settings, callbacks or EditCallbacks()
        batch = images.shape[0]
        seeds = list(seeds) if seeds is not None else [s.seed] * batch
        emb = {"uncond": self.encode_prompts([""] * batch), "src": self.encode_prompts(source_prompts),
               "trg": self.encode_prompts(target_prompts)}
        state = self.start(self.encode_images(images), emb, seeds)
        final: list[dict[str, float]] = [{} for _ in range(batch)]
        pending: list[IterationStats] = []
        window_start = time.perf_counter()
        for it in tqdm(range(1, s.iterations + 1), desc="edit", disable=not s.progress, leave=False):
            pending.append(self.step(state, it))
            rounds_now = [b for b, row in enumerate(state.rows)
                          if row.trainer and row.trainer.rounds and row.trainer.rounds[-1]["iteration"] == it]
            snapshot_now = bool(s.snapshot_every) and it % s.snapshot_every == 0 and it != s.iterations
            # W&B wants steps in order: flush the buffered iterations before anything else at this step
            if it % s.log_every == 0 or it == s.iterations or rounds_now or snapshot_now:
                seconds = (time.perf_counter() - window_start) / len(pending)
                final = self._flush(pending, seconds, callbacks)
                pending, window_start = [], time.perf_counter()
                if bool((state.first_bad > 0).all()):
                    break  # every row has diverged
            for b in rounds_now:
                if callbacks.on_selector_round:
                    callbacks.on_selector_round(b, state.rows[b].trainer.rounds[-1])
            if snapshot_now and callbacks.on_snapshot:
                decoded = self.decode(state.z_trg.detach())
                for b in range(batch):
                    if state.first_bad[b] == 0:  # a diverged row keeps its last good snapshot
                        callbacks.on_snapshot(b, it, decoded[b])
        diverged = [int(v) or None for v in state.first_bad.tolist()]
        rounds = [row.trainer.rounds if row.trainer else [] for row in state.rows]
        return EditResult(state.z_trg.detach(), final, rounds, diverged)

    def _flush(self, pending: list[IterationStats], seconds: float, callbacks: EditCallbacks) -> list[dict[str, float]]:
        """Bring the buffered statistics to the host in one transfer and log them per row."""
        t = torch.stack([p.t for p in pending]).cpu()
        norms = torch.stack([p.score_norm for p in pending]).detach().cpu()
        cuts = torch.stack([p.cut_per_layer.detach() for p in pending]).cpu() if self.capture else None
        rows = []
        for b in range(t.shape[1]):
            for i, stats in enumerate(pending):
                values = {"iteration": stats.iteration, "t": int(t[i, b]), "score/grad_norm": float(norms[i, b]),
                          "time/iteration_s": seconds}
                if cuts is not None:
                    values["cut/total"] = float(cuts[i, b].sum())
                    values.update({f"cut/{name}": float(v) for name, v in zip(self.layer_names, cuts[i, b])})
                if callbacks.on_log:
                    callbacks.on_log(b, values)
            rows.append(values)
        return rows
