"""Host-side health check of an ``Exp3SamplerState``: every number it draws from is finite.

Inside a jitted step nothing can raise: ``adambs_jax.exp3.update`` instead writes a leaf only
when it and its log-weight are finite (else the K old leaves are written back and the bound
is not moved), so a state that starts finite stays finite, whatever the feedback (NaN, inf,
1e30) or the step size. A state that is not finite can only come from outside: a damaged
or hand-edited checkpoint, or arrays set by hand. Then ``sample`` would return index 0 with
probability NaN and every later train step would be skipped, silently. ``check_state_finite``
finds that on the host (one device-to-host copy of the state, O(n)); ``restore_checkpoint``
runs it on every exp3 state it restores.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from adambs_jax.samplers import _sumtree as sumtree

__all__ = ["check_state_finite"]


def _host(value: Any) -> np.ndarray:
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        value = value.addressable_data(0)  # replicated over hosts: the local copy
    return np.asarray(value)


def _refuse(where: str, field: str, problem: str) -> None:
    raise ValueError(
        f"{where}: the exp3 sampler state's {field} {problem}; it cannot be sampled from "
        f"(a damaged checkpoint or arrays set by hand?). Restore an earlier checkpoint or "
        f"start the sampler afresh with sampler.init()"
    )


def check_state_finite(state: Any, where: str = "state") -> None:
    """Raises ValueError (naming ``where`` and the field) unless the exp3 state ``state`` has
    finite ``log_weights``, a finite ``tree`` with no negative node, positive leaves for the
    n examples and a positive finite root, and a finite ``grad_norm_bound`` >= 0.

    Host side (copies the state to the host, O(n)): call it outside ``jit``.
    """
    log_weights = _host(state.log_weights)
    if not np.all(np.isfinite(log_weights)):
        _refuse(where, "log_weights", f"has {np.sum(~np.isfinite(log_weights))} non-finite entries")
    tree = _host(state.tree)
    if not np.all(np.isfinite(tree)) or np.any(tree < 0):
        bad = np.sum(~np.isfinite(tree) | (tree < 0))
        _refuse(where, "tree", f"has {bad} non-finite or negative nodes")
    layout = sumtree.layout_for(state.num_examples, state.arity)
    root = float(tree[0]) if tree.size else 0.0
    if not root > 0:
        _refuse(where, "tree root", f"is {root} (must be > 0)")
    leaves = np.asarray(sumtree.leaf_values(tree, layout))
    if not np.all(leaves > 0):
        _refuse(where, "tree", f"has {np.sum(~(leaves > 0))} leaves <= 0 (every p_j >= p_min > 0)")
    bound = float(_host(state.grad_norm_bound))
    if not np.isfinite(bound) or bound < 0:
        _refuse(where, "grad_norm_bound", f"is {bound} (must be finite and >= 0)")
