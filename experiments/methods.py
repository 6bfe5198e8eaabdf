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
==================  =========================================================================

Optimizer hyperparameters: ``sgd`` has no momentum; ``rmsprop`` uses PyTorch's defaults
(alpha = 0.99, eps = 1e-8 added outside the square root), because Lahire ran "the optimizers
SGD, RMSProp and ADAM of pytorch with default hyper-parameters"; ``adam``/``amsgrad`` use
b1 = 0.9, b2 = 0.999 (the AdamBS paper, §5.1, and PyTorch) and eps = 1e-8 (optax and PyTorch;
Keras' default is 1e-7).

Feedback: the bandit methods (``adambs``, ``amsgrad-bs``, ``adambs-tuned``) learn from the
step's ``feedback``, by default ``"logit_grad_norm"`` (the Katharopoulos-Fleuret upper bound:
"we use the upper bound in the place of per-example gradient norm in our method", AdamBS
§5.1); a configuration may choose ``"grad_norm"`` or ``"loss"`` instead. ``adam-impt``
uses its ``score_feedback`` (default ``"logit_grad_norm"``) also as the step's feedback:
while importance sampling is off, its switch (the moving average of the variance
reduction) learns from the scores of the training batch, as in Katharopoulos & Fleuret's
code. Every other method uses ``"loss"``: its sampler ignores the step's feedback (p^GN
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
from adambs_jax.feedback import FEEDBACK_KINDS
from adambs_jax.jsonable import to_jsonable
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
      feedback: the train step's ``feedback`` argument.
      settings: the resolved hyperparameters (for the summary JSON).
      sampling: the sampling kind of the method's :class:`MethodSpec` (what its sampler
        can tell about what it learned, ``experiments.diagnostics``).
    """

    name: str
    label: str
    optimizer: optax.GradientTransformation
    sampler: Any
    feedback: str
    settings: dict
    sampling: str


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A registry entry.

    Attributes:
      name: registry name.
      label: legend label.
      optimizer: ``"sgd"``, ``"rmsprop"``, ``"adam"`` or ``"amsgrad"``.
      sampling: ``"uniform"``, ``"gradient-norm"``, ``"adam-impt"`` or ``"exp3"``.
      description: one line for ``--list`` and the docs.
      source: where the method comes from.
      sampler_defaults: keyword arguments of the sampler factory set by the method itself
        (a configuration's per-method options override them).
      requires: the ``adambs_jax`` attribute the sampler needs (None: always available).
    """

    name: str
    label: str
    optimizer: str
    sampling: str
    description: str
    source: str
    sampler_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    requires: str | None = None


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
_OPTIMIZER_LABELS = {"sgd": "SGD", "rmsprop": "RMSProp", "adam": "Adam", "amsgrad": "AMSGrad"}

_LAHIRE = "Lahire, Non-Uniform Sampling and Adaptive Optimizers in Deep Learning, Fig. 1"
_ADAMBS = "Liu, Wu, Mozafari, Adam with Bandit Sampling for Deep Learning, NeurIPS 2020"


def _registry() -> dict[str, MethodSpec]:
    specs = []
    for opt in ("sgd", "rmsprop", "adam"):
        label = _OPTIMIZER_LABELS[opt]
        specs.append(MethodSpec(
            opt, f"{label} (uniform)", opt, "uniform",
            f"{label}, uniform mini-batches", _LAHIRE if opt != "adam" else f"{_LAHIRE}; {_ADAMBS}",
        ))
        specs.append(MethodSpec(
            f"{opt}-gn", f"{label} + p^GN", opt, "gradient-norm",
            f"{label}, p proportional to the exact gradient norms of all n examples each step",
            _LAHIRE, requires="gradient_norm_sampler",
        ))
    specs += [
        MethodSpec(
            "adam-impt", "Adam-impt", "adam", "adam-impt",
            "Adam, Katharopoulos & Fleuret presample-3K importance sampling",
            f"{_ADAMBS}, §5 (baseline of Katharopoulos & Fleuret, ICML 2018)",
            requires="adam_impt_sampler",
        ),
        MethodSpec(
            "adambs", "AdamBS", "adam", "exp3",
            "Adam + EXP3 bandit sampler, the paper's defaults (p_min=0.1/n)",
            f"{_ADAMBS}, Algorithms 1-2",
        ),
        MethodSpec(
            "amsgrad-bs", "AMSGrad-BS", "amsgrad", "exp3",
            "AMSGrad + EXP3 bandit sampler, the paper's defaults",
            f"{_ADAMBS}, appendix D",
        ),
        MethodSpec(
            "adambs-tuned", "AdamBS-tuned (ours, p_min=0.5/n)", "adam", "exp3",
            "OUR VARIANT: AdamBS with p_min = 0.5/n (docs/algorithm.md, 'What the shift does')",
            "this project (not in the paper)", sampler_defaults={"p_min_times_n": 0.5},
        ),
    ]
    return {spec.name: spec for spec in specs}


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
        ``adam_impt_sampler``, ``gradient_norm_sampler``), overriding the method's own;
        for the exp3 methods ``p_min_times_n`` sets p_min = value / n.

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
    step_feedback = "loss"
    settings: dict[str, Any] = {
        "optimizer": spec.optimizer,
        "learning_rate": float(learning_rate),
        **OPTIMIZER_SETTINGS[spec.optimizer],
        "sampling": spec.sampling,
    }
    if spec.sampling == "uniform":
        if kwargs:
            raise ValueError(f"method {name!r} takes no sampler options, got {sorted(kwargs)}")
        sampler = ab.uniform_sampler(n, k)
    elif spec.sampling == "gradient-norm":
        sampler = ab.gradient_norm_sampler(n, k, **kwargs)
    elif spec.sampling == "adam-impt":
        sampler = ab.adam_impt_sampler(n, k, **kwargs)
        # while importance sampling is off, Adam-impt's switch learns from the step's
        # feedback of the batch (K&F's code): it must be the same kind as the presample scores
        step_feedback = sampler.score_feedback
    elif spec.sampling == "exp3":
        if "p_min_times_n" in kwargs:
            kwargs["p_min"] = float(kwargs.pop("p_min_times_n")) / n
        if "step_size" not in kwargs:
            kwargs.setdefault("num_steps", int(num_steps))
        # the paper's bound (the library's default is the robust quantile bound since
        # issue 16): the experiments reproduce Algorithm 2 as published
        kwargs.setdefault("grad_norm_bound", "running_max")
        sampler = ab.exp3_sampler(n, k, **kwargs)
        step_feedback = feedback
        settings["p_min"] = kwargs.get("p_min", 0.1 / n)
        settings["step_size"] = kwargs.get(
            "step_size", ab.default_step_size(n, int(kwargs.get("num_steps", num_steps)))
        )
        settings["grad_norm_bound"] = kwargs["grad_norm_bound"]
    else:  # pragma: no cover - registry is static
        raise AssertionError(spec.sampling)
    settings["sampler_options"] = {key: to_jsonable(value) for key, value in kwargs.items()}
    settings["feedback"] = step_feedback
    return BuiltMethod(
        name=name,
        label=spec.label,
        optimizer=OPTIMIZERS[spec.optimizer](learning_rate),
        sampler=sampler,
        feedback=step_feedback,
        settings=settings,
        sampling=spec.sampling,
    )
