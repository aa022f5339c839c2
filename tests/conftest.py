"""Test session set-up: never touch the network, never write outside temporary folders."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

_SANDBOX = Path(tempfile.mkdtemp(prefix="cpds_exp_tests_"))
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "WANDB_DIR": str(_SANDBOX / "wandb"),
    "WANDB_DATA_DIR": str(_SANDBOX / "wandb-data"),
    "WANDB_CACHE_DIR": str(_SANDBOX / "wandb-cache"),
    "WANDB_CONFIG_DIR": str(_SANDBOX / "wandb-config"),
    "TORCH_HOME": str(_SANDBOX / "torch"),
    "HF_HOME": str(_SANDBOX / "hf"),
    # the tiny models' ops are too small to split across threads; one thread is faster and
    # immune to a busy neighbour core (two spinning OpenMP threads then slow down ~50x)
    "OMP_NUM_THREADS": "1",
}
os.environ.update(OFFLINE_ENV)
for key in ("WANDB_API_KEY",):
    os.environ.pop(key, None)

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402  (after the environment is set)

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_stack():
    """One tiny SD stack for the session (building it is cheap; importing diffusers is not)."""
    from cpds_exp.models import load_stack

    return load_stack(None, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def compose_config():
    """Compose the app's config the way `python run.py ...` would, without running it."""
    from hydra import compose, initialize_config_dir

    from cpds_exp.cli import CONFIG_DIR

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose("config", overrides=list(overrides))

    return _compose
