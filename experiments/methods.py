"""The training methods the experiments compare: name -> (optimizer, sampler, feedback).

A method is an optax optimizer, a mini-batch sampler and the per-example feedback the
train step computes for the sampler (``ab.make_train_step(loss, optimizer, sampler,
feedback=...)``). ``build_method(name, num_examples=n, batch_size=K, num_steps=T,
learning_rate=lr)`` builds one; ``list_methods()`` lists the names.

==================  =========================================================================
name                what it is (source)
==================  =========================================================================
``sgd``             plain SGD, uniform sampling (Lahire Fig. 1 "u")
``rmsprop``         RMSProp, uniform sampling (Lahire Fig. 1 "u")
``adam``            Adam, uniform sampling (Lahire Fig. 1 "u"; AdamBS §5 "Adam")
``sgd-gn``          SGD with p^GN: p_i proportional to the exact per-example gradient norm of
                    *all* n examples, recomputed every step, weights 1/(n p_i) (Lahire §2-3,
                    ``ab.gradient_norm_sampler``)
``rmsprop-gn``      RMSProp with p^GN (Lahire)
``adam-gn``         Adam with p^GN (Lahire)
``adam-impt``       Adam with Katharopoulos & Fleuret's importance sampling: a uniform
                    presample of 3K scored by the logit-gradient bound, K resampled from it
                    (AdamBS §5 baseline "ADAM-IMPT", ``ab.adam_impt_sampler``)
``adambs``          AdamBS: Adam + the EXP3 bandit sampler of Algorithm 2 with the paper's
                    defaults (p_min = 0.1/n, L = running max of the feedback,
                    eta0 = sqrt(2 log n / (n T))), ``ab.exp3_sampler``
``amsgrad-bs``      AMSGrad with the same bandit sampler (AdamBS appendix D)
``adambs-tuned``    **our variant, not the paper's**: AdamBS with a larger floor
                    p_min = 0.5/n (docs/algorithm.md, "What the shift does": with the
                    default floor the EXP3 step is dominated by the L^2/p_min^2 shift and the
                    learned p is *worse* than uniform; with 0.5/n it no longer hurts)
``adambs-lowvar``   **ours**: AdamBS with ``exp3_sampler(preset="low_variance")``: p_min = 0.5/n
                    and the clipped bound (L = running 0.9-quantile), the settings
                    docs/algorithm.md found to lower the variance term
``adambs-lowvar-precond``  the same, learning from ``"preconditioned_grad_norm"``
``adam-priority``   **ours**: Adam with the stale-score priority sampler and its defaults
                    (``ab.priority_sampler``: p_j proportional to the score example j got when
                    last drawn, mixed with uniform at the share lambda that the sampler's
                    variance estimate picks, exact weights 1/(n p)), learning from the
                    configuration's feedback like the bandit methods
``adam-priority-fixed``  the same with the fixed mix lambda = 0.1 (the default before
                    adaptive mixing)
``adam-priority-refresh``  the fixed mix lambda = 0.1 with ``refresh_every = ceil(n/K)``: every
                    score at most an epoch old, K more scored examples per step
``adam-priority-precond``  the same, learning from ``"preconditioned_grad_norm"`` (the norm of
                    Adam's preconditioned per-example gradient, Lahire's point that p^GN is
                    optimal for SGD, not for Adam)
``adam-priority-refresh``  the same, also re-scoring all n examples once every
                    ceil(n/K) steps (``refresh_every="epoch"``: about K more examples scored
                    per step, so no score is older than one epoch of steps)
``infobatch``       Adam with InfoBatch (Qin et al., ICLR 2024): each epoch, below-mean-loss
                    examples are pruned with probability 0.5 and the kept ones' gradients
                    rescaled by 1/(1 - 0.5); annealed (uniform) over the last 12.5% of the
                    steps (``ab.infobatch_sampler``, feedback ``"loss"``)
==================  =========================================================================

Optimizer hyperparameters: ``sgd`` has no momentum; ``rmsprop`` uses PyTorch's defaults
(alpha = 0.99, eps = 1e-8 added outside the square root), because Lahire ran "the optimizers
SGD, RMSProp and ADAM of pytorch with default hyper-parameters"; ``adam``/``amsgrad`` use
b1 = 0.9, b2 = 0.999 (the AdamBS paper, §5.1, and PyTorch) and eps = 1e-8 (optax and PyTorch;
Keras' default is 1e-7).

Feedback: the bandit methods (``adambs``, ``amsgrad-bs``, ``adambs-tuned``,
``adambs-lowvar``) and ``adam-priority`` learn from the step's ``feedback``, by default
``"logit_grad_norm"`` (the Katharopoulos-Fleuret upper bound:
"we use the upper bound in the place of per-example gradient norm in our method", AdamBS
§5.1); a configuration may choose ``"grad_norm"`` or ``"loss"`` instead. ``adam-impt``
uses its ``score_feedback`` (default ``"logit_grad_norm"``) also as the step's feedback:
while importance sampling is off, its switch (the moving average of the variance
reduction) learns from the scores of the training batch, as in Katharopoulos & Fleuret's
code. ``adambs-lowvar-precond`` and ``adam-priority-precond`` always learn from
``"preconditioned_grad_norm"``, ``infobatch`` from ``"loss"`` (its scores are the last seen
losses). Every other method uses ``"loss"``: its sampler ignores the step's feedback (p^GN
scores all n examples itself before drawing), and ``"loss"`` costs nothing beyond the plain
step, so uniform Adam is exactly one plain Adam step.

The scoring samplers (``ab.adam_impt_sampler``, ``ab.gradient_norm_sampler``) are looked
up when a method is built, not when this module is imported, so the registry imports even
with an ``adambs_jax`` that lacks them; ``method_available(name)`` tells which work.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import optax

import adambs_jax as ab
from adambs_jax._jsonable import to_jsonable
from adambs_jax.feedback import FEEDBACK_KINDS
from adambs_jax.samplers._exp3 import preset_options
from experiments.lookup import lookup

BANDIT_FEEDBACKS = FEEDBACK_KINDS  # the bandit samplers can learn from every feedback kind
DEFAULT_BANDIT_FEEDBACK = "logit_grad_norm"


@dataclasses.dataclass(frozen=True)
class BuiltMethod:
    """What ``make_train_step`` needs for one method.

    Attributes:
      name: registry name.
      label: legend label for plots and tables.
      optimizer: the optax optimizer (of the averaged, importance-weighted gradient).
      sampler: an ``ab.Sampler`` or ``ab.ScoringSampler``.
      feedback: the train step's ``feedback`` argument: a name of ``FEEDBACK_KINDS``, or for
        ``"preconditioned_grad_norm"`` the ``ab.feedback.PreconditionedGradNorm`` stating the
        hyperparameters of ``optimizer`` (its state does not record them).
      settings: the resolved hyperparameters (for the summary JSON).
      sampling: the sampling kind of the method's :class:`MethodSpec` (what its sampler
        can tell about what it learned, ``experiments.diagnostics``).
    """

    name: str
    label: str
    optimizer: optax.GradientTransformation
    sampler: Any
    feedback: Any
    settings: dict
    sampling: str


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A registry entry.

    Attributes:
      name: registry name.
      label: legend label.
      optimizer: ``"sgd"``, ``"rmsprop"``, ``"adam"`` or ``"amsgrad"``.
      sampling: ``"uniform"``, ``"gradient-norm"``, ``"adam-impt"``, ``"exp3"``,
        ``"priority"`` or ``"infobatch"`` (a key of ``_SAMPLER_BUILDERS``).
      description: one line for ``--list`` and the docs.
      source: where the method comes from.
      sampler_defaults: keyword arguments of the sampler factory set by the method itself
        (a configuration's per-method options override them).
      requires: the ``adambs_jax`` attribute the sampler needs (None: always available).
      feedback: the step's feedback this method always uses (None: the configuration's
        ``feedback`` for a learning sampler, ``"loss"`` for the others).
    """

    name: str
    label: str
    optimizer: str
    sampling: str
    description: str
    source: str
    sampler_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    requires: str | None = None
    feedback: str | None = None


def _rmsprop_pytorch_defaults(learning_rate):
    # torch.optim.RMSprop: v = 0.99 v + 0.01 g^2; update = g / (sqrt(v) + 1e-8)
    return optax.rmsprop(learning_rate, decay=0.99, eps=1e-8, eps_in_sqrt=False)


OPTIMIZERS: dict[str, Callable[[float], optax.GradientTransformation]] = {
    "sgd": lambda lr: optax.sgd(lr),
    "rmsprop": _rmsprop_pytorch_defaults,
    "adam": lambda lr: optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8),
    "amsgrad": lambda lr: optax.amsgrad(lr, b1=0.9, b2=0.999, eps=1e-8),
}
OPTIMIZER_SETTINGS = {
    "sgd": {"momentum": 0.0},
    "rmsprop": {"decay": 0.99, "eps": 1e-8, "eps_in_sqrt": False},
    "adam": {"b1": 0.9, "b2": 0.999, "eps": 1e-8},
    "amsgrad": {"b1": 0.9, "b2": 0.999, "eps": 1e-8},
}
_PRECONDITIONER_SETTINGS = {
    "rmsprop": ("eps", "eps_in_sqrt"),
    "adam": ("b2", "eps"),
    "amsgrad": ("eps",),
}


def preconditioned_feedback(optimizer: str) -> ab.feedback.PreconditionedGradNorm:
    """``"preconditioned_grad_norm"`` for ``OPTIMIZERS[optimizer]``: the feedback stating the
    optimizer's hyperparameters (``OPTIMIZER_SETTINGS``), which its state does not record
    (the step refuses any that differ from the optimizer's)."""
    settings = OPTIMIZER_SETTINGS[optimizer]
    return ab.feedback.PreconditionedGradNorm(
        **{name: settings[name] for name in _PRECONDITIONER_SETTINGS[optimizer]}
    )


_OPTIMIZER_LABELS = {"sgd": "SGD", "rmsprop": "RMSProp", "adam": "Adam", "amsgrad": "AMSGrad"}

_LAHIRE = "Lahire, Non-Uniform Sampling and Adaptive Optimizers in Deep Learning, Fig. 1"
_ADAMBS = "Liu, Wu, Mozafari, Adam with Bandit Sampling for Deep Learning, NeurIPS 2020"
_PRIORITY = (
    "this project; prioritized replay of Schaul et al., ICLR 2016, applied to "
    "supervised training with exact weights"
)


def _registry() -> dict[str, MethodSpec]:
    specs = _optimizer_methods() + _paper_methods() + _sampler_comparison_methods()
    return {spec.name: spec for spec in specs}


def _optimizer_methods() -> list[MethodSpec]:
    """Each optimizer with uniform mini-batches and with the O(n) oracle p^GN (Lahire)."""
    specs = []
    for opt in ("sgd", "rmsprop", "adam"):
        label = _OPTIMIZER_LABELS[opt]
        specs.append(
            MethodSpec(
                opt,
                f"{label} (uniform)",
                opt,
                "uniform",
                f"{label}, uniform mini-batches",
                _LAHIRE if opt != "adam" else f"{_LAHIRE}; {_ADAMBS}",
            )
        )
        specs.append(
            MethodSpec(
                f"{opt}-gn",
                f"{label} + p^GN",
                opt,
                "gradient-norm",
                f"{label}, p proportional to the exact gradient norms of all n examples each step",
                _LAHIRE,
                requires="gradient_norm_sampler",
            )
        )
    return specs


def _paper_methods() -> list[MethodSpec]:
    """The AdamBS paper's methods and baseline, and our p_min variant of AdamBS."""
    return [
        MethodSpec(
            "adam-impt",
            "Adam-impt",
            "adam",
            "adam-impt",
            "Adam, Katharopoulos & Fleuret presample-3K importance sampling",
            f"{_ADAMBS}, §5 (baseline of Katharopoulos & Fleuret, ICML 2018)",
            requires="adam_impt_sampler",
        ),
        MethodSpec(
            "adambs",
            "AdamBS",
            "adam",
            "exp3",
            "Adam + EXP3 bandit sampler, the paper's defaults (p_min=0.1/n)",
            f"{_ADAMBS}, Algorithms 1-2",
        ),
        MethodSpec(
            "amsgrad-bs",
            "AMSGrad-BS",
            "amsgrad",
            "exp3",
            "AMSGrad + EXP3 bandit sampler, the paper's defaults",
            f"{_ADAMBS}, appendix D",
        ),
        MethodSpec(
            "adambs-tuned",
            "AdamBS-tuned (ours, p_min=0.5/n)",
            "adam",
            "exp3",
            "OUR VARIANT: AdamBS with p_min = 0.5/n (docs/algorithm.md, 'What the shift does')",
            "this project (not in the paper)",
            sampler_defaults={"p_min_times_n": 0.5},
        ),
    ]


_PRECOND = "preconditioned_grad_norm"


def _sampler_comparison_methods() -> list[MethodSpec]:
    """The samplers of the compute-matched comparison: the exp3 preset, the priority sampler,
    InfoBatch, and variants learning from the preconditioned gradient norm."""
    return _exp3_preset_methods() + _priority_methods() + [_infobatch_method()]


def _exp3_preset_methods() -> list[MethodSpec]:
    lowvar = dict(sampler_defaults={"preset": "low_variance"})
    return [
        MethodSpec(
            "adambs-lowvar",
            "AdamBS-lowvar (ours)",
            "adam",
            "exp3",
            "OUR PRESET: AdamBS with p_min = 0.5/n and the clipped (0.9-quantile) bound",
            "this project (docs/algorithm.md)",
            **lowvar,
        ),
        MethodSpec(
            "adambs-lowvar-precond",
            "AdamBS-lowvar + precond. norm (ours)",
            "adam",
            "exp3",
            "AdamBS-lowvar learning from the preconditioned per-example gradient norm",
            "this project",
            **lowvar,
            feedback=_PRECOND,
        ),
    ]


def _priority_methods() -> list[MethodSpec]:
    return [
        MethodSpec(
            "adam-priority",
            "Adam + priority (ours)",
            "adam",
            "priority",
            "Adam, stale-score priority sampler (p ~ last seen score, adaptive uniform mix)",
            _PRIORITY,
            requires="priority_sampler",
        ),
        MethodSpec(
            "adam-priority-fixed",
            "Adam + priority, fixed mix 0.1 (ours)",
            "adam",
            "priority",
            "Adam, priority sampler with the fixed uniform mix 0.1 (the old default)",
            _PRIORITY,
            sampler_defaults={"uniform_mix": 0.1},
            requires="priority_sampler",
        ),
        MethodSpec(
            "adam-priority-refresh",
            "Adam + priority, refreshed (ours)",
            "adam",
            "priority",
            "Adam, priority sampler (mix 0.1) re-scoring every example once per epoch",
            _PRIORITY,
            sampler_defaults={"uniform_mix": 0.1, "refresh_every": "epoch"},
            requires="priority_sampler",
        ),
        MethodSpec(
            "adam-priority-precond",
            "Adam + priority, precond. norm (ours)",
            "adam",
            "priority",
            "Adam, priority sampler learning from the preconditioned per-example gradient norm",
            _PRIORITY,
            requires="priority_sampler",
            feedback=_PRECOND,
        ),
    ]


def _infobatch_method() -> MethodSpec:
    return MethodSpec(
        "infobatch",
        "InfoBatch",
        "adam",
        "infobatch",
        "Adam, InfoBatch: prune below-mean-loss examples each epoch (r = 0.5), rescale",
        "Qin et al., InfoBatch: Lossless Training Speed Up by Unbiased Dynamic Data "
        "Pruning, ICLR 2024",
        requires="infobatch_sampler",
        feedback="loss",
    )


METHODS: dict[str, MethodSpec] = _registry()


def list_methods() -> list[str]:
    """All registered method names, in registry order."""
    return list(METHODS)


def method_spec(name: str) -> MethodSpec:
    return lookup(METHODS, name, "method")


def method_available(name: str) -> bool:
    """Whether the installed ``adambs_jax`` has the sampler that ``name`` needs."""
    spec = method_spec(name)
    return spec.requires is None or hasattr(ab, spec.requires)


def build_method(
    name: str,
    *,
    num_examples: int,
    batch_size: int,
    num_steps: int,
    learning_rate: float,
    feedback: str = DEFAULT_BANDIT_FEEDBACK,
    options: Mapping[str, Any] | None = None,
) -> BuiltMethod:
    """Builds method ``name`` for n = ``num_examples``, K = ``batch_size``, T = ``num_steps``.

    Args:
      name: a name from :func:`list_methods`.
      num_examples, batch_size, num_steps: n, K, T (T sets AdamBS's default eta0).
      learning_rate: the optimizer's learning rate.
      feedback: what the bandit methods learn from (``"logit_grad_norm"``, the paper's
        choice, ``"grad_norm"`` or ``"loss"``); ignored by the other methods.
      options: keyword arguments for the sampler factory (``exp3_sampler``,
        ``adam_impt_sampler``, ``gradient_norm_sampler``, ``priority_sampler``,
        ``infobatch_sampler``), overriding the method's own; for the exp3 methods
        ``p_min_times_n`` sets p_min = value / n (over a ``preset``'s).

    Raises:
      KeyError: unknown method. RuntimeError: the installed ``adambs_jax`` lacks the
      method's sampler. ValueError: bad feedback.
    """
    spec = method_spec(name)
    if not method_available(name):
        raise RuntimeError(
            f"method {name!r} needs ab.{spec.requires}, which this adambs_jax does not have"
        )
    if feedback not in BANDIT_FEEDBACKS:
        raise ValueError(f"feedback must be one of {BANDIT_FEEDBACKS}, got {feedback!r}")
    n, k = int(num_examples), int(batch_size)
    kwargs = {**spec.sampler_defaults, **dict(options or {})}
    settings: dict[str, Any] = {
        "optimizer": spec.optimizer,
        "learning_rate": float(learning_rate),
        **OPTIMIZER_SETTINGS[spec.optimizer],
        "sampling": spec.sampling,
    }
    sampler, step_feedback = _SAMPLER_BUILDERS[spec.sampling](
        name, n, k, int(num_steps), kwargs, settings, feedback
    )
    if spec.feedback is not None:
        step_feedback = spec.feedback
    settings["sampler_options"] = {key: to_jsonable(value) for key, value in kwargs.items()}
    settings["feedback"] = step_feedback
    if step_feedback == "preconditioned_grad_norm":
        step_feedback = preconditioned_feedback(spec.optimizer)
    return BuiltMethod(
        name=name,
        label=spec.label,
        optimizer=OPTIMIZERS[spec.optimizer](learning_rate),
        sampler=sampler,
        feedback=step_feedback,
        settings=settings,
        sampling=spec.sampling,
    )


# ----------------------------------------------------------------------------- sampler builders
# each: (name, n, K, T, kwargs (may be rewritten), settings (filled), feedback) ->
# (sampler, the step's feedback)


def _uniform(name, n, k, num_steps, kwargs, settings, feedback):
    if kwargs:
        raise ValueError(f"method {name!r} takes no sampler options, got {sorted(kwargs)}")
    return ab.uniform_sampler(n, k), "loss"


def _gradient_norm(name, n, k, num_steps, kwargs, settings, feedback):
    return ab.gradient_norm_sampler(n, k, **kwargs), "loss"


def _adam_impt(name, n, k, num_steps, kwargs, settings, feedback):
    sampler = ab.adam_impt_sampler(n, k, **kwargs)
    # while importance sampling is off, Adam-impt's switch learns from the step's
    # feedback of the batch (K&F's code): it must be the same kind as the presample scores
    return sampler, sampler.score_feedback


def _exp3(name, n, k, num_steps, kwargs, settings, feedback):
    if "p_min_times_n" in kwargs:
        kwargs["p_min"] = float(kwargs.pop("p_min_times_n")) / n
    preset = kwargs.pop("preset", None)
    p_min, bound = preset_options(preset, n, kwargs.get("p_min"), kwargs.get("grad_norm_bound"))
    if p_min is not None:
        kwargs["p_min"] = p_min
    # without a preset, the paper's bound (the library's default is the robust quantile
    # bound): the experiments reproduce Algorithm 2 as published
    kwargs["grad_norm_bound"] = "running_max" if bound is None else bound
    if "step_size" not in kwargs:
        kwargs.setdefault("num_steps", num_steps)
    sampler = ab.exp3_sampler(n, k, **kwargs)
    if preset is not None:
        kwargs["preset"] = preset  # recorded with the options it resolved to
        settings["preset"] = preset
    settings["p_min"] = kwargs.get("p_min", 0.1 / n)
    settings["step_size"] = kwargs.get(
        "step_size", ab.samplers.default_step_size(n, int(kwargs.get("num_steps", num_steps)))
    )
    settings["grad_norm_bound"] = kwargs["grad_norm_bound"]
    return sampler, feedback


def _priority(name, n, k, num_steps, kwargs, settings, feedback):
    if kwargs.get("refresh_every") == "epoch":  # every score at most ceil(n / K) steps old
        kwargs["refresh_every"] = -(-n // k)
    sampler = ab.priority_sampler(n, k, **kwargs)
    # the validated PriorityConfig the factory bound (a refreshing sampler binds refresh)
    config = sampler.update.args[0]
    settings.update(
        alpha=config.alpha,
        uniform_mix=config.uniform_mix,
        min_uniform_mix=config.min_uniform_mix,
        eps=config.eps,
        refresh_every=kwargs.get("refresh_every"),
    )
    return sampler, feedback


def _infobatch(name, n, k, num_steps, kwargs, settings, feedback):
    kwargs.setdefault("num_steps", num_steps)
    sampler = ab.infobatch_sampler(n, k, **kwargs)
    config = sampler.sample.args[0]
    settings.update(
        prune_ratio=config.prune_ratio,
        anneal_fraction=config.anneal_fraction,
        epoch_steps=config.epoch_steps,
    )
    return sampler, "loss"


_SAMPLER_BUILDERS = {
    "uniform": _uniform,
    "gradient-norm": _gradient_norm,
    "adam-impt": _adam_impt,
    "exp3": _exp3,
    "priority": _priority,
    "infobatch": _infobatch,
}
