"""Helpers shared by several test files (not tests themselves)."""

import inspect


def config_with_factory_defaults(factory, validator, num_examples, batch_size, **options):
    """``validator(num_examples, batch_size, ...)`` with the keyword-only defaults of the
    public ``factory`` (a sampler's validators have no defaults of their own), overridden by
    ``options``: the config that ``factory(num_examples, batch_size, **options)`` binds."""
    params = inspect.signature(factory).parameters.values()
    defaults = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}
    return validator(num_examples, batch_size, **{**defaults, **options})


def run_api_doc_example(marker):
    """Runs the one ```python block of docs/api.md that starts with the comment ``marker``."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if b.startswith(marker)]
    assert len(blocks) == 1, f"docs/api.md lost its example {marker!r}"
    exec(compile(blocks[0], f"api.md:{marker}", "exec"), {"__name__": "doc"})


def read_from_threads(source, draws):
    """``source.read(d)`` for every ``d`` of ``draws``, each in its own thread, started
    together (a data source must be safe to read from several loader threads)."""
    import threading

    results = [None] * len(draws)

    def read(i):
        results[i] = source.read(draws[i])

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(draws))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results
