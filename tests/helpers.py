"""Helpers shared by several test files (not tests themselves)."""

import inspect


def config_with_factory_defaults(factory, validator, num_examples, batch_size, **options):
    """``validator(num_examples, batch_size, ...)`` with the keyword-only defaults of the
    public ``factory`` (a sampler's validators have no defaults of their own), overridden by
    ``options``: the config that ``factory(num_examples, batch_size, **options)`` binds."""
    params = inspect.signature(factory).parameters.values()
    defaults = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}
    return validator(num_examples, batch_size, **{**defaults, **options})
