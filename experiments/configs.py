"""Named experiment configurations: dataset x model x methods x seeds, with their sources.

``get_config(name)`` returns an :class:`ExperimentConfig`; ``list_configs()`` the names.
Every hyperparameter taken from a paper names its source in ``sources``; everything else is
our choice and says so. Paper references:

* [AdamBS] Liu, Wu, Mozafari, "Adam with Bandit Sampling for Deep Learning", NeurIPS 2020
  (/work/shared/papers/000_3210f3def4dac4d3.txt): §5.1 setup (5 seeds, same initialization,
  beta1 = 0.9, beta2 = 0.999, logit-gradient bound as feedback, training loss vs wall-clock),
  §5.2 CNNs (batch 128, lr 0.001, 10 epochs), §5.3 LSTM (batch 32, lr 1e-6, 200 epochs),
  §5.4 RCNN on IMDB (batch 30, lr 0.001, 10 epochs).
* [Lahire] Lahire, "Non-Uniform Sampling and Adaptive Optimizers in Deep Learning"
  (/work/shared/papers/004_57fb09608c6ed123.txt): §4 / Fig. 1 / Table 1 (MLP of Appendix E,
  lr 0.01, batch 5, PyTorch SGD/RMSProp/Adam with default hyper-parameters, 1000 steps,
  average of 50 runs, wall-clock per run).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from experiments.lookup import lookup

ADAMBS = "AdamBS paper (000_3210f3def4dac4d3.txt)"
LAHIRE = "Lahire (004_57fb09608c6ed123.txt)"
OURS = "our choice (no paper value)"
LR_SCHEDULES = ("linear", "cosine")  # the compute-matched protocol's decays to zero


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """One experiment.

    Attributes:
      name: registry name (also the default output folder ``results/<name>``).
      description: one or two sentences.
      dataset: ``experiments.data`` name; ``dataset_options`` are passed to the loader.
      model: ``experiments.models`` name; ``model_options`` are passed to ``get_model``.
      methods: method names (``experiments.methods``).
      learning_rate, batch_size: the optimizer's step size and K.
      num_steps: training steps per run; or ``num_epochs`` (steps = ceil(epochs * n / K)).
      num_seeds: seeds 0 .. num_seeds-1; a seed fixes the initialization (the same for
        every method) and the training keys.
      eval_every: evaluate (full training loss, train/test error) every this many steps.
      chunk_steps: about this many training steps per jitted call (a ``lax.scan`` that
        keeps a copy of the parameters every ``eval_every`` steps, evaluated after the
        timed call); rounded to a multiple of ``eval_every`` that divides the run.
      target_loss: training loss for the time-to-target column (None: no column).
      feedback: what the bandit methods learn from (``"logit_grad_norm"``: the paper's).
      method_options: per-method sampler options, e.g. ``{"adam-impt": {"presample": 3}}``.
      subset: train on the first ``subset`` training examples only (quick looks).
      dataset_seed: the loader's ``seed`` (split / generation); None: its default.
      eval_train_examples: evaluate the training loss on the first this many training
        examples (None: all of them); for the large paper datasets on a CPU.
      eval_batch_size: examples per forward pass of the evaluation.
      needs_files: the dataset must be downloaded or placed by hand (paper configs).
      loss_log_scale: log-scale loss axes in the plots.
      table_layout: ``"lahire"`` adds Lahire's Table 1 layout (sampling x optimizer,
        wall-clock per run) to ``table.md``.
      sources: hyperparameter -> where its value comes from.
      loop: how a chunk runs: ``"scan"`` (one ``lax.scan``), ``"python"`` (a Python loop
        of one jitted step per call) or ``"auto"`` (python on CPU for models with
        convolutions, whose backward pass XLA:CPU runs ~20x slower inside a loop; else scan).
      eval_informative_only: evaluate losses and errors only on the examples whose
        features are not all zero (heavy-tailed: an all-zero example has the loss log 2 under
        every parameter, so those examples only add a constant to the full loss).
      diagnostic_examples: m, the examples whose exact gradient norms the sampler
        diagnostics compare p with at every evaluation point (all n if n <= m, else a fixed
        random subset of m; 0: no such diagnostics). See ``experiments.diagnostics``.
      budget_seconds: None (the default): every method runs the configuration's steps.
        A number S: the compute-matched protocol (``experiments.compute_matched``): every
        method gets S seconds of training on this machine, T_m = floor(S x its measured
        steps/s) steps, and its learning rate decays to zero at T_m.
      lr_schedule: the decay of the compute-matched protocol, the same shape for every
        method: ``"linear"`` (lr (1 - t/T_m)) or ``"cosine"`` (lr (1 + cos(pi t/T_m))/2).
      calibration_rounds: one-chunk runs per method (interleaved) that measure its steps/s.
      max_steps: cap on the steps per run (``--max-steps``, for a quick look; AdamBS's
        default eta0 then uses the capped T).
    """

    name: str
    description: str
    dataset: str
    model: str
    methods: tuple[str, ...]
    learning_rate: float
    batch_size: int
    num_steps: int | None = None
    num_epochs: float | None = None
    num_seeds: int = 5
    eval_every: int = 50
    chunk_steps: int = 100
    target_loss: float | None = None
    feedback: str = "logit_grad_norm"
    dataset_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    model_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    method_options: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    subset: int | None = None
    dataset_seed: int | None = None
    eval_train_examples: int | None = None
    eval_batch_size: int = 2048
    needs_files: bool = False
    loss_log_scale: bool = True
    table_layout: str | None = None
    sources: Mapping[str, str] = dataclasses.field(default_factory=dict)
    max_steps: int | None = None
    loop: str = "auto"
    eval_informative_only: bool = False
    diagnostic_examples: int = 1024
    budget_seconds: float | None = None
    lr_schedule: str = "linear"
    calibration_rounds: int = 10

    def __post_init__(self):
        if (self.num_steps is None) == (self.num_epochs is None):
            raise ValueError(f"{self.name}: give exactly one of num_steps and num_epochs")
        if min(self.eval_every, self.chunk_steps, self.batch_size, self.num_seeds) < 1:
            raise ValueError(
                f"{self.name}: eval_every, chunk_steps, batch_size, num_seeds must be >= 1"
            )
        if self.budget_seconds is not None and not self.budget_seconds > 0:
            raise ValueError(f"{self.name}: budget_seconds must be > 0, got {self.budget_seconds}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"{self.name}: lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}"
            )
        if self.calibration_rounds < 1 or self.diagnostic_examples < 0:
            raise ValueError(
                f"{self.name}: calibration_rounds must be >= 1 and diagnostic_examples >= 0"
            )

    def steps_for(self, num_examples: int) -> int:
        """Training steps per run for a training set of ``num_examples``."""
        if self.num_steps is not None:
            steps = int(self.num_steps)
        else:
            steps = max(1, math.ceil(self.num_epochs * num_examples / self.batch_size))
        return steps if self.max_steps is None else min(steps, int(self.max_steps))

    def replace(self, **changes) -> ExperimentConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["methods"] = list(self.methods)
        return out


_LAHIRE_METHODS = ("sgd", "sgd-gn", "rmsprop", "rmsprop-gn", "adam", "adam-gn", "adambs")
_LAHIRE_SOURCES = {
    "model": f"{LAHIRE} Appendix E: 10-unit ReLU layer, second 10-unit layer, cross-entropy "
    "(read as two hidden layers of 10, see experiments/models/mlp.py)",
    "learning_rate": f"{LAHIRE} §4: 'a learning rate of 0.01'",
    "batch_size": f"{LAHIRE} §4: 'a mini-batch size of 5'",
    "num_steps": f"{LAHIRE} Table 1: 'one run (1000 SGD steps)'",
    "num_seeds": f"{LAHIRE} §4: 'an average on 50 runs'",
    "optimizers": f"{LAHIRE} §4: PyTorch SGD/RMSProp/Adam 'with default hyper-parameters' "
    "(SGD no momentum; RMSProp alpha 0.99, eps 1e-8; Adam 0.9/0.999/1e-8)",
    "p^GN": f"{LAHIRE} §2-3: p_i proportional to per-sample gradient norms of all N items",
    "adambs": f"{ADAMBS} Algorithm 2 with its defaults; added to Lahire's grid by us",
    "split": "experiments.data: stratified 80/20 split, seed 0 (Lahire does not say)",
    "eval_every": OURS,
    "target_loss": OURS,
}

_ADAMBS_COMPARISON = ("adam", "adam-impt", "adambs", "adambs-tuned")
_SMALL_SOURCES = {
    "methods": f"{ADAMBS} §5: Adam vs Adam-impt vs AdamBS; adambs-tuned is ours",
    "learning_rate": f"{ADAMBS} §5.2 CNNs: 0.001",
    "batch_size": f"{ADAMBS} §5.2 CNNs: 128",
    "num_seeds": (
        f"{ADAMBS} §5.1: 'repeating each experiment five times with different random seeds'"
    ),
    "initialization": f"{ADAMBS} §5.1: 'the same parameter initialization when comparing'",
    "feedback": (
        f"{ADAMBS} §5.1: 'we use the upper bound in the place of per-example gradient norm'"
    ),
    "adam_betas": f"{ADAMBS} §5.1: beta1 = 0.9, beta2 = 0.999",
    "dataset/model": OURS + " (small data that needs no network)",
    "num_steps": OURS,
    "eval_every": OURS,
    "target_loss": OURS,
}


def _paper_sources(section: str, batch: str, lr: str, epochs: str, model: str) -> dict:
    return {
        "methods": f"{ADAMBS} §5: Adam, Adam-impt, AdamBS",
        "batch_size": f"{ADAMBS} {section}: {batch}",
        "learning_rate": f"{ADAMBS} {section}: {lr}",
        "num_epochs": f"{ADAMBS} {section}: {epochs}",
        "model": model,
        "num_seeds": f"{ADAMBS} §5.1: five seeds",
        "adam_betas": f"{ADAMBS} §5.1: 0.9, 0.999",
        "feedback": f"{ADAMBS} §5.1: the logit-gradient upper bound",
        "eval_train_examples": OURS + " (training loss on the first 10 000 examples, to bound "
        "evaluation cost)",
        "eval_every": OURS,
    }


_PAPER_METHODS = ("adam", "adam-impt", "adambs")


def _lahire(dataset: str) -> ExperimentConfig:
    """Lahire Fig. 1 / Table 1 on ``dataset`` (``"iris"`` or ``"wine"``)."""
    return ExperimentConfig(
        name=f"lahire-{dataset}",
        description=(
            f"Lahire Fig. 1 and Table 1 on {dataset.capitalize()}: MLP, SGD/RMSProp/Adam "
            "x uniform/p^GN sampling, plus AdamBS (paper defaults); 1000 steps, 50 runs."
        ),
        dataset=dataset,
        model="lahire-mlp",
        methods=_LAHIRE_METHODS,
        learning_rate=0.01,
        batch_size=5,
        num_steps=1000,
        num_seeds=50,
        eval_every=10,
        target_loss=0.1,
        table_layout="lahire",
        sources=_LAHIRE_SOURCES,
    )


def _digits_cnn() -> ExperimentConfig:
    return ExperimentConfig(
        name="digits-cnn",
        description="AdamBS §5's comparison on sklearn digits (8x8 images) with a small CNN.",
        dataset="digits-image",
        model="digits-cnn",
        methods=_ADAMBS_COMPARISON + ("amsgrad-bs",),
        learning_rate=1e-3,
        batch_size=128,
        num_steps=1000,
        num_seeds=5,
        eval_every=25,
        target_loss=0.01,
        sources=_SMALL_SOURCES,
        # the CNN's exact per-example gradient norms cost ~0.4 s per 1024 examples on this
        # CPU: the diagnostics use a fixed random subset of 256 of the 1438 examples
        diagnostic_examples=256,
    )


def _default(digits_cnn: ExperimentConfig) -> ExperimentConfig:
    """``make run``'s quick look: ``digits-cnn`` with fewer seeds and steps, without AMSGrad,
    with the priority sampler (its defaults)."""
    return digits_cnn.replace(
        name="default",
        description=(
            "The quick look (a few minutes on 2 CPU cores): digits-cnn with 3 seeds and "
            "600 steps, Adam vs Adam-impt vs AdamBS vs our AdamBS-tuned vs our priority "
            "sampler (ab.priority_sampler's defaults)."
        ),
        methods=(*_ADAMBS_COMPARISON, "adam-priority"),
        num_steps=600,
        num_seeds=3,
    )


def _mnist1d_mlp() -> ExperimentConfig:
    return ExperimentConfig(
        name="mnist1d-mlp",
        description="AdamBS §5's comparison on MNIST-1D (4000 train signals) with an MLP.",
        dataset="mnist1d",
        model="mnist1d-mlp",
        methods=_ADAMBS_COMPARISON,
        learning_rate=1e-3,
        batch_size=128,
        num_steps=2000,
        num_seeds=5,
        eval_every=50,
        target_loss=0.5,
        sources=_SMALL_SOURCES,
    )


_PRIORITY_COMPARISON = (
    "adam",
    "adam-priority-fixed",
    "adam-priority",
    "adam-priority-refresh",
)
_PRIORITY_SOURCES = {
    "everything": OURS + " (a check of the priority sampler's default: no paper runs it)",
    "adam_betas": f"{ADAMBS} §5.1: 0.9, 0.999",
}


def _friedman_mlp() -> ExperimentConfig:
    return ExperimentConfig(
        name="friedman-mlp",
        description=(
            "Regression (squared error) on Friedman #1 (2000 train examples, noise sigma 1, "
            "standardized targets) with a 32-32 MLP: Adam vs the priority sampler with the "
            "old fixed mix 0.1, its default (adaptive mix) and refreshed once per epoch, "
            "learning from the exact gradient norm (--feedback loss for the loss). The test "
            "error column is the test MSE in units of the target variance."
        ),
        dataset="friedman",
        model="regression-mlp",
        methods=_PRIORITY_COMPARISON,
        learning_rate=3e-3,
        batch_size=32,
        num_steps=3000,
        num_seeds=10,
        eval_every=100,
        chunk_steps=500,
        feedback="grad_norm",
        loss_log_scale=True,
        diagnostic_examples=512,
        sources=_PRIORITY_SOURCES,
    )


def _digits_noisy_mlp() -> ExperimentConfig:
    return ExperimentConfig(
        name="digits-noisy-mlp",
        description=(
            "Classification with 20% flipped training labels: sklearn digits (flat, 1437 "
            "train), a 64-unit MLP; Adam, p^GN and the priority sampler (fixed mix 0.1, "
            "default, refreshed). Reports the expected share of draws on flipped examples "
            "and the training loss against the clean labels."
        ),
        dataset="digits",
        model="digits-mlp",
        methods=("adam", "adam-gn", *_PRIORITY_COMPARISON[1:]),
        learning_rate=1e-3,
        batch_size=64,
        num_steps=2000,
        num_seeds=10,
        eval_every=100,
        chunk_steps=500,
        dataset_options={"label_noise": 0.2},
        diagnostic_examples=512,
        sources=_PRIORITY_SOURCES,
    )


def _heavy_tailed() -> ExperimentConfig:
    return ExperimentConfig(
        name="heavy-tailed",
        description=(
            "AdamBS §4.3's doubly heavy-tailed binary problem (one ReLU neuron, sigmoid "
            "output; P(|z_ji| = 1) = i^-2 j^-2, so only a handful of the 1000 examples have "
            "a nonzero feature: the extreme case for non-uniform sampling). Losses and "
            "errors are evaluated on those informative examples (the others have loss "
            "log 2 whatever the parameters). The bandit methods learn from the exact "
            "gradient norm: the logit bound |sigmoid(z) - y| does not see ||z_j||."
        ),
        dataset="heavy-tailed",
        model="heavy-tailed-neuron",
        methods=_ADAMBS_COMPARISON,
        learning_rate=1e-2,
        batch_size=32,
        num_steps=2000,
        num_seeds=5,
        eval_every=50,
        target_loss=0.5,
        feedback="grad_norm",
        eval_informative_only=True,
        dataset_options={"gamma": 1.0},
        sources={
            "model/data": f"{ADAMBS} §4.3 (theory only: the paper runs no experiment on it)",
            "learning_rate": OURS,
            "batch_size": OURS,
            "num_steps": OURS,
            "feedback": OURS + " (exact gradient norm; see description)",
            "num_seeds": f"{ADAMBS} §5.1: five seeds",
        },
    )


def _stdlib_lm() -> ExperimentConfig:
    """A workload where time, not data, runs out: a byte-level transformer LM on the Python
    standard library's source, compute-matched by default."""
    return ExperimentConfig(
        name="stdlib-lm",
        description=(
            "Byte-level causal transformer LM (2 layers, d = 128, 4 heads) on windows of 64 "
            "bytes of the Python standard library's *.py files (split by file, 2^17 training "
            "windows): next-byte cross-entropy, compute-matched (each method the same "
            "wall-clock budget, learning rate decayed to 0 there). Less than one epoch fits "
            "in the budget: time, not data, is what runs out."
        ),
        dataset="stdlib-bytes",
        model="byte-transformer",
        # adam-priority-refresh (every example re-scored once per n/K steps) also runs here,
        # at about twice the cost of a step: --methods adds it
        methods=("adam", "adam-priority", "infobatch", "adambs-lowvar"),
        learning_rate=2e-3,
        batch_size=32,
        num_steps=600,
        num_seeds=3,
        eval_every=50,
        chunk_steps=50,
        feedback="grad_norm",
        model_options={"max_length": 64, "width": 128, "num_layers": 2, "num_heads": 4},
        eval_train_examples=512,
        eval_batch_size=512,
        loss_log_scale=False,
        diagnostic_examples=128,
        budget_seconds=60.0,
        calibration_rounds=2,
        sources={
            "dataset/model": OURS + " (offline on every machine; experiments/data/stdlib_bytes.py)",
            "learning_rate": OURS,
            "batch_size": OURS,
            "budget_seconds": OURS + " (a full run of 4 methods x 3 seeds in ~25 min on 2 cores)",
            "feedback": OURS + " (exact per-example gradient norms by ghost norms)",
            "protocol": "Kaddour et al., No Train No Gain, NeurIPS 2023 (compute-matched)",
        },
    )


def _paper(
    name: str,
    description: str,
    dataset: str,
    model: str,
    section: str,
    batch_size: int,
    learning_rate: str,
    num_epochs: int,
    model_source: str,
    eval_every: int = 100,
    **changes,
) -> ExperimentConfig:
    """A figure of the AdamBS paper (needs the real data; GPU recommended): Adam, Adam-impt and
    AdamBS, five seeds, the training loss on the first 10 000 examples. ``learning_rate`` is
    written as in the paper's ``section`` (it is also the source's text)."""
    return ExperimentConfig(
        name=name,
        description=description,
        dataset=dataset,
        model=model,
        methods=_PAPER_METHODS,
        learning_rate=float(learning_rate),
        batch_size=batch_size,
        num_epochs=num_epochs,
        num_seeds=5,
        eval_every=eval_every,
        eval_train_examples=10_000,
        needs_files=True,
        loss_log_scale=False,
        diagnostic_examples=256,
        sources=_paper_sources(
            section, str(batch_size), learning_rate, f"{num_epochs} epochs", model_source
        ),
        **changes,
    )


def _paper_cnns() -> list[ExperimentConfig]:
    """AdamBS Fig. 2: CNNs, §5.2 (batch 128, lr 0.001, 10 epochs)."""
    return [
        _paper(
            "paper-cifar10",
            "AdamBS Fig. 2(a): CNN on CIFAR-10, 10 epochs.",
            "cifar10",
            "cifar-cnn",
            "§5.2",
            128,
            "0.001",
            10,
            f"{ADAMBS} §5.2: 4 conv 3x3 + max-pool, dropout 0.25, dense 512 "
            "(Keras cifar10_cnn details, experiments/models/cnn.py)",
        ),
        _paper(
            "paper-cifar100",
            "AdamBS Fig. 2(b): CNN on CIFAR-100, 10 epochs.",
            "cifar100",
            "cifar-cnn",
            "§5.2",
            128,
            "0.001",
            10,
            f"{ADAMBS} §5.2 (same CNN as CIFAR-10)",
        ),
        _paper(
            "paper-fashion-cnn",
            "AdamBS Fig. 2(c): CNN on Fashion-MNIST, 10 epochs.",
            "fashion-mnist",
            "fashion-cnn",
            "§5.2",
            128,
            "0.001",
            10,
            f"{ADAMBS} §5.2: 2 conv 3x3, max-pool, dense 128",
        ),
    ]


def _paper_lstm(dataset: str, label: str) -> ExperimentConfig:
    """AdamBS Fig. 3: LSTM on the rows of MNIST or Fashion-MNIST, §5.3."""
    return _paper(
        f"paper-{'mnist' if dataset == 'mnist' else 'fashion'}-lstm",
        f"AdamBS Fig. 3: LSTM (100 units, ReLU) on {label} rows (28 steps of 28 "
        "pixels; --model pixel-lstm for one pixel per step), 200 epochs.",
        dataset,
        "row-lstm",
        "§5.3",
        32,
        "1e-6",
        200,
        f"{ADAMBS} §5.3: LSTM, hidden 100, ReLU; the sequence layout (rows) is our reading",
        eval_every=1000,
    )


def _paper_imdb() -> ExperimentConfig:
    """AdamBS Fig. 4: RCNN on IMDB, §5.4."""
    return _paper(
        "paper-imdb-rcnn",
        "AdamBS Fig. 4: RCNN (conv 5, max-pool 4, LSTM, dense) on IMDB, 10 epochs.",
        "imdb",
        "imdb-rcnn",
        "§5.4",
        30,
        "0.001",
        10,
        f"{ADAMBS} §5.4: conv 5 + max-pool 4 + LSTM + dense (Keras imdb_cnn_lstm sizes)",
        eval_every=200,
        eval_batch_size=512,
    )


def _configs() -> list[ExperimentConfig]:
    """Every configuration, in the order ``--list`` shows them."""
    digits_cnn = _digits_cnn()
    return [
        _lahire("iris"),
        _lahire("wine"),
        digits_cnn,
        _mnist1d_mlp(),
        _heavy_tailed(),
        _friedman_mlp(),
        _digits_noisy_mlp(),
        _default(digits_cnn),
        _stdlib_lm(),
        *_paper_cnns(),
        _paper_lstm("mnist", "MNIST"),
        _paper_lstm("fashion-mnist", "Fashion-MNIST"),
        _paper_imdb(),
    ]


CONFIGS: dict[str, ExperimentConfig] = {config.name: config for config in _configs()}


def list_configs() -> list[str]:
    return list(CONFIGS)


def get_config(name: str) -> ExperimentConfig:
    return lookup(CONFIGS, name, "configuration")
