"""Experiment harness for ``adambs_jax`` (datasets, models, runners).

The library ``adambs_jax`` never imports from this package; experiments may
import the library.
"""
