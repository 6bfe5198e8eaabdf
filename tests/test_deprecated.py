"""Tests of adambs_jax._deprecated: every old import path still works for one release, warns
with a DeprecationWarning that names the new home, and gives the very object of the new one."""

import importlib
import subprocess
import sys
import warnings

import pytest

import adambs_jax as ab
from adambs_jax import _deprecated

# The __all__ of every module of the last release before the reorganisation (0.1.0).
OLD_EXPORTS = {
    "adambs_jax.adam_impt": [
        "AdamImptConfig",
        "AdamImptState",
        "UNIFORM_PHASE_SCORES",
        "adam_impt_config",
        "adam_impt_sampler",
        "importance_draw",
        "init",
        "moving_average",
        "sample",
        "scored_presample",
        "uniform_draw",
        "update",
        "variance_reduction",
    ],
    "adambs_jax.base": [
        "AnySampler",
        "InitFn",
        "ProbabilitiesFn",
        "RenormalizeFn",
        "SampleFn",
        "Sampler",
        "SamplerState",
        "ScoreFn",
        "ScoringSampleFn",
        "ScoringSampler",
        "UpdateFn",
        "accepts_apply",
    ],
    "adambs_jax.baselines": [
        "AdamImptState",
        "GradientNormSamplerState",
        "UNIFORM_PHASE_SCORES",
        "adam_impt_sampler",
        "gradient_norm_sampler",
        "resample_proportional",
        "variance_reduction",
    ],
    "adambs_jax.checkpoint": [
        "CHECKPOINT_FORMAT",
        "CheckpointManager",
        "describe_state",
        "read_checkpoint_metadata",
        "restore_checkpoint",
        "save_checkpoint",
    ],
    "adambs_jax.checkpoint_metadata": [
        "CHECKPOINT_FORMAT",
        "NEW_SAMPLER_FIELDS",
        "check_train_state",
        "describe_state",
        "exp3_states",
        "exp3_tree_paths",
        "is_exp3_state",
        "metadata_differences",
        "raw_keys",
        "rewrap_keys",
        "verify_metadata",
    ],
    "adambs_jax.checkpoint_restore": ["finish_restore", "restore_target"],
    "adambs_jax.checkpoint_storage": [
        "LOCK_SUFFIX",
        "METADATA_ITEM",
        "STATE_ITEM",
        "damaged_checkpoint_errors",
        "exclusive_save_lock",
        "metadata_restore_args",
        "open_checkpointer",
        "save_args",
        "state_restore_args",
        "write_atomically",
    ],
    "adambs_jax.checks": [
        "check_bool",
        "check_int",
        "check_key",
        "check_number",
        "check_optional_int",
        "check_per_draw",
        "check_state_size",
        "is_prng_key",
    ],
    "adambs_jax.estimators": [
        "Estimate",
        "EstimateFn",
        "OptimizerAwareEstimator",
        "estimate_with_forced_ghost_norms",
        "estimate_with_ghost_norms",
        "estimate_with_logit_bound",
        "estimate_with_loss",
        "estimate_with_per_example_grads",
        "estimate_with_preconditioned_norms",
        "estimate_with_vmap_norms",
        "estimator_with_user_feedback",
        "importance_weighted_grad",
    ],
    "adambs_jax.exp3": [
        "BOUND_MODES",
        "CleanFeedback",
        "DEFAULT_BOUND_LEARNING_RATE",
        "DEFAULT_BOUND_QUANTILE",
        "Exp3Config",
        "Exp3SamplerState",
        "INITIAL_LOG_ROOT",
        "LEAF_FLOOR_LOG",
        "MIN_RENORMALIZATION_BUDGET",
        "MergedDraws",
        "bound_for_update",
        "check_state",
        "check_state_finite",
        "clean_feedback",
        "clip_ratio",
        "clip_to_bound",
        "clipped_fraction",
        "count_dropped",
        "default_step_size",
        "distribution",
        "exp3_config",
        "init",
        "merge_duplicate_draws",
        "project_and_write",
        "quantile_bound",
        "renormalization_period",
        "renormalize",
        "sample",
        "shifted_loss_estimate",
        "tree_layout",
        "update",
    ],
    "adambs_jax.exp3_bound": ["clip_ratio", "clip_to_bound", "clipped_fraction", "quantile_bound"],
    "adambs_jax.exp3_config": [
        "BOUND_MODES",
        "DEFAULT_BOUND_LEARNING_RATE",
        "DEFAULT_BOUND_QUANTILE",
        "EXP3_PRESETS",
        "Exp3Config",
        "INITIAL_LOG_ROOT",
        "LEAF_FLOOR_LOG",
        "MIN_RENORMALIZATION_BUDGET",
        "default_step_size",
        "exp3_config",
        "preset_options",
        "renormalization_period",
        "tree_layout",
    ],
    "adambs_jax.exp3_health": ["check_state_finite"],
    "adambs_jax.feedback": [
        "FEEDBACK_KINDS",
        "FEEDBACK_REGISTRY",
        "FeedbackFn",
        "FeedbackKind",
        "batch_size_of",
        "check_feedback_kind",
        "feedback_function",
        "feedback_kind",
        "logit_grad_norms",
        "losses_and_output_grads",
        "per_example_grad_norms",
        "per_example_losses",
        "per_example_losses_and_grads",
        "preconditioned_grad_norms",
        "tree_norms",
    ],
    "adambs_jax.ghost": [
        "GhostCoverage",
        "METHODS",
        "ghost_coverage",
        "ghost_losses_grad_and_norms",
        "per_example_grad_norms",
    ],
    "adambs_jax.ghost.api": [
        "GhostCoverage",
        "METHODS",
        "ghost_coverage",
        "ghost_losses_grad_and_norms",
        "per_example_grad_norms",
    ],
    "adambs_jax.ghost.layer_norms": [
        "conv_patches",
        "embed_sq_norms",
        "embed_sq_norms_and_sum",
        "matmul_sq_norms",
        "matmul_sq_norms_and_sum",
        "norm_dtype",
        "sum_sq_norms",
        "sum_sq_norms_and_sum",
        "use_ghost_form",
    ],
    "adambs_jax.ghost.linen": ["LINEN_NORMALIZATION_LAYERS", "LINEN_RULES", "interception"],
    "adambs_jax.ghost.nnx": ["NNX_NORMALIZATION_LAYERS", "NNX_RULES", "interception"],
    "adambs_jax.ghost.rules": [
        "conv_config",
        "conv_config_of",
        "conv_factors",
        "dense_factors",
        "embed_factors",
    ],
    "adambs_jax.ghost.sites": [
        "Factor",
        "GhostPlan",
        "LayerRule",
        "Perturber",
        "Recorder",
        "Site",
        "Skipper",
        "build_plan",
        "current_trace",
        "outside_reads",
        "site_norms_and_grads",
    ],
    "adambs_jax.gradient_norm": [
        "GradientNormConfig",
        "GradientNormSamplerState",
        "distribution",
        "floored_distribution",
        "gradient_norm_config",
        "gradient_norm_sampler",
        "init",
        "sample",
        "update",
    ],
    "adambs_jax.grain_source": [
        "ArrayRecordSource",
        "LAYOUT_FORMAT",
        "record_dtype",
        "shard_paths",
        "write_array_record",
    ],
    "adambs_jax.groups": [
        "BASE_SAMPLERS",
        "GroupConfig",
        "GroupSamplerState",
        "drawn_groups",
        "expand_groups",
        "group_config",
        "group_feedback",
        "group_sampler",
        "state_distribution",
    ],
    "adambs_jax.host_loop": ["HostLoader", "LoadedBatch", "process_rows", "run_host_loop"],
    "adambs_jax.host_step": [
        "Draws",
        "HostTrainStep",
        "draw_from",
        "make_host_train_step",
        "run_host_step",
    ],
    "adambs_jax.infobatch": [
        "InfobatchConfig",
        "InfobatchSamplerState",
        "check_state",
        "distribution",
        "epoch_probabilities",
        "infobatch_config",
        "infobatch_sampler",
        "init",
        "new_epoch",
        "sample",
        "update",
    ],
    "adambs_jax.jsonable": ["to_jsonable"],
    "adambs_jax.losses": [
        "KEY_NAMES",
        "ModelLoss",
        "PerExampleLoss",
        "check_losses",
        "takes_key",
        "with_explicit_key",
        "with_key_argument",
    ],
    "adambs_jax.model_state": ["LossParts", "check_model_state_options", "loss_parts"],
    "adambs_jax.per_example": [
        "losses_and_output_grads",
        "per_example_losses",
        "per_example_losses_and_grads",
    ],
    "adambs_jax.preconditioner": [
        "DEFAULT_B2",
        "DEFAULT_EPS",
        "DEFAULT_RMS_DECAY",
        "SecondMoment",
        "inverse_preconditioner",
        "preconditioned_norms",
        "second_moments",
    ],
    "adambs_jax.priority": [
        "MAX_PRIORITY",
        "MIN_PRIORITY",
        "PriorityConfig",
        "PrioritySamplerState",
        "check_state",
        "distribution",
        "init",
        "max_priority",
        "mixture_probabilities",
        "priorities",
        "priority_config",
        "priority_sampler",
        "refresh",
        "sample",
        "state_distribution",
        "update",
    ],
    "adambs_jax.projection": ["ProjectionResult", "project_onto_floored_simplex"],
    "adambs_jax.samplers": [
        "Exp3SamplerState",
        "Sampler",
        "UniformSamplerState",
        "default_step_size",
        "exp3_sampler",
        "importance_weights",
        "probabilities",
        "uniform_sampler",
    ],
    "adambs_jax.scored_draws": [
        "check_score_feedback",
        "draw_proportional",
        "normalized_scores",
        "resample_proportional",
        "scores_of",
        "valid_scores",
    ],
    "adambs_jax.scoring": ["ScoreFn", "ScoringSampler", "gather", "make_score_fn"],
    "adambs_jax.sources": [
        "ArraySource",
        "DataSource",
        "MANIFEST_FORMAT",
        "MANIFEST_NAME",
        "MemmapSource",
        "check_read_indices",
        "check_source",
        "file_digest",
        "open_memmap_dataset",
        "write_memmap_dataset",
    ],
    "adambs_jax.step_stages": [
        "Applied",
        "Draw",
        "StepConfig",
        "check_train_state",
        "draw_batch",
        "draw_weights",
        "guarded_apply",
        "learn_from_draw",
        "next_state",
        "place_batch",
        "run_step",
        "step_key",
        "step_metrics",
    ],
    "adambs_jax.sumtree": [
        "MAX_TREE_SIZE",
        "TreeLayout",
        "build",
        "dedupe_last",
        "default_arity",
        "draw",
        "get_leaves",
        "layout_for",
        "leaf_values",
        "max_leaves",
        "set_leaves",
        "sum_children",
        "total",
        "uniforms_to_targets",
    ],
    "adambs_jax.train_loop": ["run_steps", "split_keys"],
    "adambs_jax.train_state": [
        "TrainState",
        "TrainStep",
        "as_gradient_transformation",
        "count_renormalization_steps",
        "renormalize_if_due",
    ],
    "adambs_jax.train_step": [
        "FULL_DIAGNOSTICS_MAX_EXAMPLES",
        "TrainState",
        "TrainStep",
        "check_key",
        "make_train_step",
        "renormalize_fn",
        "step_config",
    ],
    "adambs_jax.tree_utils": [
        "all_finite",
        "batch_size_of",
        "gather",
        "per_example_norms",
        "select",
    ],
    "adambs_jax.uniform": [
        "UniformConfig",
        "UniformSamplerState",
        "distribution",
        "init",
        "sample",
        "uniform_config",
        "update",
    ],
}


@pytest.mark.parametrize("old", sorted(_deprecated.OLD_MODULES))
def test_an_old_module_warns_and_forwards(old):
    holders, home = _deprecated.OLD_MODULES[old]
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} is deprecated.*use {home}"):
        module = importlib.import_module(old)
    target = importlib.import_module(holders.split(",")[0])
    name = next(n for n in getattr(target, "__all__", dir(target)) if not n.startswith("_"))
    assert getattr(module, name) is getattr(target, name)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_every_public_name_of_the_old_modules_still_resolves():
    """The names each old module exported (its __all__ at the last release before the
    reorganisation) resolve through its old path, except the ones CHANGELOG.md lists as
    removed."""
    removed = {
        ("adambs_jax.feedback", "FEEDBACK_REGISTRY"),
        ("adambs_jax.feedback", "FeedbackKind"),
        ("adambs_jax.feedback", "feedback_kind"),
        ("adambs_jax.feedback", "check_feedback_kind"),
        ("adambs_jax.losses", "with_explicit_key"),
        ("adambs_jax.train_step", "step_config"),
        ("adambs_jax.checkpoint_metadata", "NEW_SAMPLER_FIELDS"),
        ("adambs_jax.checkpoint_metadata", "is_exp3_state"),
        ("adambs_jax.checkpoint_metadata", "exp3_states"),
        ("adambs_jax.checkpoint_metadata", "exp3_tree_paths"),
        ("adambs_jax.train_state", "renormalize_if_due"),
        ("adambs_jax.train_state", "count_renormalization_steps"),
    }
    missing = []
    for old, names in OLD_EXPORTS.items():
        module = importlib.import_module(old)
        missing += [(old, n) for n in names if (old, n) not in removed and not hasattr(module, n)]
    assert not missing, missing


def test_from_an_old_module_import_a_name():
    sys.modules.pop("adambs_jax.train_step", None)
    with pytest.warns(DeprecationWarning, match="adambs_jax.train_step"):
        from adambs_jax.train_step import make_train_step  # noqa: PLC0415
    assert make_train_step is ab.make_train_step


def test_an_old_module_as_an_attribute_of_the_face():
    sys.modules.pop("adambs_jax.sumtree", None)
    vars(ab).pop("sumtree", None)  # an earlier import set it on the package
    with pytest.warns(DeprecationWarning, match="adambs_jax.sumtree"):
        max_leaves = ab.sumtree.max_leaves
    assert max_leaves is ab.samplers.max_leaves


@pytest.mark.parametrize(
    "name, home",
    [("probabilities", ab.samplers), ("FEEDBACK_KINDS", ab.feedback), ("Draws", ab.host)],
)
def test_a_name_the_face_no_longer_exports_warns_and_forwards(name, home):
    with pytest.warns(DeprecationWarning, match=f"adambs_jax.{name} is deprecated"):
        obj = getattr(ab, name)
    assert obj is getattr(home, name)


def test_the_old_step_keywords_warn():
    import optax  # noqa: PLC0415

    loss = lambda params, batch: batch["x"] @ params  # noqa: E731
    sampler = ab.uniform_sampler(8, 4)
    for keyword, value in [
        ("has_aux", False),
        ("model_state", False),
        ("loss_takes_key", False),
        ("grad_norm_method", "vmap"),
        ("reuse_per_example_grads", False),
    ]:
        with pytest.warns(DeprecationWarning, match=f"{keyword}= is deprecated"):
            ab.make_train_step(loss, optax.sgd(0.1), sampler, **{keyword: value})


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        ab.no_such_name  # noqa: B018
    with pytest.raises(ImportError):
        importlib.import_module("adambs_jax.no_such_module")


@pytest.mark.slow  # a subprocess
def test_importing_the_package_warns_nothing():
    code = "import warnings; warnings.simplefilter('error'); import adambs_jax"
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_the_new_paths_warn_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ab.__all__:
            getattr(ab, name)
