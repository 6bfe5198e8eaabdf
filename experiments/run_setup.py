"""What every method of a run shares, built once from the configuration: the data on device,
the model's loss, each seed's initial parameters and training key, the chunk plan, the
compiled evaluation (with its result at step 0) and the gradient-norm probe of the sampler
diagnostics."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import adambs_jax as ab
from experiments.chunks import choose_loop, chunk_plan, eval_points, fixed_chunk_plan
from experiments.configs import ExperimentConfig
from experiments.diagnostics import GradNormProbe
from experiments.tasks import make_evaluator, make_model_loss, make_stack_evaluator


@dataclasses.dataclass
class Setup:
    """Everything the methods of a run share (built once by :func:`prepare`)."""

    config: ExperimentConfig
    dataset: Any
    num_steps: int
    loss: ab.ModelLoss
    data: dict
    initial_params: dict  # seed -> params (the same for every method)
    loop: str  # "scan" or "python"
    plan: list  # [(interval, count)] per chunk
    steps_at: list  # evaluation steps, 0 first
    eval_sets: dict  # split -> (x, y) on device
    evaluate_stack: Callable
    initial_eval: dict  # seed -> evaluation at step 0
    eval_compile_s: float
    grad_norm_probe: GradNormProbe | None = None  # None: no score diagnostics

    def with_num_steps(self, num_steps: int) -> Setup:
        """The same setup for runs of ``num_steps`` steps, cut into chunks of one fixed shape
        (``experiments.chunks.fixed_chunk_plan``: the compute-matched protocol's); its own
        evaluation points, everything else shared."""
        plan = fixed_chunk_plan(
            num_steps,
            self.config.eval_every,
            self.config.chunk_steps if self.loop == "scan" else self.config.eval_every,
        )
        return dataclasses.replace(
            self, num_steps=int(num_steps), plan=plan, steps_at=eval_points(plan)
        )

    @property
    def seeds(self) -> list[int]:
        return list(range(self.config.num_seeds))

    def train_key(self, seed: int) -> jax.Array:
        return jax.random.split(jax.random.key(seed))[1]

    def evaluate_all(self, params_stack) -> dict:
        """``{train,test}_{loss,error}``: numpy arrays, one entry per parameter snapshot."""
        out = {}
        for split, (x, y) in self.eval_sets.items():
            losses, errors = jax.device_get(self.evaluate_stack(params_stack, x, y))
            out[f"{split}_loss"], out[f"{split}_error"] = losses, errors
        return out


def initial_parameters(config: ExperimentConfig, model, example) -> dict:
    """``seed -> params``: the same initialization for every method of a seed."""
    from experiments.models import init_params

    initial_params = {}
    for seed in range(config.num_seeds):
        init_key, _ = jax.random.split(jax.random.key(seed))
        initial_params[seed] = init_params(model, init_key, example)
    return initial_params


def evaluation_sets(config: ExperimentConfig, dataset) -> dict:
    """``split -> (x, y)`` on device: the (first ``eval_train_examples``) training examples
    and the test set, without all-zero feature vectors if ``eval_informative_only``; with
    flipped training labels (``metadata["clean_y_train"]``) also ``"clean"``: the same
    training examples with their clean labels (the curves ``clean_loss``, ``clean_error``)."""
    n = dataset.num_train
    num_eval_train = n if config.eval_train_examples is None else min(n, config.eval_train_examples)
    eval_sets = {
        "train": (dataset.x_train[:num_eval_train], dataset.y_train[:num_eval_train]),
        "test": (dataset.x_test, dataset.y_test),
    }
    if "clean_y_train" in dataset.metadata:
        clean = dataset.metadata["clean_y_train"][:num_eval_train]
        eval_sets["clean"] = (dataset.x_train[:num_eval_train], clean)
    if config.eval_informative_only:  # drop all-zero feature vectors (constant loss)
        eval_sets = {
            split: (x[keep], y[keep])
            for split, (x, y) in eval_sets.items()
            for keep in [np.any(x.reshape(len(x), -1) != 0, axis=1)]
        }
    return {split: (jnp.asarray(x), jnp.asarray(y)) for split, (x, y) in eval_sets.items()}


def prepare(config: ExperimentConfig, data_dir=None) -> Setup:
    """Loads the data, builds the model and loss, the initial parameters of every seed,
    the chunk plan and the (compiled) evaluation."""
    from experiments.data import load_dataset
    from experiments.models import get_model

    dataset = load_dataset(
        config.dataset,
        data_dir=data_dir,
        subset=config.subset,
        seed=config.dataset_seed,
        **dict(config.dataset_options),
    )
    num_steps = config.steps_for(dataset.num_train)
    model = get_model(config.model, dataset.num_classes, **dict(config.model_options))
    loss = make_model_loss(model, dataset.task)
    data = {"x": jnp.asarray(dataset.x_train), "y": jnp.asarray(dataset.y_train)}
    initial_params = initial_parameters(config, model, jnp.asarray(dataset.x_train[:2]))
    loop = choose_loop(
        config.loop, loss, initial_params[0], jax.tree.map(lambda leaf: leaf[:2], data)
    )
    # python loop: one chunk per evaluation interval (its parameters are evaluated between)
    plan = chunk_plan(
        num_steps, config.eval_every, config.chunk_steps if loop == "scan" else config.eval_every
    )
    evaluate_stack = make_stack_evaluator(
        make_evaluator(model, dataset.task, config.eval_batch_size)
    )
    setup = Setup(
        config=config,
        dataset=dataset,
        num_steps=num_steps,
        loss=loss,
        data=data,
        initial_params=initial_params,
        loop=loop,
        plan=plan,
        steps_at=eval_points(plan),
        eval_sets=evaluation_sets(config, dataset),
        evaluate_stack=evaluate_stack,
        initial_eval={},
        eval_compile_s=0.0,
        grad_norm_probe=(
            GradNormProbe(loss, data, dataset.num_train, config.diagnostic_examples)
            if config.diagnostic_examples
            else None
        ),
    )
    started = time.perf_counter()  # the first evaluation compiles it
    setup.initial_eval = {
        seed: setup.evaluate_all(jax.tree.map(lambda leaf: leaf[None], params))
        for seed, params in initial_params.items()
    }
    setup.eval_compile_s = time.perf_counter() - started
    return setup
