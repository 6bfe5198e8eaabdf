import sys, time, numpy as np, jax, jax.numpy as jnp
sys.path.insert(0, "/work/main")
import wide_sumtree as w
from adambs_jax import sumtree
dd = sumtree._dedupe_last
K = 128
def scan_time(step, tree, reps=3, N=200):
    f = jax.jit(lambda t, k: jax.lax.scan(lambda t, k: (step(t, k), None), t, jax.random.split(k, N))[0], donate_argnums=0)
    tree = f(tree, jax.random.key(0)); tree.block_until_ready()
    best = 1e9
    for r in range(reps):
        t0 = time.perf_counter(); tree = f(tree, jax.random.key(r)); tree.block_until_ready(); best = min(best, (time.perf_counter()-t0)/N)
    return best*1e6
for n in (1000, 10**5, 10**6, 10**7):
    row = [f"n={n:.0e}"]
    weights = jnp.ones((n,), jnp.float32)
    def bin_step(t, k):
        u = jax.random.uniform(k, (K,)) * sumtree.total(t)
        i = sumtree.draw(t, u)
        return sumtree.set_leaves(t, i, sumtree.get_leaves(t, i) * 0.99)
    row.append(f"bin {scan_time(bin_step, sumtree.build(weights)):.0f}")
    for B in (4, 8, 16, 32, 64):
        lay = w.layout_for(n, B)
        def st(t, k, lay=lay):
            u = jax.random.uniform(k, (K,)) * w.total(t)
            i = w.draw(t, u, lay)
            return w.set_leaves(t, i, w.get_leaves(t, i, lay) * 0.99, lay, dd)
        row.append(f"B{B} {scan_time(st, w.build(weights, B)):.0f}")
    print(" | ".join(row), flush=True)
