"""The tools of a training loop you keep: the unbiased loss, G_hat and the feedback from one
backward pass, and a sampler with its state, key and schedule in one object.

A loop that already works (its own ``jax.jit`` or ``nnx.jit`` step, its optimizer, its
eval code) adopts bandit sampling by changing a few lines; its step keeps its signature
and its return:

    sampling = ab.Sampling(ab.priority_sampler(n, K), data, seed=0)

    @jax.jit
    def train_step(params, opt_state, batch):
        loss, grads = ab.value_and_grad(loss_fn)(params, batch)   # per-example loss_fn
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    for t in range(T):
        batch = sampling.draw()       # learns the last batch's feedback, draws K, gathers
        params, opt_state, loss = train_step(params, opt_state, batch)

``value_and_grad`` is ``jax.value_and_grad`` for a per-example loss and importance weights
w = 1 / (n p): the value is the unbiased loss (1/K) sum_k w_k loss_k, the gradient is G_hat
= (1/K) sum_k w_k g_{i_k} (Liu, Wu, Mozafari, NeurIPS 2020, eq. 1), and the feedback comes
from the same pass (the feedback kind's estimator, ``_estimators``). The weights come in
with the ``SampledBatch`` and the feedback goes out in it (``_sampled_batch``: a
``jax.Ref`` the step writes on the device). Every optax optimizer and wrapper then sees
G_hat. It also takes a Flax NNX module as its first argument, like ``nnx.value_and_grad``:
the gradient is an ``nnx.State`` of the module's ``nnx.Param`` s and the module's other
state (BatchNorm statistics, ``nnx.Rngs`` counts) is updated in place. ``Sampling`` learns
and draws (O(K log n) and a gather on the device, one dispatch) and runs the sampler's
renormalization itself, so a hand loop cannot forget either.

Reference: Liu, Wu, Mozafari, "Adam with Bandit Sampling for Deep Learning", NeurIPS 2020,
Algorithms 1 and 2.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.core  # jax imports it; named here so type checkers see jax.core
import jax.numpy as jnp
from flax import nnx

from adambs_jax._checks import check_key
from adambs_jax._tree_utils import batch_size_of, gather
from adambs_jax.feedback._estimators import OptimizerAwareEstimator
from adambs_jax.feedback._kinds import CustomFeedback, Feedback, as_feedback
from adambs_jax.feedback._losses import Loss, as_loss
from adambs_jax.feedback._model_state import batch_extras, check_examples_independent, loss_parts
from adambs_jax.samplers import Sampler, ScoringSampler, check_healthy, importance_weights
from adambs_jax.step._sampled_batch import (
    UNWRITTEN,
    SampledBatch,
    find_sampled_batch,
    unwritten_feedback,
)

__all__ = ["Extras", "SampledBatch", "value_and_grad", "Sampling"]


class Extras(NamedTuple):
    """What ``value_and_grad``'s function returns besides the loss and G_hat.

    Attributes:
      feedback: (K,) float32, the per-example scores for ``Sampling.learn``.
      losses: (K,) the per-example losses of the batch.
      aux: the loss's auxiliary output (a loss with ``has_aux``), else None.
    """

    feedback: jax.Array
    losses: jax.Array
    aux: Any = None


def _weighted_value_and_grad(fun, has_aux, weights, params, args, kwargs):
    """``((loss, losses, aux), G_hat)`` of ``fun(params, *args, **kwargs)`` by one batched
    ``jax.value_and_grad`` of the weighted loss (1/K) sum_k w_k loss_k."""

    def weighted(p):
        out = fun(p, *args, **kwargs)
        losses, aux = out if has_aux else (out, None)
        if jnp.ndim(losses) != 1 or jnp.shape(losses) != jnp.shape(weights):
            raise ValueError(
                f"fun must return per-example losses of shape {jnp.shape(weights)} (one per "
                f"weight; do not take the mean), got shape {jnp.shape(losses)}"
            )
        losses = jnp.asarray(losses)
        return jnp.mean(weights.astype(losses.dtype) * losses), (losses, aux)

    (loss, (losses, aux)), grads = jax.value_and_grad(weighted, has_aux=True)(params)
    return (loss, losses, aux), grads


def _per_example_estimate(loss, kind, params, batch, weights, key, opt_state):
    """``((loss, losses, aux), G_hat, feedback)`` with the kind's fused estimator: the model is
    evaluated one example at a time (exact gradient norms) or through its outputs."""
    parts = loss_parts(loss, None)
    estimator = kind.estimator()
    extra = {"opt_state": opt_state} if isinstance(estimator, OptimizerAwareEstimator) else {}
    estimate = estimator(parts.losses_only, params, batch, weights, key, **extra)
    aux, _ = batch_extras(parts, params, batch, key)
    losses = estimate.losses
    value = jnp.mean(weights.astype(losses.dtype) * losses)
    return (value, losses, aux), estimate.gradient, estimate.feedback


def _coupling_check_at_trace_time(loss, params, batch, why):
    """The per-example losses must not depend on the rest of the batch: checked once per
    trace on stand-in arrays of the same shapes (the property is the model's, not the data's;
    a loss whose forward needs the real values is not checked)."""

    def stand_in(leaf, seed):
        shape, dtype = jnp.shape(leaf), jnp.result_type(leaf)
        if jnp.issubdtype(dtype, jnp.floating):
            return 0.1 * jax.random.normal(jax.random.key(seed), shape, dtype)
        return jnp.zeros(shape, dtype)

    with jax.ensure_compile_time_eval():
        fake_params = jax.tree.map(lambda leaf: stand_in(leaf, 1), params)
        fake_batch = jax.tree.map(lambda leaf: stand_in(leaf, 2), batch)
        try:
            check_examples_independent(
                loss_parts(loss, None).losses_only, fake_params, fake_batch, None, why=why
            )
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
            return  # the loss closes over traced values: it cannot be evaluated apart


def _check_weights(weights, batch_size):
    if weights is None:
        raise TypeError(
            "weights: no importance weights: give the gradient function the batch that "
            "Sampling.draw() returned (it carries them), or weights= (K,) keyword-only"
        )
    if jnp.shape(weights) != (batch_size,):
        raise ValueError(f"weights must have shape ({batch_size},), got {jnp.shape(weights)}")


def value_and_grad(
    fun: Any,
    *,
    feedback: Feedback | str | Callable = "loss",
    has_aux: bool = False,
    batch: Any = None,
) -> Callable:
    """``jax.value_and_grad`` for a per-example loss and importance weights.

    Returns ``grad_fn(*args, key=None, opt_state=None, **kwargs)``, used in one of two ways:

    * **With the batch ``ab.Sampling.draw`` gave** (an ``ab.step.SampledBatch``, among the
      arguments or bound here with ``batch=`` when ``fun`` closes over it): it returns what
      ``jax.value_and_grad(fun, has_aux=has_aux)`` would, ``loss, grads`` or ``(loss, aux),
      grads``, with ``loss`` = (1/K) sum_k w_k loss_k (unbiased for the full-data mean loss)
      and ``grads`` = G_hat (AdamBS eq. 1; give it to any optax optimizer, no weights). The
      weights come from the batch, ``fun`` receives the batch's plain data, and the
      per-example feedback is written into the batch (its ``feedback`` slot, on the device:
      it leaves your ``jax.jit`` / ``nnx.jit`` step without being returned) for ``Sampling``
      to learn from at its next draw.
    * **With explicit weights** ``grad_fn(*args, weights=w, ...)`` (a plain batch): it
      returns ``((loss, extras), grads)`` with ``extras`` an ``Extras(feedback, losses,
      aux)``; give ``extras.feedback`` to ``Sampling.learn`` or your sampler's ``update``.

    Args:
      fun: the per-example loss. ``fun(*args, **kwargs) -> losses (K,)`` (or ``(losses,
        aux)`` with ``has_aux``) for ``feedback="loss"`` or a callable feedback: any
        signature whose first argument is differentiated, e.g. a closure ``loss_fn(params)``
        over the batch. For the kinds that evaluate examples one at a time or need the
        outputs (``"grad_norm"``, ``"preconditioned_grad_norm"``, ``"logit_grad_norm"``)
        the loss must be ``(params, batch[, key])``: an ``ab.Loss`` / ``ab.ModelLoss`` or a
        plain callable. With a Flax NNX module as ``args[0]``: ``fun(module, *args[1:])``.
      feedback: the kind of feedback, as ``make_train_step``'s (default ``"loss"``: the
        per-example losses, which cost nothing more; ``ab.feedback.GradNorm()`` for the
        exact gradient norms from the same backward pass).
      has_aux: ``fun`` returns ``(losses, aux)`` (an ``ab.Loss``'s own ``has_aux`` also
        counts).
      batch: the ``SampledBatch`` a closure ``fun`` computes its loss on (its weights are
        used and its feedback written); None when the batch is an argument.

    Per-example feedback needs a per-example loss: a model with batch statistics (BatchNorm
    in training mode) is refused when ``grad_fn`` is traced (checked once, on stand-in
    arrays of the same shapes), naming the fix. ``"preconditioned_grad_norm"`` needs
    ``opt_state=``.

    References:
      Liu, Wu, Mozafari, "Adam with Bandit Sampling for Deep Learning", NeurIPS 2020, eq. 1
      and Algorithm 2.

    Examples:
      >>> import jax.numpy as jnp
      >>> import adambs_jax as ab
      >>> loss = lambda w, batch: (batch["x"] @ w - batch["y"]) ** 2   # per-example
      >>> batch = {"x": jnp.eye(2), "y": jnp.array([1.0, 2.0])}
      >>> (value, extras), grad = ab.value_and_grad(loss)(
      ...     jnp.zeros(2), batch, weights=jnp.array([1.0, 0.5]))
      >>> float(value), grad.tolist(), extras.feedback.tolist()   # (1*1 + 0.5*4) / 2
      (1.5, [-1.0, -1.0], [1.0, 4.0])
    """
    if batch is not None and not isinstance(batch, SampledBatch):
        raise TypeError(
            f"batch must be the SampledBatch that Sampling.draw() returned (its weights are "
            f"used, its feedback written), got {type(batch).__name__}; with a batch of your "
            f"own, pass weights= to the gradient function"
        )
    if isinstance(fun, Loss):
        has_aux = has_aux or fun.has_aux
        if fun.model_state:
            raise ValueError(
                "fun: a Loss with model_state is for make_train_step; in your own step, "
                "close over the model state and return it as aux (has_aux=True)"
            )
    weighted = _weighted_grad_fn(fun, as_feedback(feedback, fun), has_aux)

    def grad_fn(*args, weights=None, key=None, opt_state=None, **kwargs):
        sampled, args, kwargs = find_sampled_batch(batch, args, kwargs)
        if sampled is None:
            return weighted(args, weights, key, opt_state, kwargs)
        if weights is not None:
            raise TypeError(
                "weights: the batch is a SampledBatch, which carries its weights; do not "
                "pass weights= as well"
            )
        (value, extras), grads = weighted(args, sampled.weights, key, opt_state, kwargs)
        _write_feedback(sampled, extras.feedback)
        return ((value, extras.aux) if has_aux else value), grads

    return grad_fn


def _write_feedback(sampled: SampledBatch, scores: jax.Array) -> None:
    """Writes the batch's feedback into its slot (a ``jax.Ref``: the write outlives the
    jitted step it is made in)."""
    if jnp.shape(sampled.feedback) != jnp.shape(scores):
        raise ValueError(
            f"batch.feedback has shape {jnp.shape(sampled.feedback)}, the batch's feedback "
            f"{jnp.shape(scores)}: the SampledBatch was changed after Sampling.draw()"
        )
    sampled.feedback[...] = jax.lax.stop_gradient(scores).astype(jnp.float32)


def _weighted_grad_fn(fun, kind: Feedback, has_aux: bool) -> Callable:
    """``weighted(args, weights, key, opt_state, kwargs) -> ((loss, extras), grads)``: the
    explicit-weights form of ``value_and_grad``, by the path the feedback kind needs."""
    structured = kind.per_example_evaluation or kind.needs_model_loss
    checked: list = []

    def weighted(args, weights, key, opt_state, kwargs):
        if not args:
            raise TypeError(
                "grad_fn needs the parameters (or the NNX module) as its first argument"
            )
        if isinstance(args[0], nnx.Module):
            return _nnx_value_and_grad(fun, kind, has_aux, args, weights, kwargs)
        if not structured:
            # read before the len() test below, which pyright widens args to include ()
            params = args[0]
            batch = args[1] if len(args) > 1 else None
            _check_weights(weights, jnp.shape(weights)[0] if weights is not None else 0)
            (value, losses, aux), grads = _weighted_value_and_grad(
                fun, has_aux, weights, params, args[1:], kwargs
            )
            scores = _scores_of_losses(kind, params, batch, losses)
            return (value, Extras(scores, losses, aux)), grads
        return _structured_value_and_grad(
            fun, kind, has_aux, args, weights, key, opt_state, checked
        )

    return weighted


def _scores_of_losses(kind: Feedback, params, batch, losses):
    """The feedback of a batch-evaluated kind: the losses, or a callable of them."""
    if isinstance(kind, CustomFeedback):
        return jax.lax.stop_gradient(kind.fn(params, batch, losses)).astype(jnp.float32)
    return jax.lax.stop_gradient(losses).astype(jnp.float32)


def _structured_value_and_grad(fun, kind, has_aux, args, weights, key, opt_state, checked):
    if len(args) != 2:
        raise TypeError(
            f"feedback={kind.name!r} evaluates the loss per example: call grad_fn(params, "
            f"batch, weights=..., key=...) with a loss (params, batch[, key]) -> (K,)"
        )
    params, batch = args
    _check_weights(weights, batch_size_of(batch, name="batch"))
    loss = as_loss(fun, name="fun")
    if isinstance(loss, Loss) and has_aux and not loss.has_aux:
        loss = loss._replace(has_aux=True)
    if kind.per_example_evaluation and not checked:
        _coupling_check_at_trace_time(loss, params, batch, f"feedback={kind.name!r}")
        checked.append(True)
    if isinstance(kind.estimator(), OptimizerAwareEstimator) and opt_state is None:
        raise TypeError(f"feedback={kind.name!r} reads the optimizer state: pass opt_state=")
    (value, losses, aux), grads, scores = _per_example_estimate(
        loss, kind, params, batch, weights, key, opt_state
    )
    return (value, Extras(jax.lax.stop_gradient(scores), losses, aux)), grads


def _nnx_value_and_grad(fun, kind, has_aux, args, weights, kwargs):
    """The NNX path: G_hat as an ``nnx.State`` of the module's ``nnx.Param`` s (what
    ``nnx.value_and_grad`` gives an ``nnx.Optimizer``), the module's other state updated in
    place from the same batched forward."""
    if kind.per_example_evaluation or kind.needs_model_loss:
        raise ValueError(
            f"feedback={kind.name!r} with an NNX module: this path evaluates the module on the "
            f"batch as a whole; use feedback='loss' or a callable feedback, or split the "
            f"module (nnx.split) and give make_train_step a loss of its parameters"
        )
    module = args[0]
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def of_params(p, *rest_args, **rest_kwargs):
        merged = nnx.merge(graphdef, p, rest, copy=True)
        out = fun(merged, *rest_args, **rest_kwargs)
        losses, aux = out if has_aux else (out, None)
        return losses, (aux, nnx.state(merged, nnx.Not(nnx.Param)))

    _check_weights(weights, jnp.shape(weights)[0] if weights is not None else 0)
    (value, losses, (aux, new_rest)), grads = _weighted_value_and_grad(
        of_params, True, weights, params, args[1:], kwargs
    )
    nnx.update(module, new_rest)
    batch = args[1] if len(args) > 1 else None
    return (value, Extras(_scores_of_losses(kind, params, batch, losses), losses, aux)), grads


@functools.partial(jax.jit, static_argnums=0)
def _draw(sampler: Sampler, state, key, data):
    """``(key, indices, weights, batch, fill)``: K draws, gathered, and the contents of a
    fresh feedback slot (made here, on the device, at no extra dispatch)."""
    key, sample_key = jax.random.split(key)
    indices, probs = sampler.sample(state, sample_key)
    weights = importance_weights(probs, sampler.num_examples)
    batch = indices if data is None else gather(data, indices)
    return key, indices, weights, batch, unwritten_feedback(sampler.batch_size)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def _learn(sampler: Sampler, state, indices, feedback, apply):
    return sampler.update(state, indices, jnp.asarray(feedback, jnp.float32), apply=apply)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def _learn_and_draw(sampler: Sampler, state, indices, feedback, key, data):
    """Learns the last batch's feedback, then draws: one dispatch per step of a loop of your
    own. The feedback is read from its slot before the call: a ``jax.Ref`` among a jitted
    function's arguments sends the call through JAX's slower dispatch path."""
    state = sampler.update(state, indices, feedback)
    return (state, *_draw(sampler, state, key, data))


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def _renormalize(sampler: Sampler, state):
    renormalize = sampler.renormalize
    assert renormalize is not None  # learn calls this only for a sampler that has one
    return renormalize(state)


class Sampling:
    """A sampler with its state, its key and its renormalization schedule, for a training
    loop of your own: ``draw`` samples K examples and gathers them from ``data`` on the
    device; the step you wrote computes its gradient with ``ab.value_and_grad`` on that
    batch, which writes the batch's feedback into it; the next ``draw`` learns from it
    first. Every ``sampler.renormalize_every`` learned updates the sampler is renormalized
    (O(n), one jitted call). The loop cannot forget to learn or to renormalize:

        sampling = ab.Sampling(ab.priority_sampler(n, K), data, seed=0)
        for t in range(T):
            batch = sampling.draw()        # learns the last batch's feedback, draws K more
            params, opt_state, loss = train_step(params, opt_state, batch)

    A step that does not use ``ab.value_and_grad`` on the batch gives the feedback itself:
    ``sampling.learn(feedback)`` after it (or writes ``batch.feedback[...] = scores``); a
    draw whose feedback never came back is refused at the next draw (checked once, at the
    first), naming this. Each call is one jitted dispatch (learn and draw together); nothing
    waits for the device. For the fastest loop (one dispatch per step, or a scan of steps)
    use ``ab.make_train_step``.

    Args:
      sampler: a ``Sampler`` (a ``ScoringSampler`` needs the model: use ``make_train_step``).
      data: the dataset on the device (a pytree with leading axis n), or None: the batch's
        data is then the indices I (read those records yourself).
      key: the PRNG key the draws are made from (split at every draw); or
      seed: an int to make that key from (give one of the two).

    References:
      Liu, Wu, Mozafari, "Adam with Bandit Sampling for Deep Learning", NeurIPS 2020,
      Algorithm 2.
    """

    def __init__(
        self,
        sampler: Sampler,
        data: Any = None,
        *,
        key: jax.Array | None = None,
        seed: int | None = None,
    ):
        if isinstance(sampler, ScoringSampler) or not isinstance(sampler, Sampler):
            raise TypeError(
                f"sampler must be an ab.samplers.Sampler (a ScoringSampler scores with the "
                f"model: use make_train_step), got {type(sampler).__name__}"
            )
        key = _key_of(key, seed)
        if data is not None and batch_size_of(data, name="data") != sampler.num_examples:
            raise ValueError(
                f"data: every leaf must have leading axis n = sampler.num_examples = "
                f"{sampler.num_examples}, got {batch_size_of(data)}"
            )
        self.sampler, self.data = sampler, data
        self._key = jnp.copy(key)
        self._indices = None
        self._pending: SampledBatch | None = None  # drawn, its feedback not learned yet
        self._verified = False  # a step has been seen to write a batch's feedback
        self.state = sampler.init()

    @property
    def state(self) -> Any:
        """The sampler's state (a pytree: save it with your checkpoint). It includes the
        feedback of every batch a step has written (reading it after a step learns that
        step's feedback, waiting for the device once; before the step, the batch stays
        pending). Assigning a restored state resumes the schedule from its ``step`` and
        drops a batch drawn before (its feedback belongs to the run you left)."""
        pending = self._pending
        if pending is not None and not _unwritten(pending):
            self._verified = True
            self._learn_pending()
        return self._state

    @state.setter
    def state(self, state: Any) -> None:
        self._state, self._pending = state, None
        # a restored state resumes the schedule from its own count of updates
        step = getattr(state, "step", 0)
        self._learned = int(step) if not isinstance(step, jax.core.Tracer) else 0

    @property
    def indices(self) -> jax.Array | None:
        """The indices I (K,) of the last draw (None before the first)."""
        return self._indices

    def draw(self) -> SampledBatch:
        """K new draws as a ``SampledBatch``: the data data[I] (or I without data), read like
        the data, with its weights 1 / (n p_I), indices and feedback slot. Learns the last
        batch's feedback first."""
        pending = self._verified_pending()
        if pending is not None and not self._renormalization_due():
            feedback = pending.feedback[...]
            self._state, self._key, indices, weights, data, fill = _learn_and_draw(
                self.sampler, self._state, pending.indices, feedback, self._key, self.data
            )
            self._pending = None
            self._learned += 1
        else:
            self._learn_pending()
            self._key, indices, weights, data, fill = _draw(
                self.sampler, self._state, self._key, self.data
            )
        self._indices = indices
        self._pending = SampledBatch(data, weights, indices, jax.new_ref(fill))
        return self._pending

    def learn(self, feedback: jax.Array, *, apply: Any = True) -> None:
        """Updates the distribution from the feedback (K,) of the last draw (invalid entries
        are dropped and counted by the sampler), in place of what the step wrote into the
        batch; ``apply`` False (a bool, may be a device scalar, e.g. "the step was finite")
        leaves it unchanged. Renormalizes on schedule."""
        if self._indices is None:
            raise RuntimeError("Sampling.learn: call draw() first (learn needs its indices)")
        if jnp.shape(feedback) != (self.sampler.batch_size,):
            raise ValueError(
                f"feedback must have shape ({self.sampler.batch_size},) (one per draw), "
                f"got {jnp.shape(feedback)}"
            )
        self._pending = None
        self._update(self._indices, feedback, apply)

    def probabilities(self) -> jax.Array:
        """The full distribution p (n,), O(n) (for logs and plots; it includes every batch
        whose feedback a step has written, as ``state`` does)."""
        if self.sampler.probabilities is None:
            raise TypeError(f"{type(self.sampler).__name__} has no full distribution")
        return self.sampler.probabilities(self.state)

    def _update(self, indices, feedback, apply) -> None:
        self._state = _learn(self.sampler, self._state, indices, feedback, apply)
        self._learned += 1
        if self._renormalization_due(after=0):
            self._state = _renormalize(self.sampler, self._state)
            check_healthy(self._state, where=f"Sampling, after {self._learned} updates")

    def _renormalization_due(self, after: int = 1) -> bool:
        """Whether the schedule renormalizes once ``after`` more updates are learned."""
        every = self.sampler.renormalize_every
        due = (self._learned + after) % every == 0 if every else False
        return bool(due and self.sampler.renormalize is not None)

    def _learn_pending(self) -> None:
        pending = self._verified_pending()
        if pending is not None:
            self._pending = None
            self._update(pending.indices, pending.feedback[...], True)

    def _verified_pending(self) -> SampledBatch | None:
        """The batch whose feedback is to be learned; the first time, checks (one wait for
        the device) that the step wrote it."""
        pending = self._pending
        if pending is None or self._verified:
            return pending
        if _unwritten(pending):
            raise RuntimeError(
                "Sampling: the feedback of the last batch never came back. Compute the "
                "step's gradient with ab.value_and_grad on the batch draw() returned (pass "
                "it, or bind it: ab.value_and_grad(loss_fn, batch=batch)), or call "
                "sampling.learn(feedback) after the step"
            )
        self._verified = True
        return pending


def _unwritten(batch: SampledBatch) -> bool:
    """Whether no step has written the batch's feedback (waits for the device)."""
    return bool(jnp.all(batch.feedback[...] == UNWRITTEN))


def _key_of(key: Any, seed: Any) -> jax.Array:
    """The PRNG key of ``Sampling``: ``key``, or one made from the int ``seed``."""
    if (key is None) == (seed is None):
        raise TypeError("Sampling needs exactly one of key= (a PRNG key) and seed= (an int)")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        return jax.random.key(seed)
    check_key(key, name="key")
    return key
