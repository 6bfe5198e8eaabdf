"""Experiment harness for ``adambs_jax`` (datasets, models, runners, benchmarks).

The library ``adambs_jax`` never imports from this package; experiments may import the
library. ``python -m experiments NAME`` runs a configuration; its rooms, in the order a run
goes through them: ``configs`` and ``methods`` (what to run; ``lookup`` for their names),
``runner`` (orchestration: ``run_experiment``), ``run_setup`` (what every method of a run
shares), ``tasks`` (losses and evaluation), ``method_run`` and ``chunks`` (one method's
compiled, timed chunks of steps), ``diagnostics`` (what a sampler learned), ``reports``,
``aggregate`` and ``plotting`` (the outputs), ``machine`` (where it ran);
``compute_matched`` and ``budget_report`` (``--budget-seconds``: every method the same
wall-clock budget) and ``results_table`` (the tables of several runs). The benchmarks
(``bench_*``) share ``bench_harness`` and ``step_timing``.
"""
