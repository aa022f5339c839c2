"""Small builders shared by the tests."""
from __future__ import annotations

import functools

import torch
from hydra import compose, initialize_config_dir

from cpds_exp.cli import CONFIG_DIR
from cpds_exp.config import build_terms
from cpds_exp.editing.editor import EditSettings, Editor
from cpds_exp.editing.selectors import RandomSelector
from cpds_exp.editing.terms import Term

#: Top-level knobs that reach the loss terms through conf/term/*.yaml.
TERM_KNOBS = ("w_dds", "w_cut", "n_patches", "patch_sizes", "tau", "cut_layers")


def method_terms(method: str, **knobs) -> dict[str, Term]:
    """The terms of conf/method/<method>.yaml as run.py builds them, with top-level knobs set."""
    overrides = [f"method={method}"] + [f"{k}={list(v) if isinstance(v, tuple) else v}" for k, v in knobs.items()]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return build_terms(compose("config", overrides=overrides))


def make_editor(stack, method: str = "cds", make_selector=None, selector_training=None, **settings) -> Editor:
    """An editor of a configured method, quiet, with the published defaults and whatever settings
    (editor settings or term knobs such as n_patches) a test overrides."""
    knobs = {k: settings.pop(k) for k in TERM_KNOBS if k in settings}
    settings.setdefault("progress", False)
    seed = settings.get("seed", 0)
    return Editor(stack, EditSettings(**settings), method_terms(method, **knobs), functools.partial(torch.optim.SGD),
                  make_selector or functools.partial(RandomSelector, seed=seed), selector_training)


def make_image(seed: int = 0, size: int = 64) -> torch.Tensor:
    """A smooth random image in [−1, 1], (1, 3, size, size)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, size // 8, size // 8, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear") * 2 - 1
