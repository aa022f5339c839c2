"""The typed schema of the whole config, registered in Hydra's ConfigStore so that composition
itself validates: a misspelt key, an option a group does not have or a value of the wrong type
fails before a job starts, and a sweep can set a key of any option of a group.

Defaults live here, once: the YAML in ``conf/`` only picks options and sets what differs. Light on
purpose (no torch): Hydra's resolvers and the job folder names read it before a job starts.
Whether a key changes an edit's result is metadata on its field (``changes_result``): the resume
fingerprint and the job folder names leave out the keys that do not.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING

from cpds_exp.errors import CpdsError


def neutral(default: Any = MISSING, **kwargs: Any) -> Any:
    """A field that does not change an edit's result (logging, speed, bookkeeping)."""
    return field(default=default, metadata={"changes_result": False}, **kwargs)


class Positive(str, Enum):
    """Which positions are the positive class: the paper's text (similar) or the published code (dissimilar)."""

    similar = "similar"
    dissimilar = "dissimilar"


class ThresholdScope(str, Enum):
    """Which distances share a label threshold: all that a selector trains on in a round (the
    published code) or each observation's own (one image, layer and patch size at one iteration)."""

    round = "round"
    observation = "observation"


@dataclass
class SelectorTraining:
    """How learning selectors are trained; ignored by selectors that do not learn."""

    train_every: int = 10
    positive: Positive = Positive.similar
    percentile: float = 80.0
    per_layer: bool = False
    threshold_scope: ThresholdScope = ThresholdScope.round


PROTOCOLS = ("corrected", "published")


@dataclass(unsafe_hash=True)  # hashable: it keys the per-process cache of metric models
class MetricsConfig:
    """Which metric models to use; ``enabled: false`` skips metrics altogether.

    ``clip_model``/``clip_pretrained`` (open_clip) and ``lpips_size`` serve the corrected protocol,
    ``hf_clip_model`` (transformers) the published one, which is fixed at 224×224; ``tiny`` builds
    either CLIP with random weights.
    """

    enabled: bool = True
    protocol: str = "corrected"
    clip_model: str = "ViT-B-16-quickgelu"
    clip_pretrained: str | None = "openai"
    hf_clip_model: str = "openai/clip-vit-base-patch16"
    lpips_net: str = "squeeze"
    lpips_pretrained: bool = True
    lpips_size: int = 224

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise CpdsError(f"metrics.protocol={self.protocol!r}: use corrected (CLIP as OpenAI trained it, "
                            "LPIPS on [-1, 1]) or published (what the published evaluate.py computed)")


class ImagePrep(str, Enum):
    resize = "resize"
    center_crop = "center_crop"


@dataclass
class MethodConfig:
    """A method = its loss terms (``_target_`` a :class:`Term` dataclass, with its options) and its
    published learning rate. By convention the score term is ``score`` and the CUT term ``cut``."""

    name: str
    lr: float
    terms: dict[str, Any]


@dataclass
class TaskConfig:
    """A named prompt pair for datasets that take their prompts from the task (cats, folder)."""

    name: str
    source_prompt: str
    target_prompt: str


def since_added(default: Any) -> Any:
    """A field added after edits were recorded: left out of the resume fingerprint while at its
    default, so those edits still resume (set, it changes the result like any other field)."""
    return field(default=default, metadata={"fingerprint_at_default": False})


class Architecture(str, Enum):
    """SD 1.x/2.x (one CLIP text encoder) or SDXL (two, with pooled embeddings and time ids)."""

    sd = "sd"
    sdxl = "sdxl"


class PredictionType(str, Enum):
    """What a UNet predicts (diffusers' ``prediction_type``); the editor converts it to ε."""

    epsilon = "epsilon"
    v_prediction = "v_prediction"
    sample = "sample"


@dataclass
class ModelConfig:
    """``pretrained``: a hub id or a local diffusers folder; null builds the tiny offline stack.

    ``architecture``: which tiny stack to build (null: sd); a loaded model's is read from its
    model_index.json and checked against this when set. ``prediction_type``: null reads the
    scheduler's; set it only for a model whose scheduler config is wrong. ``vae``: a hub id or
    folder of a VAE to use instead of the model's (SDXL in float16: madebyollin/sdxl-vae-fp16-fix).
    ``variant``: auto loads fp16 weights for a half-precision run where the repository has them
    (half the download), null the full-precision ones, or name a variant."""

    name: str
    pretrained: Optional[str]
    resolution: int
    revision: Optional[str] = None
    seed: int = 0
    architecture: Optional[Architecture] = since_added(None)
    prediction_type: Optional[PredictionType] = since_added(None)
    vae: Optional[str] = since_added(None)
    variant: Optional[str] = neutral("auto")


# --- selectors: every option of the selector group has a schema, all with the training options --
@dataclass
class SelectorConfig(SelectorTraining):
    """A patch selector: its class and options (cpds_exp.editing.selectors), plus how learning selectors are
    trained (ignored by those that do not learn; present in all so a sweep over selectors can set them)."""

    name: str = MISSING
    _target_: str = MISSING


@dataclass
class RandomSelectorConfig(SelectorConfig):
    """The published default: n positions uniformly at random (SPEC §4)."""

    name: str = "random"
    _target_: str = "cpds_exp.editing.selectors.RandomSelector"


@dataclass
class MLPSelectorConfig(SelectorConfig):
    """The paper's meta-learner: widest feature width → hidden sizes → 1, BCE, Adam."""

    name: str = "meta"
    _target_: str = "cpds_exp.editing.selectors.MLPSelector"
    hidden_sizes: list[int] = field(default_factory=lambda: [64, 32])
    lr: float = 1e-3
    epochs: int = 1
    batch_size: int = 4096
    max_train_samples: Optional[int] = None   # null: every gathered position


@dataclass
class KNNSelectorConfig(SelectorConfig):
    """k-nearest neighbours on standardised features (scikit-learn), k = 5 as in the paper."""

    name: str = "knn"
    _target_: str = "cpds_exp.editing.selectors.KNNSelector"
    n_neighbors: int = 5
    weights: str = "uniform"
    max_train_samples: Optional[int] = 4096   # a seeded random subset of a round's positions


@dataclass
class SVMSelectorConfig(SelectorConfig):
    """An RBF support-vector machine with probability outputs (left out of the paper's Table 2)."""

    name: str = "svm"
    _target_: str = "cpds_exp.editing.selectors.SVMSelector"
    C: float = 1.0
    kernel: str = "rbf"
    gamma: Any = "scale"
    max_train_samples: Optional[int] = 2048


@dataclass
class RFSelectorConfig(SelectorConfig):
    """A random forest (scikit-learn), 100 trees."""

    name: str = "rf"
    _target_: str = "cpds_exp.editing.selectors.RandomForestSelector"
    n_estimators: int = 100
    max_depth: Optional[int] = None
    n_jobs: Optional[int] = None
    max_train_samples: Optional[int] = 4096


SELECTOR_SCHEMAS = {"random": RandomSelectorConfig, "meta": MLPSelectorConfig, "knn": KNNSelectorConfig,
                    "svm": SVMSelectorConfig, "rf": RFSelectorConfig}


# --- optimizers, loggers, datasets: a schema per option ---------------------------------------------
@dataclass
class OptimizerConfig:
    """A torch optimiser for the latent, built partially: lr comes from the run (``lr`` or the method's)."""

    name: str = MISSING
    _target_: str = MISSING
    _partial_: bool = True


@dataclass
class SGDConfig(OptimizerConfig):
    """Plain SGD, as published."""

    name: str = "sgd"
    _target_: str = "torch.optim.SGD"
    momentum: float = 0.0


@dataclass
class AdamConfig(OptimizerConfig):
    """Adam (not in the paper); pair it with a smaller lr."""

    name: str = "adam"
    _target_: str = "torch.optim.Adam"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class LoggerConfig:
    name: str = MISSING
    _target_: str = MISSING


@dataclass
class NullLoggerConfig(LoggerConfig):
    """No experiment tracking: outputs stay in the run folder."""

    name: str = "none"
    _target_: str = "cpds_exp.loggers.NullLogger"


@dataclass
class WandbLoggerConfig(LoggerConfig):
    """Weights & Biases: online when logged in, else offline with a notice."""

    name: str = "wandb"
    _target_: str = "cpds_exp.loggers.WandbLogger"
    project: str = "cpds-exp"
    entity: Optional[str] = None
    mode: str = "auto"                     # auto, online, offline, disabled
    group: Optional[str] = II("sweep_name")  # every run of a sweep in one W&B group (null: the sweep folder's name)
    tags: list[str] = field(default_factory=list)
    job_type: Optional[str] = II("method.name")
    verbose: bool = False                  # true: W&B prints its banner and run summary for every edit


@dataclass
class DatasetConfig:
    name: str = MISSING
    _target_: str = MISSING


@dataclass
class SampleDatasetConfig(DatasetConfig):
    """A real photograph shipped with scikit-learn, so a first run needs no files."""

    name: str = "sample"
    _target_: str = "cpds_exp.data.sample"
    source_prompt: str = "a photo of an orange dahlia"
    target_prompt: str = "a photo of a blue dahlia"


@dataclass
class SingleDatasetConfig(DatasetConfig):
    """One image file and its prompt pair (or a list of target prompts)."""

    name: str = "single"
    _target_: str = "cpds_exp.data.single"
    image: str = MISSING
    source_prompt: str = MISSING
    target_prompt: Any = MISSING          # a prompt, or a list of them (one edit each)
    task: Optional[str] = None


@dataclass
class FolderDatasetConfig(DatasetConfig):
    """Every image of a folder with the task's prompt pair."""

    name: str = "folder"
    _target_: str = "cpds_exp.data.folder"
    path: str = MISSING
    source_prompt: str = II("task.source_prompt")
    target_prompt: str = II("task.target_prompt")
    task: Optional[str] = II("task.name")
    limit: Optional[int] = None           # edit only the first N images


@dataclass
class ManifestDatasetConfig(DatasetConfig):
    """Rows of image, source_prompt, target_prompt[, name, task] from a CSV or JSONL file."""

    name: str = "manifest"
    _target_: str = "cpds_exp.data.manifest"
    path: str = MISSING
    task: Optional[str] = None
    limit: Optional[int] = None


GROUP_SCHEMAS = {
    "selector": SELECTOR_SCHEMAS,
    "optimizer": {"sgd": SGDConfig, "adam": AdamConfig},
    "logger": {"none": NullLoggerConfig, "wandb": WandbLoggerConfig},
    "dataset": {"sample": SampleDatasetConfig, "single": SingleDatasetConfig, "folder": FolderDatasetConfig,
                "manifest": ManifestDatasetConfig},
}


@dataclass
class AppConfig:
    """Every option of a run. ``python run.py KEY=VALUE`` sets any of them."""

    method: MethodConfig = MISSING
    model: ModelConfig = MISSING
    selector: Any = MISSING      # typed by each option's schema (SELECTOR_SCHEMAS); a new selector may bring its own
    optimizer: Any = MISSING
    dataset: Any = MISSING
    logger: Any = neutral()
    task: TaskConfig = MISSING
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    sweep_name: Optional[str] = neutral(None)        # names a sweep: its W&B group and its folder
    num_shards: int = neutral(1)                     # split the dataset into this many shards ...
    shard: int = neutral(0)                          # ... and edit this one (shard='range(N)' covers all)
    force: bool = neutral(False)                     # recompute edits that are already finished
    claim_timeout_h: Optional[float] = neutral(24.0)  # a claim held longer is taken over
    objective: str = neutral("clip - lpips")         # what a job returns to a sweeper that optimises (Optuna):
                                                     # + - * / of numbers and the job's mean clip and lpips
    seed: int = 0
    lr: Optional[float] = None                       # null: the method's published lr (method.lr)
    iterations: int = 200
    guidance_scale: float = 7.5
    w_dds: float = 1.0                               # weight of the score (DDS/PDS) term
    w_cut: float = 3.0                               # weight of the CUT (PatchNCE) term
    n_patches: int = 256                             # positions contrasted per layer and patch size
    patch_sizes: list[int] = field(default_factory=lambda: [1, 2])
    tau: float = 0.07                                # PatchNCE temperature
    t_min: int = 50                                  # timesteps are drawn uniformly from [t_min, t_max)
    t_max: int = 950
    cut_layers: list[str] = field(default_factory=lambda: ["up_blocks.*.attn1"])  # globs over attention modules
    resolution: int = II("model.resolution")         # any multiple of 64
    image_prep: ImagePrep = ImagePrep.resize         # resize (the published stretch) or center_crop
    device: str = neutral("auto")                    # auto, cpu, cuda, cuda:1, ...
    dtype: str = "auto"                              # auto: float16 on CUDA, float32 on CPU
    snapshot_every: int = neutral(50)                # 0 turns snapshots off
    log_every: int = neutral(10)                     # every iteration is logged; the host syncs this often
    progress: bool = neutral(True)
    batch_size: int = neutral(1)                     # edits optimised together, each as if alone
    compile: bool = neutral(False)                   # torch.compile the UNet (feature capture keeps working)
    compile_mode: Optional[str] = neutral(None)
    compile_backend: str = neutral("inductor")
    channels_last: bool = neutral(False)
    gradient_checkpointing: bool = neutral(False)    # less memory for the target branch's graph, more time
    profile: bool = neutral(False)                   # torch profiler trace in <run>/profile/ (debug=profile)


#: Config keys that do not change an edit's result: a finished edit is reused across them, and they
#: enter neither the resume fingerprint nor a sweep's job folder names. Dotted keys name a group's field.
NON_SEMANTIC_KEYS = tuple(f.name for f in fields(AppConfig) if not f.metadata.get("changes_result", True)) + tuple(
    f"model.{f.name}" for f in fields(ModelConfig) if not f.metadata.get("changes_result", True)) + ("dataset.limit",)

#: Dotted keys left out of the resume fingerprint while at these defaults (fields added later).
FINGERPRINT_DEFAULTS = {f"model.{f.name}": f.default for f in fields(ModelConfig)
                        if not f.metadata.get("fingerprint_at_default", True)}


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore: conf/config.yaml and each group option build on them."""
    store = ConfigStore.instance()
    store.store(name="config_schema", node=AppConfig)
    for group, schemas in GROUP_SCHEMAS.items():
        for name, schema in schemas.items():
            store.store(group=group, name=f"{name}_schema", node=schema)
