"""The domain-mixing experiment's plumbing, on a few steps of tiny domains."""

import json

import numpy as np

from experiments import domain_mixing


def test_a_tiny_run_writes_q_the_summary_and_the_plot(tmp_path):
    sizes = (40, 20, 10, 5)
    results = [
        domain_mixing.run(method, 0, num_steps=6, record_every=3, sizes=sizes)
        for method in ("uniform", "exp3")
    ]
    for result in results:
        assert result["steps"] == [0, 3, 6]
        q = np.asarray(result["q"])
        assert q.shape == (3, 4) and np.allclose(q.sum(1), 1.0, atol=1e-5)
        assert len(result["test_mse"]) == 4 and all(np.isfinite(result["test_mse"]))
    np.testing.assert_allclose(results[0]["q"][0], np.asarray(sizes) / sum(sizes))
    summary = domain_mixing.summarize(results, sizes)
    assert set(summary) == {"uniform", "exp3"}
    json.dumps(summary)
    domain_mixing.plot(results, str(tmp_path / "q.png"), sizes)
    assert (tmp_path / "q.png").stat().st_size > 1000
