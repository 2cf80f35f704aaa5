"""`TrainConfig`: every knob of a training run, validated, and saved as `config.json` in the run dir."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from common import files

PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
LEARNING_RATE_SCHEDULES = ("constant", "linear_decay")
LOSSES = ("bce", "hinge", "relativistic")
IMAGE_ACTIVATIONS = ("tanh", "hard_tanh")
ARCHITECTURES = ("tutorial", "compact", "tutorial_cbn", "tutorial_cbn_3x3", "tutorial_cbn_3x3_wide_d",
                 "tutorial_cbn_3x3_5x5_pixels", "tutorial_cbn_3x3_4x4_up",
                 "tutorial_cbn_3x3_5x5_pixels_wide_g")  # the keys of trainer.models.ARCHITECTURES
CONFIG_FILE = "config.json"
# Fields that say where and how a run ran, not what it learns: two runs that differ only in these
# follow the same recipe (precision is recorded resolved, so "auto" and what it chose compare equal).
RUN_FIELDS = ("run_dir", "data_dir", "resume", "precision", "gpus", "cpu_replicas", "xla", "steps_per_call",
              "checkpoint_every_steps", "keep_checkpoints", "evaluate_every_epoch")


# The value every run had before each of these fields existed, whatever its default became since:
# a config recorded without the field reads it as this.
VALUES_BEFORE_FIELDS = {
    "discriminator_dropout": 0.3,  # the tutorial's
    "image_activation": "tanh",
    "mode_seeking": 0.0,
    "generator_average_interval": 1,  # an average updated on every step
    "generator_top_k": 1.0,
    "consistency": 0.0,
    "centring": 0.0,
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A training run. Field defaults are the project's default recipe (see docs/experiments.md)."""

    run_dir: str = "runs/default"
    """Where checkpoints (`checkpoints/`), TensorBoard logs (`logs/`), samples (`samples/`) and `config.json` go."""
    epochs: int = 6
    """Passes over the 60,000 MNIST training images (6 at batch 64 is 5,622 steps)."""
    batch_size: int = 64
    """Global batch size, split evenly over the replicas (must be divisible by the replica count)."""
    learning_rate: float = 5e-4
    """Adam learning rate of the generator (and of the discriminator unless `discriminator_learning_rate` is set)."""
    discriminator_learning_rate: float | None = None
    """Adam learning rate of the discriminator; None = `learning_rate` (a larger one is TTUR, Heusel et al. 2017)."""
    learning_rate_schedule: str = "linear_decay"
    """"constant", or "linear_decay": hold both learning rates, then lower them linearly to zero at the
    run's last step, from `learning_rate_decay_start` on (pix2pix's schedule)."""
    learning_rate_decay_start: float = 0.5
    """With "linear_decay": the share of the run's steps (over all `epochs`) after which the decay begins."""
    beta_1: float = 0.5
    """Adam's first-moment decay; 0.5 is the DCGAN paper's value (the tutorial uses Keras's 0.9)."""
    beta_2: float = 0.99
    """Adam's second-moment decay: 0.99, common for GANs, adapts faster than Keras's default 0.999 (which
    the recipes before this one used; docs/experiments.md)."""
    latent_dim: int = 100
    """Length of the generator's noise vector."""
    conditional: bool = True
    """Class-conditional GAN (clients can ask for a digit) or the tutorial's unconditional one."""
    classifier_weight: float = 0.6
    """Weight of the auxiliary classifier loss (AC-GAN): D also names real digits and G must make fakes
    D reads as the digit asked for; 0 = none, and always 0 for unconditional runs."""
    twin_classifier: float = 0.0
    """TAC-GAN (Gong et al. 2019), with `classifier_weight` > 0: D gets a second digit head that learns to name
    the fakes' digits, and G's classifier loss subtracts this share of that head's cross-entropy. 1 cancels
    AC-GAN's pull towards the digits easiest to name (a pull that costs variety); 0 = plain AC-GAN."""
    classifier_confidence: float = 0.0
    """With `classifier_weight` > 0: G's classifier loss stops counting for a fake once D's classifier gives
    it the digit asked for with at least this probability, so a fake that already reads as its digit is
    not pulled on towards the digits easiest to name (a pull that costs variety); 0 = always counts."""
    discriminator_dropout: float = 0.0
    """Dropout rate after each of D's convolutions; 0 = no dropout layers (the tutorial's D uses 0.3;
    why the default has none: docs/experiments.md)."""
    architecture: str = "tutorial_cbn_3x3_5x5_pixels"
    """G and D's layers (trainer/models.py): "tutorial" (the DCGAN tutorial's), "compact", "tutorial_cbn"
    (the digit also conditions G's BatchNorm), "tutorial_cbn_3x3" (tutorial_cbn with 3x3 kernels),
    "tutorial_cbn_3x3_wide_d" (the same with D twice as wide), "tutorial_cbn_3x3_5x5_pixels" (5x5
    kernels in G's image layer and D's first convolution) or "tutorial_cbn_3x3_4x4_up" (4x4 kernels in
    G's stride-2 layers and D's first convolution)."""
    image_activation: str = "hard_tanh"
    """G's last activation, from its image layer to pixels in [-1, 1]: "tanh", or "hard_tanh" (clip to [-1, 1]),
    which reaches -1 and 1 exactly, where tanh only nears them: the real digits' background is exactly -1."""
    loss: str = "bce"
    """D and G's adversarial loss: "bce" (the non-saturating DCGAN loss), "hinge" (Lim & Ye 2017; the loss
    projection discriminators were published with) or "relativistic" (RpGAN: D compares each real image with
    a fake, softplus(D(fake) - D(real)); R3GAN pairs it with R1 for mode coverage)."""
    spectral_norm: bool = False
    """Spectral normalisation of D's convolution and dense kernels (Miyato et al. 2018), one power iteration a step."""
    r1_gamma: float = 0.0
    """Weight γ of the R1 penalty (γ/2)·E[|∇D(real)|²] on D (Mescheder et al. 2018); 0 = none. Applied lazily:
    every `r1_interval` steps with γ scaled by the interval (StyleGAN2)."""
    r1_interval: int = 16
    """With `r1_gamma` > 0: the penalty is added on every this many steps (1 = every step)."""
    minibatch_std: bool = False
    """D gets one more feature map: the standard deviation of its last features over groups of 4 images of the
    batch (ProGAN), so it can see a batch that lacks variety."""
    mode_seeking: float = 0.1
    """Weight of MSGAN's mode-seeking term in G's loss (Mao et al. 2019); 0 = none. G's fakes come in pairs
    asked for the same digit, and G is pushed to draw them as far apart as their noise vectors are."""
    generator_top_k: float = 1.0
    """Top-k training (Sinha et al. 2020): the share of each batch's fakes, those D rates most real, that G's
    adversarial loss counts by the run's last step, falling linearly from all of them at its first; 1 = all,
    always. G then stops chasing the fakes D finds worst, whose gradients point across the gaps between styles."""
    consistency: float = 0.0
    """Weight of balanced consistency regularisation in D's loss (bCR, Zhao et al. 2021): the squared change of
    D's logit when a real or a fake image moves by up to `consistency_shift` pixels; 0 = none. Costs D a
    forward and backward pass over both batches, moved."""
    consistency_shift: int = 2
    """With `consistency` > 0: the largest move, in whole pixels, right or left and up or down."""
    centring: float = 0.1
    """Weight of a penalty in G's loss: each fake's squared distance, in pixels, from its centre of mass to the
    pixel where MNIST centred every digit's (`losses.MNIST_CENTRE`); 0 = none. G's digits otherwise wander
    around that point, which real ones never do, and the judges read the wandering as unreal
    (docs/experiments.md)."""
    max_steps: int | None = None
    """Stop after this many steps in total (smoke runs); None trains all epochs."""
    seed: int = 0
    """Seeds the weights, the noise generator and the per-epoch shuffle: the same seed gives the same run."""
    data_dir: str | None = None
    """The TFDS data dir holding (or receiving) the `mnist` dataset; None is TFDS's default (~/tensorflow_datasets)."""
    resume: bool = True
    """Continue from the newest checkpoint in `run_dir` when there is one."""
    precision: str = "auto"
    """float32, mixed_bfloat16, mixed_float16 (GPUs), or auto: mixed_bfloat16 on a CPU-only run where the
    CPU runs it faster (`strategy.resolve_precision`), else float32; config.json records the choice."""
    gpus: int | None = None
    """GPUs to train on (0 = CPU only); None uses every visible GPU, or the CPU when there is none."""
    cpu_replicas: int | None = None
    """Split the CPU into this many logical devices and mirror over them (tests, CI); None = one CPU device."""
    xla: bool = False
    """Compile the step's forward and backward pass with XLA (`jit_compile`); one device only, meant
    for a GPU (on the CPUs measured it was slower: docs/experiments.md)."""
    steps_per_call: int = 10
    """Training steps run inside one compiled `tf.function` call; more steps cut Python overhead."""
    checkpoint_every_steps: int = 200
    """Save a checkpoint at least this often (and at every epoch end, on SIGINT/SIGTERM and at the end)."""
    keep_checkpoints: int = 3
    """How many recent checkpoints to keep."""
    generator_average_decay: float = 0.999
    """Decay of a moving average of G's weights (0 = none); the average draws the sample grids and is
    what `export` writes, as it gives cleaner digits than G itself."""
    generator_average_interval: int = 4
    """Update the moving average on every this many steps only, with the decay raised to that power, so it
    follows G as closely for a fraction of the cost (each update reads and writes all of G's weights)."""
    generator_average_rampup: float = 0.0
    """0 = the average's decay warms up as (1 + step) / (10 + step); > 0 = its half-life is instead this share of
    the steps so far, capped at `generator_average_decay`'s half-life (StyleGAN2's ramp-up)."""
    evaluate_every_epoch: bool = True
    """At each epoch end, judge a fixed sample (1,000 digits, each in its real test share) with the
    shipped MNIST judges and log the figures to TensorBoard (`quality/...`), when the caller plugs the
    judges in."""

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, "epochs", self.epochs, "at least 1")
        _require(self.batch_size >= 1, "batch_size", self.batch_size, "at least 1")
        _require(0 < self.learning_rate < 1, "learning_rate", self.learning_rate, "between 0 and 1")
        _require(self.discriminator_learning_rate is None or 0 < self.discriminator_learning_rate < 1,
                 "discriminator_learning_rate", self.discriminator_learning_rate, "between 0 and 1, or None")
        _require(self.learning_rate_schedule in LEARNING_RATE_SCHEDULES, "learning_rate_schedule",
                 self.learning_rate_schedule, f"one of {', '.join(LEARNING_RATE_SCHEDULES)}")
        _require(0 <= self.learning_rate_decay_start < 1, "learning_rate_decay_start", self.learning_rate_decay_start,
                 "in [0, 1)")
        _require(0 <= self.discriminator_dropout < 1, "discriminator_dropout", self.discriminator_dropout, "in [0, 1)")
        _require(self.classifier_weight >= 0, "classifier_weight", self.classifier_weight, "0 or more")
        if not self.conditional:
            object.__setattr__(self, "classifier_weight", 0.0)  # frozen; config.json shows what ran
        _require(0 <= self.twin_classifier <= 1, "twin_classifier", self.twin_classifier, "in [0, 1]")
        _require(not self.twin_classifier or self.classifier_weight > 0, "twin_classifier", self.twin_classifier,
                 "0 when there is no auxiliary classifier (classifier_weight 0, or an unconditional run)")
        _require(0 <= self.classifier_confidence < 1, "classifier_confidence", self.classifier_confidence, "in [0, 1)")
        _require(not self.classifier_confidence or self.classifier_weight > 0, "classifier_confidence",
                 self.classifier_confidence, "0 when there is no auxiliary classifier (classifier_weight 0, or an "
                 "unconditional run)")
        _require(0 <= self.beta_1 < 1, "beta_1", self.beta_1, "in [0, 1)")
        _require(0 < self.beta_2 < 1, "beta_2", self.beta_2, "in (0, 1)")
        _require(self.latent_dim >= 2, "latent_dim", self.latent_dim, "at least 2")
        _require(self.max_steps is None or self.max_steps >= 1, "max_steps", self.max_steps, "at least 1")
        _require(self.architecture in ARCHITECTURES, "architecture", self.architecture,
                 f"one of {', '.join(ARCHITECTURES)}")
        _require(self.image_activation in IMAGE_ACTIVATIONS, "image_activation", self.image_activation,
                 f"one of {', '.join(IMAGE_ACTIVATIONS)}")
        _require(self.precision in PRECISIONS, "precision", self.precision, f"one of {', '.join(PRECISIONS)}")
        _require(self.gpus is None or self.gpus >= 0, "gpus", self.gpus, "0 or more")
        _require(self.cpu_replicas is None or self.cpu_replicas >= 1, "cpu_replicas", self.cpu_replicas, "at least 1")
        _require(not (self.cpu_replicas and self.gpus), "cpu_replicas", self.cpu_replicas,
                 "used only without GPUs (pass --gpus 0 or leave --gpus out)")
        _require(self.steps_per_call >= 1, "steps_per_call", self.steps_per_call, "at least 1")
        _require(self.checkpoint_every_steps >= 1, "checkpoint_every_steps", self.checkpoint_every_steps, "at least 1")
        _require(0 <= self.generator_average_decay < 1, "generator_average_decay", self.generator_average_decay,
                 "in [0, 1)")
        _require(self.generator_average_interval >= 1, "generator_average_interval",
                 self.generator_average_interval, "at least 1")
        _require(0 <= self.generator_average_rampup <= 1, "generator_average_rampup", self.generator_average_rampup,
                 "in [0, 1]")
        _require(self.loss in LOSSES, "loss", self.loss, f"one of {', '.join(LOSSES)}")
        _require(self.r1_gamma >= 0, "r1_gamma", self.r1_gamma, "0 or more")
        _require(self.mode_seeking >= 0, "mode_seeking", self.mode_seeking, "0 or more")
        _require(0 < self.generator_top_k <= 1, "generator_top_k", self.generator_top_k, "in (0, 1]")
        _require(self.centring >= 0, "centring", self.centring, "0 or more")
        _require(self.consistency >= 0, "consistency", self.consistency, "0 or more")
        _require(1 <= self.consistency_shift <= 8, "consistency_shift", self.consistency_shift, "from 1 to 8")
        _require(self.r1_interval >= 1, "r1_interval", self.r1_interval, "at least 1")
        _require(self.keep_checkpoints >= 1, "keep_checkpoints", self.keep_checkpoints, "at least 1")
        _require(bool(self.run_dir), "run_dir", self.run_dir, "a directory path")

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.run_dir) / "checkpoints"

    def save(self) -> Path:
        """Writes the resolved config as `<run_dir>/config.json`, atomically."""
        return files.write_json_atomic(Path(self.run_dir) / CONFIG_FILE, dataclasses.asdict(self))

    @classmethod
    def load(cls, run_dir: str) -> "TrainConfig":
        """Reads `<run_dir>/config.json`; raises ValueError when it is missing or not a TrainConfig."""
        path = Path(run_dir) / CONFIG_FILE
        try:
            values = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"no {CONFIG_FILE} in run dir '{run_dir}': is it a digitgan run?") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"'{path}' is not valid JSON: {error}") from None
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """A TrainConfig from a recorded one (config.json, a bundle's metadata); fields recorded before
        they existed take the value every run had then, and unknown keys are ignored."""
        values = {**VALUES_BEFORE_FIELDS, **values}
        known = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})


def recipe(config: TrainConfig) -> dict:
    """The fields of `config` that decide what the run learns (all but RUN_FIELDS)."""
    return {key: value for key, value in dataclasses.asdict(config).items() if key not in RUN_FIELDS}


def _require(condition: bool, name: str, value: object, expectation: str) -> None:
    if not condition:
        raise ValueError(f"{name} must be {expectation}, got {value!r}")
