"""A train step on a gathered batch: the data stays on the host, the sampler on the device.

``make_train_step`` gathers ``data[I]`` on the device, so the whole dataset must be there.
``make_host_train_step`` takes the batch already gathered (by a loader that read the
records of the drawn indices from a host ``DataSource``, ``_loop``) and the
draws it was gathered for, and returns, besides the new state, the indices of a later step:

    step = ab.make_host_train_step(loss_fn, optax.adam(1e-3), sampler, lookahead=2)
    state, pending = step.init(params, key)        # pending: the draws of steps 0 .. L-1
    for t in range(T):
        draws = pending.pop(0)
        batch = source.read(np.asarray(draws.indices))    # the loader's work
        state, metrics, later = step(state, batch, draws, keys[t])
        pending.append(later)                      # the draws of step t + L

With K the batch size, n the dataset size and L = ``lookahead``, call t runs the stages of
``adambs_jax.step._stages`` on the given draws ``(I_t, p_t)`` and ``batch = data[I_t]``:

    weigh          w = 1 / (n p_t) (K,), from the probabilities stored in ``draws``
    estimate       G_hat = (1/K) sum_k w_k grad loss_k(params) and the feedback f (K,)
    guarded apply  params + optimizer(G_hat); sampler.update(state, I_t, f, apply=finite)
    new state      the metrics (as ``make_train_step``'s), counters and the next key
    draw ahead     (I_{t+L}, p_{t+L}) = sampler.sample(updated sampler state, sample_key)

Keys: the call's key (or the state's own key, split and advanced, as ``make_train_step``
does) is split ``sample_key, model_key, _ = jax.random.split(key, 3)``: ``model_key`` is the
loss's key at this step, ``sample_key`` draws the indices of step t + L. ``step.init(params,
key)`` splits ``key`` into L + 1 keys: the state's own key and the keys of the first L draws
(``step.draw(sampler_state, key_j)``, from the initial sampler state).

Staleness. The draws used at step t come from the sampler state after step t - L (the
initial state for t < L). They are still an unbiased estimate: conditioned on the past, I_t
is drawn i.i.d. from the distribution p^{(t-L)} of that state, and the weights use exactly
the probabilities ``draws.probs`` = p^{(t-L)}_{I_t} the indices were drawn with, so
E[(1/K) sum_k w_k g_{I_k}] = sum_j p_j^{(t-L)} g_j / (n p_j^{(t-L)}) = (1/n) sum_j g_j, the
full gradient at the current parameters (AdamBS eq. 1; any p with p_j > 0 where g_j != 0).
The bandit update ``sampler.update(state, I_t, f)`` reads p from the CURRENT state (exp3's
loss estimate f^2 / p_j^2 uses its own p^{(t-1)}, not p^{(t-L)}): the sampler learns from
slightly stale draws, which changes only how fast its distribution adapts, never the
unbiasedness of G_hat. With L = 1 and a sampler that ignores its state (uniform) the step
equals ``make_train_step``'s step on the in-memory data with the same draws.

Invalid draws. The weight w = 1 / (n p) is defined only for p in (0, 1] (and an index in
[0, n)): a negative p would step up the loss, a p 10^6 times too large a near-zero step, and
nothing downstream could tell. The step's own draws are always valid; a ``Draws`` built by
hand is checked where that costs nothing:

    on the host     ``step(...)`` with numpy (or list) draws, and every draw the loop's
                    loader threads read (they copy the indices to the host anyway): a
                    ValueError naming the bad entries, before the state is touched
    on the device   draws that are device arrays: checking them on the host would wait for
                    the step that computed them (a sync per step), so the step itself sets
                    the K weights to NaN (one (K,) reduction, no branch); the non-finite
                    guard then skips the step (``metrics["skipped"]``, ``skipped_steps``) and
                    ``metrics["invalid_draws"]`` is 1. With ``skip_non_finite=False`` the NaN
                    update is applied like any other non-finite one: loud, never silently
                    wrong.

Scoring samplers are refused (they score examples of the whole dataset on the device).
Renormalization: as ``TrainStep``, a Python counter runs the sampler's O(n)
``renormalize`` every ``sampler.renormalize_every`` calls (no device sync); it rescales the
sampler's weights without changing its distribution, so pending draws stay valid.

Mesh (``mesh=``): the batch is split along ``data_axis`` (``in_shardings``), the state, the
draws, the key and the metrics are replicated; the loop (``_loop``) builds the
global batch from each process's slice, so the dataset is never replicated.

Reference: Liu, Wu, Mozafari, "Adam with Bandit Sampling for Deep Learning", NeurIPS 2020,
Algorithm 1 and eq. 1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adambs_jax._checks import check_int
from adambs_jax._tree_utils import batch_size_of
from adambs_jax.feedback._kinds import Feedback
from adambs_jax.feedback._losses import AnyLoss, PerExampleLoss
from adambs_jax.feedback._model_state import loss_parts
from adambs_jax.samplers import FeedbackFn, Sampler, ScoringSampler
from adambs_jax.sharding import (
    DEFAULT_DATA_AXIS,
    batch_sharding,
    replicate_on_mesh,
    replicated_sharding,
)
from adambs_jax.step._options import StepOptions, build_step_config, first_call_check
from adambs_jax.step._stages import (
    Draw,
    StepConfig,
    check_train_state,
    draw_weights,
    draws_valid,
    learn_from_draw,
    place_batch,
    step_key,
)
from adambs_jax.step._state import (
    RenormalizationSchedule,
    TrainState,
    TrainStep,
    run_first_call_check,
)
from adambs_jax.step._train_step import renormalize_fn

__all__ = [
    "Draws",
    "HostTrainStep",
    "make_host_train_step",
    "draw_from",
    "run_host_step",
    "check_host_draws",
]


class Draws(NamedTuple):
    """The indices of one step's batch and the probabilities they were drawn with.

    Attributes:
      indices: (K,) integer, the examples to read, each in [0, n).
      probs: (K,) float32, p_{I_k} of the distribution the indices were drawn from, each in
        (0, 1]; the step weighs example k by 1 / (n probs_k). Draws outside these ranges
        are refused on the host or skipped by the step (the module docstring, "Invalid
        draws").
    """

    indices: jax.Array
    probs: jax.Array


def draw_from(sampler: Sampler, sampler_state: Any, key: jax.Array) -> Draws:
    """``Draws`` of ``sampler`` at ``sampler_state`` with the sample key of ``key`` (the first
    of ``jax.random.split(key, 3)``, as a step draws)."""
    sample_key = jax.random.split(key, 3)[0]
    indices, probs = sampler.sample(sampler_state, sample_key)
    return Draws(indices, probs)


def _invalid_entries(name: str, values: np.ndarray, bad: np.ndarray) -> str:
    positions = np.flatnonzero(bad)
    shown = ", ".join(f"[{i}] = {values[i]!r}" for i in positions[:4].tolist())
    more = f", ... ({positions.size} in all)" if positions.size > 4 else ""
    return f"{name}{shown}{more}"


def check_host_draws(indices: Any, probs: Any, num_examples: int, batch_size: int) -> None:
    """Checks draws held on the host (numpy, lists): ``indices`` (K,) integers in [0, n),
    ``probs`` (K,) floats in (0, 1], finite; either may be None (not checked).

    Raises:
      ValueError / TypeError: naming the first bad entries and why they are refused.
    """
    if indices is not None:
        indices = np.asarray(indices)
        if indices.shape != (batch_size,):
            raise ValueError(f"draws.indices must have shape ({batch_size},), got {indices.shape}")
        if not np.issubdtype(indices.dtype, np.integer):
            raise TypeError(f"draws.indices must be integers, got dtype {indices.dtype}")
        bad = (indices < 0) | (indices >= num_examples)
        if bad.any():
            entries = _invalid_entries("draws.indices", indices, bad)
            raise ValueError(f"{entries}: every index must be in [0, {num_examples})")
    if probs is not None:
        probs = np.asarray(probs)
        if probs.shape != (batch_size,):
            raise ValueError(f"draws.probs must have shape ({batch_size},), got {probs.shape}")
        if not np.issubdtype(probs.dtype, np.floating):
            raise TypeError(f"draws.probs must be floats, got dtype {probs.dtype}")
        bad = ~((probs > 0) & (probs <= 1))  # NaN fails both comparisons
        if bad.any():
            entries = _invalid_entries("draws.probs", probs, bad)
            raise ValueError(
                f"{entries}: every probability must be in (0, 1] (the weight 1 / (n p) of "
                f"p <= 0 would step up the loss, of p > 1 or NaN it is no weight)"
            )


def _check_draw_shapes(indices, probs, batch_size: int) -> None:
    """At trace time: ``(K,)`` integer indices and ``(K,)`` float probabilities."""
    if jnp.shape(indices) != (batch_size,) or jnp.shape(probs) != (batch_size,):
        raise ValueError(
            f"draws: indices and probs must have shape ({batch_size},) (sampler.batch_size), "
            f"got {jnp.shape(indices)} and {jnp.shape(probs)}"
        )
    if not jnp.issubdtype(jnp.result_type(indices), jnp.integer):
        raise TypeError(f"draws.indices must be integers, got {jnp.result_type(indices)}")
    if not jnp.issubdtype(jnp.result_type(probs), jnp.floating):
        raise TypeError(f"draws.probs must be floats, got {jnp.result_type(probs)}")


def _check_batch(batch, batch_size: int):
    size = batch_size_of(batch, name="batch")
    if size != batch_size:
        raise ValueError(
            f"batch: every leaf must have leading axis K = sampler.batch_size = {batch_size} "
            f"(the records of draws.indices), got {size}"
        )


def run_host_step(
    config: StepConfig, state: TrainState, batch: Any, draws: Draws, key: jax.Array | None
):
    """One step on a gathered batch: ``(state, metrics, the draws of a later step)``."""
    sampler = config.sampler
    assert not isinstance(sampler, ScoringSampler)  # make_host_train_step refuses one
    check_train_state(state, sampler.num_examples)
    _check_batch(batch, sampler.batch_size)
    indices, probs = draws
    _check_draw_shapes(indices, probs, sampler.batch_size)
    state_key, key = step_key(state.key, key)
    _, model_key, _ = jax.random.split(key, 3)
    parts = loss_parts(config.described_loss, state.model_state)
    config = config._replace(loss_fn=parts.losses_only)
    # invalid draws get NaN weights: the non-finite guard skips the step (module docstring)
    valid = draws_valid(indices, probs, sampler.num_examples)
    weights = jnp.where(valid, draw_weights(config, indices, probs), jnp.nan)
    draw = Draw(indices, weights, place_batch(config, batch), state.sampler_state)
    new_state, metrics = learn_from_draw(config, state, draw, parts, model_key, state_key)
    metrics["invalid_draws"] = jnp.logical_not(valid).astype(jnp.int32)
    return new_state, metrics, draw_from(sampler, new_state.sampler_state, key)


@dataclasses.dataclass(frozen=True)
class HostTrainStep:
    """``make_host_train_step``'s result: ``step(state, batch, draws, key=None) -> (state,
    metrics, draws of step t + lookahead)``, ``step.init(params, key)``, ``step.draw``.

    Renormalization as ``TrainStep``'s (a Python count of calls, no device sync).

    Attributes:
      step_fn: the jitted (or, ``jit=False``, pure) ``(state, batch, draws, key) -> ...``.
      draw: ``(sampler_state, key) -> Draws`` (jitted with ``jit=True``).
      optimizer, sampler: what the step applies and draws from.
      lookahead: L, how many steps ahead of its use a batch is drawn.
      renormalize: the jitted ``state -> state`` renormalization, or None.
      mesh, data_axis: the data-parallel mesh (None: none) and its batch axis.
      first_call_check: ``(state, batch) -> None`` run once, at the first concrete call
        (``TrainStep``'s), or None.
    """

    step_fn: Callable[..., tuple[TrainState, dict, Draws]]
    draw: Callable[[Any, jax.Array], Draws]
    optimizer: optax.GradientTransformation
    sampler: Sampler
    lookahead: int
    renormalize: Callable[[TrainState], TrainState] | None = None
    mesh: jax.sharding.Mesh | None = None
    data_axis: str = DEFAULT_DATA_AXIS
    first_call_check: Callable[[TrainState, Any], None] | None = None
    _schedule: RenormalizationSchedule = dataclasses.field(
        default_factory=lambda: RenormalizationSchedule(), compare=False, repr=False
    )
    _checked: list = dataclasses.field(default_factory=lambda: [False], compare=False, repr=False)

    def __call__(self, state: TrainState, batch: Any, draws: Draws, key: jax.Array | None = None):
        run_first_call_check(self.first_call_check, self._checked, state, batch)
        draws = Draws(*draws)
        check_host_draws(  # host values only: checking device draws here would sync
            None if isinstance(draws.indices, jax.Array) else draws.indices,
            None if isinstance(draws.probs, jax.Array) else draws.probs,
            self.sampler.num_examples,
            self.sampler.batch_size,
        )
        every = self.sampler.renormalize_every
        scheduled = self.renormalize is not None and bool(every)
        if scheduled:
            assert every is not None  # scheduled: bool(every)
            state = self._schedule.before(self.renormalize, every, state, 1)
        if self.mesh is not None and jax.process_count() > 1:  # global arrays for jit
            draws, key = replicate_on_mesh((draws, key), self.mesh)
        out = TrainStep._call(self.step_fn, state, batch, draws, key)
        if scheduled:
            self._schedule.after(out[0], 1)
        return out

    def init(self, params: Any, key: jax.Array, *, model_state: Any = None):
        """``(state, draws)``: a fresh ``TrainState`` (own key: the first of
        ``jax.random.split(key, lookahead + 1)``) and the list of the first ``lookahead``
        ``Draws``, drawn from the initial sampler state with the other keys."""
        keys = jax.random.split(key, self.lookahead + 1)
        state = TrainState.create(
            params=params,
            optimizer=self.optimizer,
            sampler=self.sampler,
            key=keys[0],
            model_state=model_state,
        )
        # a sharded sampler's state stays as its init placed it (split), the rest replicated
        split = getattr(self.sampler.init, "state_sharding", None) is not None
        sampler_state = state.sampler_state
        if split:
            state = state._replace(sampler_state=None)
        state, keys = replicate_on_mesh((state, keys), self.mesh)
        if split:
            state = state._replace(sampler_state=sampler_state)
        draws = [self.draw(state.sampler_state, keys[j + 1]) for j in range(self.lookahead)]
        return state, draws

    @property
    def batch_sharding(self) -> jax.sharding.NamedSharding | None:
        """The sharding of the batch the step takes (split along ``data_axis``), or None."""
        return None if self.mesh is None else batch_sharding(self.mesh, self.data_axis)


def _refuse_scoring(sampler: Sampler | ScoringSampler) -> None:
    if isinstance(sampler, ScoringSampler):
        raise ValueError(
            "sampler: a ScoringSampler scores examples of the whole dataset on the device; "
            "make_host_train_step takes only a gathered batch. Use make_train_step with the "
            "data on the device, or a plain Sampler (exp3_sampler, uniform_sampler, ...)"
        )


def _jitted(step_fn, draw_fn, mesh, data_axis, donate: bool = True, sampler=None):
    """``(step, draw)`` jitted (the state donated unless ``donate`` is False); replicated
    shardings under ``mesh``, the batch split along ``data_axis``; a sampler whose ``init``
    carries a ``state_sharding`` (``ab.samplers.sharded``) keeps its state split."""
    donate_argnums = 0 if donate else ()
    if mesh is None:
        return jax.jit(step_fn, donate_argnums=donate_argnums), jax.jit(draw_fn)
    replicated = replicated_sharding(mesh)
    state = replicated
    sampler_sharding = getattr(getattr(sampler, "init", None), "state_sharding", None)
    if sampler_sharding is not None:
        fields = {name: replicated for name in TrainState._fields}
        state = TrainState(**{**fields, "sampler_state": sampler_sharding})
    in_shardings = (state, batch_sharding(mesh, data_axis), replicated, replicated)
    step = jax.jit(
        step_fn,
        donate_argnums=donate_argnums,
        in_shardings=in_shardings,
        out_shardings=(state, replicated, replicated),
    )
    return step, jax.jit(draw_fn, out_shardings=replicated)


def make_host_train_step(
    loss_fn: AnyLoss | PerExampleLoss,
    optimizer: optax.GradientTransformation,
    sampler: Sampler,
    *,
    lookahead: int = 2,
    feedback: Feedback | str | FeedbackFn = "grad_norm",
    options: StepOptions | None = None,
    **option_fields: Any,
) -> HostTrainStep:
    """Builds ``step(state, batch, draws, key=None) -> (state, metrics, draws_next)``.

    ``batch`` is the pytree of the records of ``draws.indices`` (leaves (K, ...), numpy or
    on the device), ``draws`` a ``Draws(indices (K,), probs (K,))`` with the probabilities
    the indices were drawn with, ``draws_next`` the draws for step t + ``lookahead`` (see
    the module docstring for the staleness and why G_hat stays unbiased).

    Args:
      loss_fn, optimizer, sampler: as ``make_train_step``'s; ``sampler`` must be a plain
        ``Sampler`` (a ``ScoringSampler`` needs the dataset on the device).
      lookahead: L >= 1 (default 2): the draws returned by call t are used at call t + L;
        L - 1 batches can be read while the device works.
      feedback, options, **option_fields: as ``make_train_step``'s, the same
        ``ab.StepOptions`` (``jit=False``: the pure step; the caller renormalizes), except
        ``steps_per_call``: one call takes one gathered batch, so any value but 1 is
        refused.

    Returns:
      A ``HostTrainStep``; ``step.init(params, key)`` gives the state and the first L draws.
      ``metrics`` are ``make_train_step``'s and ``"invalid_draws"`` (int32, 1 if the draws
      had an index outside [0, n) or a probability outside (0, 1]: the step was skipped).

    Raises:
      TypeError / ValueError: a ``ScoringSampler``, ``lookahead`` < 1, ``steps_per_call`` > 1,
        or any argument ``make_train_step`` refuses, at build time; a batch whose leading
        axis is not K or draws of the wrong shape or dtype at the first call; draws held on
        the host (numpy) with an index outside [0, n) or a probability outside (0, 1], at
        every call, before the state is touched (device draws: see the module docstring).
    """
    _refuse_scoring(sampler)
    lookahead = check_int("lookahead", lookahead, minimum=1)
    config, options, feedback = build_step_config(
        loss_fn, optimizer, sampler, feedback, options, option_fields
    )
    if options.steps_per_call != 1:
        raise ValueError(
            f"steps_per_call: a host step takes one gathered batch per call, so it must be 1, "
            f"got {options.steps_per_call} (read several batches ahead with lookahead=)"
        )

    def step(state: TrainState, batch: Any, draws: Draws, key: jax.Array | None = None):
        return run_host_step(config, state, batch, Draws(*draws), key)

    def draw(sampler_state: Any, key: jax.Array) -> Draws:
        return draw_from(sampler, sampler_state, key)

    mesh, data_axis = options.mesh, options.data_axis
    common: dict[str, Any] = dict(
        optimizer=config.optimizer,
        sampler=sampler,
        lookahead=lookahead,
        mesh=mesh,
        data_axis=data_axis,
        first_call_check=first_call_check(config, feedback, gathered=True),
    )
    if not options.jit:
        return HostTrainStep(step, draw, **common)
    step, draw = _jitted(step, draw, mesh, data_axis, options.donate, sampler)
    return HostTrainStep(step, draw, renormalize=renormalize_fn(sampler, mesh), **common)
