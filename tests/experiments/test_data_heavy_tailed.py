"""Tests for experiments.data.heavy_tailed: the AdamBS §4.3 synthetic set."""

from __future__ import annotations

import numpy as np
import pytest

from experiments.data import load_dataset
from experiments.data.heavy_tailed import activation_probabilities, generate_heavy_tailed


def test_heavy_tailed_activation_frequencies_match_the_law():
    """Aggregate |z_ji| = 1 counts over many independent draws and compare with
    beta * i^-gamma * j^-gamma (binomial z-scores per cell and for the tail)."""
    n, d, beta, gamma, draws = 12, 8, 0.8, 2.0, 400
    counts = np.zeros((n, d))
    signs_positive = signs_total = 0
    for seed in range(draws):
        z = generate_heavy_tailed(n, d, beta=beta, gamma=gamma, num_test=1, seed=seed)["z_train"]
        assert set(np.unique(z)) <= {-1, 0, 1}
        counts += np.abs(z)
        signs_positive += int((z == 1).sum())
        signs_total += int((z != 0).sum())
    probs = activation_probabilities(n, d, beta, gamma)
    # Cells with enough expected hits: per-cell binomial z-test.
    big = probs * draws >= 20
    assert big.sum() >= 8
    z_cells = (counts[big] - draws * probs[big]) / np.sqrt(draws * probs[big] * (1 - probs[big]))
    assert np.all(np.abs(z_cells) < 5), z_cells
    # Remaining sparse cells, aggregated: total count vs its expectation.
    expected_tail = draws * probs[~big].sum()
    tail_sd = np.sqrt(draws * (probs[~big] * (1 - probs[~big])).sum())
    assert abs(counts[~big].sum() - expected_tail) < 5 * tail_sd
    # Decay in j: first example is active far more often than the last.
    assert counts[0].sum() > 10 * counts[-1].sum()
    # Signs are fair coins.
    assert abs(signs_positive / signs_total - 0.5) < 5 * 0.5 / np.sqrt(signs_total)


def test_heavy_tailed_labels_follow_the_true_neuron():
    raw = generate_heavy_tailed(500, 20, gamma=0.5, seed=3)  # denser than gamma=2
    assert set(np.unique(raw["y_train"])) <= {-1, 1}
    scores = raw["z_train"].astype(float) @ raw["true_weights"]
    nonzero = scores != 0
    assert nonzero.sum() > 5
    np.testing.assert_array_equal(raw["y_train"][nonzero], np.sign(scores[nonzero]))


def test_heavy_tailed_dataset_binary_labels():
    data = load_dataset("heavy-tailed", num_examples=200, num_features=10, seed=1)
    assert data.task == "binary" and data.num_classes == 2
    assert data.x_train.shape == (200, 10) and data.x_test.shape == (50, 10)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int32
    assert set(np.unique(data.y_train)) <= {0, 1}
    pm1 = data.metadata["y_train_pm1"]
    assert set(np.unique(pm1)) <= {-1, 1}
    np.testing.assert_array_equal(data.y_train, (pm1 + 1) // 2)
    again = load_dataset("heavy-tailed", num_examples=200, num_features=10, seed=1)
    np.testing.assert_array_equal(again.x_train, data.x_train)
    with pytest.raises(ValueError):
        load_dataset("heavy-tailed", beta=1.5)
