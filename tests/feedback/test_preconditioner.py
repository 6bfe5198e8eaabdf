"""Tests of adambs_jax.feedback._preconditioner, from the user's side: f_k = ||P * g_k|| with
P the optimizer's diagonal preconditioner, against a float64 reference read off the
optimizer's own update (P = -u_t / (lr m_hat_t), or / (lr g_t) for RMSProp); hyperparameters
read from inject_hyperparams, stated on the feedback, or refused naming the fix, never
assumed; what is no second moment (Adamax, Yogi, ADOPT, SGD) refused."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adambs_jax as ab
from adambs_jax.feedback import _preconditioner as preconditioner

K = 6
LR = 0.1
B1 = 0.9  # optax's default b1 of every Adam below
PGN = ab.feedback.PreconditionedGradNorm
_FIX = "ab.feedback.PreconditionedGradNorm"


def _problem():
    """Linear least squares whose gradients span 1e-9 .. 1e-4 per coordinate, the range in
    which eps, and where it sits, changes P (and the ranking of the examples)."""
    rng = np.random.default_rng(0)
    params = {
        "w": jnp.asarray(rng.normal(size=(5, 3)) * 1e-3, jnp.float32),
        "b": jnp.asarray(rng.normal(size=(3,)) * 1e-4, jnp.float32),
    }
    batch = {
        "x": jnp.asarray(rng.normal(size=(K, 5)) * np.logspace(-5, -1, 5), jnp.float32),
        "y": jnp.asarray(rng.normal(size=(K, 3)) * 1e-4, jnp.float32),
    }
    return params, batch


def _loss(params, batch):
    residual = batch["x"] @ params["w"] + params["b"] - batch["y"]
    return 0.5 * jnp.sum(residual**2, axis=-1)


def _grads64(params, batch):
    """The per-example gradients in float64: dW = x_k r_k^T, db = r_k."""
    x, y = (np.asarray(batch[k], np.float64) for k in ("x", "y"))
    r = x @ np.asarray(params["w"], np.float64) + np.asarray(params["b"], np.float64) - y
    return {"w": x[:, :, None] * r[:, None, :], "b": r}


def _train(optimizer, params, batch, steps=4):
    """``(state, g_t, u_t)``: the state after ``steps`` updates with varying gradients, the
    last gradient and the last update."""
    rng = np.random.default_rng(1)
    mean = {k: v.mean(0) for k, v in _grads64(params, batch).items()}
    state = optimizer.init(params)
    for t in range(steps):
        grad = {
            k: jnp.asarray(v * (1 + t) + 0.3 * np.abs(v).mean() * rng.normal(size=v.shape))
            for k, v in mean.items()
        }
        grad = jax.tree.map(lambda v: v.astype(jnp.float32), grad)
        update, state = optimizer.update(grad, state, params)
    return state, grad, update


def _momentum_hat(state):
    """m_hat_t = mu_t / (1 - b1^t) of the (one) Adam or AMSGrad state."""
    (moment,) = preconditioner.second_moments(state)
    count = float(moment.state.count)
    return {k: np.asarray(v, np.float64) / (1 - B1**count) for k, v in moment.state.mu.items()}


def _reference(params, batch, state, grad, update, divided_by, lr=None):
    """f_k = ||P * g_k|| in float64 with P = -u_t / (lr d_t) read off the optimizer's own
    last update u_t = -lr P * d_t (d_t = m_hat_t, or g_t for RMSProp without momentum), the P
    of the state the step sees."""
    lr = lr or {"w": LR, "b": LR}
    d = _momentum_hat(state) if divided_by == "momentum" else grad
    total = np.zeros(K)
    for name, g in _grads64(params, batch).items():
        p = -np.asarray(update[name], np.float64) / (lr[name] * np.asarray(d[name], np.float64))
        total += np.sum((g * p).reshape(K, -1) ** 2, axis=1)
    return np.sqrt(total)


def _step_feedback(feedback, optimizer, params, batch, state):
    """The step's feedback: the estimator the step builds for ``optimizer``, under jit."""
    estimate = feedback.estimator_for(optimizer)
    weights = jnp.ones(K)
    run = jax.jit(lambda p, b, s: estimate(_loss, p, b, weights, None, opt_state=s).feedback)
    return np.asarray(run(params, batch, state), np.float64)


def _build(optimizer, feedback):
    return ab.make_train_step(_loss, optimizer, ab.uniform_sampler(K, 2), feedback=feedback)


# (id, optimizer, the fix the refusal names, the stated hyperparameters, d_t of the reference)
CASES = [
    ("adam(b2=0.95)", lambda: optax.adam(LR, b2=0.95), "(b2=0.95, eps=1e-08)", "momentum"),
    ("adam(eps=1e-3)", lambda: optax.adam(LR, eps=1e-3), "(b2=0.999, eps=0.001)", "momentum"),
    (
        "chain(clip, adam(b2=0.98, eps=1e-6))",
        lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(LR, b2=0.98, eps=1e-6)),
        "(b2=0.98, eps=1e-06)",
        "momentum",
    ),
    ("amsgrad(b2=0.95)", lambda: optax.amsgrad(LR, b2=0.95), "(eps=1e-08)", "momentum"),
    ("rmsprop()", lambda: optax.rmsprop(LR), "(eps=1e-08, eps_in_sqrt=True)", "gradient"),
    (
        "rmsprop(decay=0.99, eps_in_sqrt=False)",
        lambda: optax.rmsprop(LR, decay=0.99, eps_in_sqrt=False),
        "(eps=1e-08, eps_in_sqrt=False)",
        "gradient",
    ),
    (
        "rmsprop(centered, bias_correction)",
        lambda: optax.rmsprop(LR, decay=0.95, centered=True, bias_correction=True),
        "(b2=0.95, eps=1e-08, eps_in_sqrt=True)",
        "gradient",
    ),
    (
        "inject(rmsprop)(decay=0.95, eps=1e-4)",
        lambda: optax.inject_hyperparams(optax.rmsprop)(learning_rate=LR, decay=0.95, eps=1e-4),
        "(eps_in_sqrt=True)",
        "gradient",
    ),
]


def _stated(fix: str) -> dict:
    """``{"b2": 0.95, ...}`` of a fix ``"(b2=0.95, eps=1e-08)"``."""
    return {
        name: (value == "True") if value in ("True", "False") else float(value)
        for name, value in re.findall(r"(\w+)=([\w.+-]+)", fix)
    }


_CASE_IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("make, fix, divided_by", [c[1:] for c in CASES], ids=_CASE_IDS)
def test_unstated_hyperparameters_are_refused_when_the_step_is_built(make, fix, divided_by):
    # the state does not record them, and no default is assumed: the message names the fix
    # with the values the optimizer was built with
    for feedback in ("preconditioned_grad_norm", PGN()):
        with pytest.raises(ValueError, match=re.escape(f"feedback={_FIX}{fix}")):
            _build(make(), feedback)


@pytest.mark.parametrize("make, fix, divided_by", [c[1:] for c in CASES], ids=_CASE_IDS)
def test_stated_hyperparameters_give_the_optimizers_preconditioned_norm(make, fix, divided_by):
    params, batch = _problem()
    optimizer = make()
    state, grad, update = _train(optimizer, params, batch)
    expected = _reference(params, batch, state, grad, update, divided_by)
    feedback = PGN(**_stated(fix))
    _build(optimizer, feedback)  # accepted
    np.testing.assert_allclose(
        _step_feedback(feedback, optimizer, params, batch, state), expected, rtol=1e-4
    )
    by_function = ab.feedback.preconditioned_grad_norms(
        _loss, params, batch, state, optimizer=optimizer, **_stated(fix)
    )
    np.testing.assert_allclose(np.asarray(by_function, np.float64), expected, rtol=1e-4)


def test_the_old_default_assumption_was_off_by_far_for_these_optimizers():
    # what the issue measured: b2, eps and where eps sits change f_k and the ranking
    params, batch = _problem()
    grads = jax.tree.map(lambda g: jnp.asarray(g, jnp.float32), _grads64(params, batch))
    for optimizer, wrong, right in [
        (optax.adam(LR, b2=0.95), PGN(b2=0.999, eps=1e-8), PGN(b2=0.95, eps=1e-8)),
        (optax.adam(LR, eps=1e-3), PGN(b2=0.999, eps=1e-8), PGN(b2=0.999, eps=1e-3)),
        (optax.rmsprop(LR), PGN(eps=1e-8, eps_in_sqrt=False), PGN(eps=1e-8, eps_in_sqrt=True)),
    ]:
        state, _, _ = _train(optimizer, params, batch)
        facts = preconditioner.inspect_optimizer(optimizer)

        def norms(feedback, state=state, facts=facts):
            return np.asarray(
                preconditioner.preconditioned_norms(grads, params, state, feedback.stated, facts)
            )

        ratio = norms(wrong) / norms(right)
        assert np.all(np.abs(ratio - 1) > 0.1), ratio


def test_inject_hyperparams_are_read_from_the_state():
    params, batch = _problem()
    optimizer = optax.inject_hyperparams(optax.adam)(learning_rate=LR, b2=0.95, eps=1e-3)
    state, grad, update = _train(optimizer, params, batch)
    expected = _reference(params, batch, state, grad, update, "momentum")
    for feedback in (PGN(), PGN(b2=0.95), PGN(b2=0.95, eps=1e-3)):  # nothing, or the same
        _build(optimizer, feedback)
        np.testing.assert_allclose(
            _step_feedback(feedback, optimizer, params, batch, state), expected, rtol=1e-4
        )
    with pytest.raises(ValueError, match=r"b2=0\.999\) differs from the b2=0\.95"):
        _build(optimizer, PGN(b2=0.999))
    # the standalone function reads them too, and compares concrete ones without the optimizer
    got = ab.feedback.preconditioned_grad_norms(_loss, params, batch, state, kind="adam")
    np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=1e-4)
    with pytest.raises(ValueError, match=r"eps=1e-08\) differs from the eps=0\.001"):
        ab.feedback.preconditioned_grad_norms(_loss, params, batch, state, kind="adam", eps=1e-8)


def test_a_scheduled_injected_hyperparameter_is_read_not_stated():
    params, batch = _problem()
    optimizer = optax.inject_hyperparams(optax.adam)(learning_rate=LR, b2=lambda t: 0.95)
    with pytest.raises(ValueError, match="follows a schedule for b2"):
        _build(optimizer, PGN(b2=0.95))
    state, grad, update = _train(optimizer, params, batch)
    np.testing.assert_allclose(
        _step_feedback(PGN(), optimizer, params, batch, state),
        _reference(params, batch, state, grad, update, "momentum"),
        rtol=1e-4,
    )


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: optax.adamax(LR), "optax.scale_by_adamax"),
        (lambda: optax.adamaxw(LR), "optax.scale_by_adamax"),
        (lambda: optax.chain(optax.clip(1.0), optax.adamax(LR, b2=0.99)), "scale_by_adamax"),
        (lambda: optax.inject_hyperparams(optax.adamax)(learning_rate=LR), "(optax.adamax)"),
        (lambda: optax.yogi(LR), "optax.scale_by_yogi"),
        (lambda: optax.contrib.adopt(LR), "optax.contrib.scale_by_adopt"),
    ],
)
def test_what_keeps_no_adam_second_moment_in_its_adam_state_is_refused(make, name):
    # Adamax's ScaleByAdamState holds an infinity norm: refused whatever is stated
    for feedback in ("preconditioned_grad_norm", PGN(b2=0.999, eps=1e-8, kind="adam")):
        with pytest.raises(ValueError, match=f"cannot precondition with .*{re.escape(name)}"):
            _build(make(), feedback)
    params, batch = _problem()
    state, _, _ = _train(make(), params, batch, steps=1)
    with pytest.raises(ValueError, match="cannot precondition"):
        ab.feedback.preconditioned_grad_norms(
            _loss, params, batch, state, optimizer=make(), b2=0.999, eps=1e-8
        )


def test_a_stated_value_that_differs_from_the_optimizers_is_refused_naming_both():
    with pytest.raises(
        ValueError,
        match=re.escape(
            "b2=0.999 (stated) differs from the b2=0.95 the optimizer's optax.scale_by_adam "
            "was built with; state the optimizer's: "
            "feedback=ab.feedback.PreconditionedGradNorm(b2=0.95, eps=1e-08)"
        ),
    ):
        _build(optax.adam(LR, b2=0.95), PGN(b2=0.999, eps=1e-8))
    with pytest.raises(ValueError, match=r"eps_in_sqrt=False \(stated\) differs .*=True"):
        _build(optax.rmsprop(LR), PGN(eps=1e-8, eps_in_sqrt=False))
    # eps_root is 0 unless stated: checked against the optimizer's like a stated value
    with pytest.raises(ValueError, match=r"eps_root=0\.0 \(the default\) differs"):
        _build(optax.adam(LR, eps_root=1e-10), PGN(b2=0.999, eps=1e-8))
    with pytest.raises(ValueError, match=r"kind='rmsprop'\): .* optax.scale_by_adam"):
        _build(optax.adam(LR), PGN(b2=0.999, eps=1e-8, kind="rmsprop"))


def test_eps_root_is_used_as_stated():
    params, batch = _problem()
    optimizer = optax.adam(LR, eps_root=1e-10)
    state, grad, update = _train(optimizer, params, batch)
    feedback = PGN(b2=0.999, eps=1e-8, eps_root=1e-10)
    np.testing.assert_allclose(
        _step_feedback(feedback, optimizer, params, batch, state),
        _reference(params, batch, state, grad, update, "momentum"),
        rtol=1e-4,
    )


def test_second_moments_of_several_transforms():
    params, batch = _problem()
    labels = {"w": "w", "b": "b"}
    same = optax.multi_transform(
        {"w": optax.adam(LR, b2=0.95), "b": optax.adam(LR / 2, b2=0.95)}, labels
    )
    state, grad, update = _train(same, params, batch)
    moments = preconditioner.second_moments(state)
    assert len(moments) == 2
    d = {}
    for moment in moments:  # each covers one parameter: m_hat of the one it covers
        for k, mu in moment.state.mu.items():
            if not isinstance(mu, optax.MaskedNode):
                d[k] = np.asarray(mu, np.float64) / (1 - B1 ** float(moment.state.count))
    total = np.zeros(K)
    for name, g in _grads64(params, batch).items():
        lr = LR if name == "w" else LR / 2
        p = -np.asarray(update[name], np.float64) / (lr * d[name])
        total += np.sum((g * p).reshape(K, -1) ** 2, axis=1)
    np.testing.assert_allclose(
        _step_feedback(PGN(b2=0.95, eps=1e-8), same, params, batch, state),
        np.sqrt(total),
        rtol=1e-4,
    )
    # one stated b2 cannot be right for two different ones
    different = optax.multi_transform({"w": optax.adam(LR, b2=0.9), "b": optax.adam(LR)}, labels)
    with pytest.raises(ValueError, match=r"built with different b2 \(0\.9, 0\.999\)"):
        _build(different, PGN(b2=0.9, eps=1e-8))
    # two second moments for one parameter: refused when traced
    both = optax.chain(optax.adam(LR), optax.rmsprop(LR))
    feedback = PGN(b2=0.999, eps=1e-8, eps_in_sqrt=True)
    _build(both, feedback)
    state, _, _ = _train(both, params, batch, steps=1)
    with pytest.raises(ValueError, match=r"parameter \['b'\] is covered by 2 second moments"):
        _step_feedback(feedback, both, params, batch, state)


def test_an_adam_state_the_optimizer_does_not_show_needs_kind_adam():
    # inject_hyperparams of a factory of your own: its ScaleByAdamState could be Adamax's
    params, batch = _problem()
    optimizer = optax.inject_hyperparams(
        lambda learning_rate, b2: optax.adam(learning_rate, b2=b2, eps=1e-6)
    )(learning_rate=LR, b2=0.95)
    state, grad, update = _train(optimizer, params, batch)
    with pytest.raises(
        ValueError, match=re.escape("PreconditionedGradNorm(eps=1e-08, kind='adam')")
    ):
        _step_feedback(PGN(), optimizer, params, batch, state)
    feedback = PGN(eps=1e-6, kind="adam")  # b2 is read from the state
    np.testing.assert_allclose(
        _step_feedback(feedback, optimizer, params, batch, state),
        _reference(params, batch, state, grad, update, "momentum"),
        rtol=1e-4,
    )
    # without the optimizer, the standalone function cannot tell either
    state, _, _ = _train(optax.adam(LR), params, batch, steps=1)
    with pytest.raises(ValueError, match="optimizer=tx"):
        ab.feedback.preconditioned_grad_norms(_loss, params, batch, state, b2=0.999, eps=1e-8)
    ab.feedback.preconditioned_grad_norms(
        _loss, params, batch, state, b2=0.999, eps=1e-8, kind="adam"
    )


def test_inspect_optimizer_sees_through_the_combinators():
    adam = optax.adam(LR, b2=0.95, eps=1e-6)
    for optimizer in (
        adam,
        optax.chain(optax.clip(1.0), adam),
        optax.masked(adam, {"w": True, "b": False}),
        optax.multi_transform({"a": adam, "s": optax.sgd(LR)}, {"w": "a", "b": "s"}),
        optax.apply_if_finite(adam, 3),
        optax.MultiSteps(adam, 2).gradient_transformation(),
        optax.MultiSteps(adam, 2),
    ):
        facts = preconditioner.inspect_optimizer(optimizer)
        assert facts.unidentified == ()
        (transform,) = facts.transforms
        assert transform.name == "optax.scale_by_adam" and transform.kind == "adam"
        assert transform.built_with == {"b2": 0.95, "eps": 1e-6, "eps_root": 0.0}
    injected = preconditioner.inspect_optimizer(
        optax.inject_hyperparams(optax.rmsprop)(learning_rate=LR, eps_in_sqrt=False)
    )
    (transform,) = injected.transforms
    assert transform.kind == "rmsprop" and transform.built_with["eps_in_sqrt"] is False
    assert transform.injected == {"b2", "eps"}  # numeric: in the state; bools are static
    assert preconditioner.inspect_optimizer(optax.sgd(LR)) == ((), ())


def test_a_masked_out_parameter_enters_unscaled():
    params, batch = _problem()
    optimizer = optax.masked(optax.adam(LR), {"w": True, "b": False})
    state, grad, update = _train(optimizer, params, batch)
    m_hat = _momentum_hat(state)
    grads = _grads64(params, batch)
    p_w = -np.asarray(update["w"], np.float64) / (LR * m_hat["w"])
    expected = np.sqrt(
        np.sum((grads["w"] * p_w).reshape(K, -1) ** 2, axis=1) + np.sum(grads["b"] ** 2, axis=1)
    )
    np.testing.assert_allclose(
        _step_feedback(PGN(b2=0.999, eps=1e-8), optimizer, params, batch, state),
        expected,
        rtol=1e-4,
    )


def test_before_the_first_update_it_is_the_plain_gradient_norm():
    params, batch = _problem()
    grads = _grads64(params, batch)
    plain = np.sqrt(sum(np.sum(g.reshape(K, -1) ** 2, axis=1) for g in grads.values()))
    for optimizer, feedback in (
        (optax.adam(LR), PGN(b2=0.999, eps=1e-8)),
        (optax.rmsprop(LR), PGN(eps=1e-8, eps_in_sqrt=True)),
    ):
        got = _step_feedback(feedback, optimizer, params, batch, optimizer.init(params))
        np.testing.assert_allclose(got, plain, rtol=1e-5)


def test_an_optimizer_without_a_second_moment_is_refused():
    params, batch = _problem()
    for optimizer in (optax.sgd(LR), optax.sgd(LR, momentum=0.9)):
        with pytest.raises(ValueError, match="needs an optimizer with a second-moment"):
            _step_feedback(PGN(), optimizer, params, batch, optimizer.init(params))
    assert preconditioner.second_moments(optax.sgd(LR).init(params)) == []
