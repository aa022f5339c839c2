"""The editing loop of SPEC §2: one optimiser step on the target latents per iteration.

Every tensor carries a batch dimension B, one edit per row. Each row has its own random
streams (timesteps, noises), its own patch selectors and its own losses, so a row's result is
the same whether it is edited alone or in a batch. The loop never waits for the device except
every ``log_every`` iterations (logging, divergence check) and at snapshots.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from cpds_exp.conditioning import Conditioning
from cpds_exp.models import SDStack
from cpds_exp.scores import add_noise, guided
from cpds_exp.editing.selector_training import SelectorTraining
from cpds_exp.editing.selectors import PatchSelector, RandomSelector
from cpds_exp.editing.step import Prediction, RowRandom, Step
from cpds_exp.editing.terms import Term, TermContext
from cpds_exp.records import ITERATION, ITERATION_TIME, TIMESTEP


@dataclass
class EditSettings:
    """Everything that shapes an edit besides the model, the prompts, the loss terms and the selector."""

    lr: float = 0.1
    iterations: int = 200
    guidance_scale: float = 7.5
    t_min: int = 50
    t_max: int = 950
    seed: int = 0
    snapshot_every: int = 50
    log_every: int = 10
    progress: bool = True
    compile: bool = False
    compile_mode: str | None = None
    compile_backend: str = "inductor"
    channels_last: bool = False
    gradient_checkpointing: bool = False


@dataclass
class EditState:
    """What persists across the iterations of one (batched) edit."""

    z_src: torch.Tensor
    z_trg: torch.Tensor
    emb: dict[str, Conditioning]
    optimizer: torch.optim.Optimizer
    random: RowRandom
    rounds: list[list[dict[str, float | None]]]  # per row, the terms' selector training rounds so far
    first_bad: torch.Tensor  # (B,) iteration at which a row's latent stopped being finite, 0 if never


@dataclass
class IterationStats:
    """What one iteration measured, per row, kept on the device until it is logged."""

    iteration: int
    t: torch.Tensor
    stats: dict[str, torch.Tensor]  # the terms' (B,) statistics, detached
    rounds: dict[int, dict[str, float | None]]  # row → the selector round that followed this iteration


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
    """Runs an edit whose objective is the sum of ``terms`` (DDS / PDS / CDS / CPDS, ...) with one SD
    stack (SPEC §2–3). The terms are adopted here (``Term.bind``): one editor per set of terms."""

    def __init__(self, stack: SDStack, settings: EditSettings, terms: Mapping[str, Term],
                 make_optimizer: Callable[..., torch.optim.Optimizer],
                 make_selector: Callable[..., PatchSelector] = RandomSelector,
                 selector_training: SelectorTraining | None = None):
        self.stack = stack
        self.settings = settings
        self.terms = dict(terms)
        self.make_optimizer = make_optimizer
        context = TermContext(stack.unet, make_selector, selector_training or SelectorTraining())
        captures = [capture for capture in (term.bind(context) for term in self.terms.values()) if capture is not None]
        self.capture = captures[0] if captures else None
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
    def encode_prompts(self, prompts: Sequence[str], size: Sequence[int] | None = None) -> Conditioning:
        return self.stack.encode_prompts(prompts, size)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.stack.encode_images(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.stack.decode(latents)

    # --- one iteration ----------------------------------------------------------------------
    def _unet(self, z_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """ε in float32, whatever the model predicts (ε, v or x₀)."""
        return self.stack.predict_noise(z_t, t, cond, self.unet)

    def _guided(self, uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return guided(uncond, cond, self.settings.guidance_scale)

    def predict(self, zt_src: torch.Tensor, zt_trg: torch.Tensor, t: torch.Tensor,
                emb: dict[str, Conditioning]) -> Prediction:
        """Step 3: the four branches in as few UNet passes as the method allows.

        Without a term that reads features one no-grad pass takes all 4B branches. With one the 3B branches that need
        no graph go in one no-grad pass (its (z_src, y_src) features are the references) and
        the B target-conditional branches run with a graph so a feature loss (CUT) reaches z_trg.
        """
        batch = zt_src.shape[0]
        if self.capture is None:
            with torch.no_grad():
                eps = self._unet(torch.cat([zt_src, zt_src, zt_trg, zt_trg]), t.repeat(4),
                                 Conditioning.cat([emb["uncond"], emb["src"], emb["uncond"], emb["trg"]]))
            e_su, e_sc, e_tu, e_tc = eps.chunk(4)
            return Prediction(self._guided(e_su, e_sc), self._guided(e_tu, e_tc))
        with torch.no_grad():
            eps = self._unet(torch.cat([zt_src, zt_src, zt_trg.detach()]), t.repeat(3),
                             Conditioning.cat([emb["uncond"], emb["src"], emb["uncond"]]))
            ref_feats = [f[batch: 2 * batch] for f in self.capture.features()]
        e_su, e_sc, e_tu = eps.chunk(3)
        e_tc = self._unet(zt_trg, t, emb["trg"])
        trg_feats = self.capture.features()
        self.capture.clear()
        return Prediction(self._guided(e_su, e_sc), self._guided(e_tu, e_tc.detach()), ref_feats, trg_feats)

    def step(self, state: EditState, iteration: int) -> IterationStats:
        """One iteration, the six steps of SPEC §2."""
        s = self.settings
        # 1. a timestep per row and one noise shared by source and target
        t = state.random.timesteps(s.t_min, s.t_max)
        noise = state.random.noise(state.z_src.shape)
        # 2. noise both latents with it
        zt_src = add_noise(state.z_src, noise, t, self.stack.scheduler)
        zt_trg = add_noise(state.z_trg, noise, t, self.stack.scheduler)
        # 3. the UNet evaluations (and the features a term reads)
        pred = self.predict(zt_src, zt_trg, t, state.emb)
        # 4.–5. the loss terms (score distillation, CUT) on what the iteration shares
        shared = Step(state.z_src, state.z_trg, noise, t, pred, state.random, self.stack.scheduler)
        outputs = [term(shared) for term in self.terms.values()]
        loss = sum(value for out in outputs for value in out.losses.values())
        # 6. the optimiser step
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        rounds = {b: record for term in self.terms.values() for b, record in term.after_iteration(iteration).items()}
        finite = torch.isfinite(state.z_trg.detach()).flatten(1).all(dim=1)
        state.first_bad = torch.where(~finite & (state.first_bad == 0), iteration, state.first_bad)
        stats = {name: value.detach() for out in outputs for name, value in out.stats.items()}
        return IterationStats(iteration, t, stats, rounds)

    # --- the loop ---------------------------------------------------------------------------
    def start(self, z_src: torch.Tensor, emb: dict[str, Conditioning], seeds: Sequence[int]) -> EditState:
        """The state of a fresh edit of latents ``z_src`` (B rows, one seed each)."""
        for term in self.terms.values():
            term.start(seeds, self.settings.iterations)
        z_trg = z_src.clone().requires_grad_(True)
        return EditState(z_src, z_trg, emb, self.make_optimizer(params=[z_trg], lr=self.settings.lr),
                         RowRandom(seeds, z_src.device), [[] for _ in seeds],
                         torch.zeros(z_src.shape[0], dtype=torch.long, device=z_src.device))

    def edit(self, images: torch.Tensor, source_prompts: Sequence[str], target_prompts: Sequence[str],
             callbacks: EditCallbacks | None = None, seeds: Sequence[int] | None = None) -> EditResult:
        """Edit (B, 3, H, W) images in [−1, 1], row b with ``seeds[b]`` (default: the settings' seed)."""
        s, callbacks = self.settings, callbacks or EditCallbacks()
        batch = images.shape[0]
        seeds = list(seeds) if seeds is not None else [s.seed] * batch
        size = images.shape[-2:]  # SDXL's time ids: the image's size
        emb = {"uncond": self.encode_prompts([""] * batch, size), "src": self.encode_prompts(source_prompts, size),
               "trg": self.encode_prompts(target_prompts, size)}
        state = self.start(self.encode_images(images), emb, seeds)
        final: list[dict[str, float]] = [{} for _ in range(batch)]
        pending: list[IterationStats] = []
        window_start = time.perf_counter()
        for it in tqdm(range(1, s.iterations + 1), desc="edit", disable=not s.progress, leave=False):
            stats = self.step(state, it)
            pending.append(stats)
            for b, record in stats.rounds.items():
                state.rounds[b].append(record)
            snapshot_now = bool(s.snapshot_every) and it % s.snapshot_every == 0 and it != s.iterations
            if it % s.log_every == 0 or it == s.iterations:
                seconds = (time.perf_counter() - window_start) / len(pending)
                final = self._flush(pending, seconds, callbacks)
                pending, window_start = [], time.perf_counter()
                if bool((state.first_bad > 0).all()):
                    break  # every row has diverged
            for b, record in stats.rounds.items():
                if callbacks.on_selector_round:
                    callbacks.on_selector_round(b, record)
            if snapshot_now and callbacks.on_snapshot:
                decoded = self.decode(state.z_trg.detach())
                for b in range(batch):
                    if state.first_bad[b] == 0:  # a diverged row keeps its last good snapshot
                        callbacks.on_snapshot(b, it, decoded[b])
        diverged = [int(v) or None for v in state.first_bad.tolist()]
        return EditResult(state.z_trg.detach(), final, state.rounds, diverged)

    def _flush(self, pending: list[IterationStats], seconds: float, callbacks: EditCallbacks) -> list[dict[str, float]]:
        """Bring the buffered statistics to the host in one transfer and log them per row."""
        t = torch.stack([p.t for p in pending]).cpu()
        names = list(pending[0].stats)
        values = torch.stack([torch.stack([p.stats[name] for p in pending]).double() for name in names]).cpu() \
            if names else None
        rows = []
        for b in range(t.shape[1]):
            for i, stats in enumerate(pending):
                logged = {ITERATION: stats.iteration, TIMESTEP: int(t[i, b]),
                          **{name: float(values[k, i, b]) for k, name in enumerate(names)},
                          ITERATION_TIME: seconds}
                if callbacks.on_log:
                    callbacks.on_log(b, logged)
            rows.append(logged)
        return rows
