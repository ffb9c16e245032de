"""Seeded synthetic data shared by several test modules."""
import numpy as np


def mixture(n, d, k, seed, centers_seed=0):
    """n points of a k-component Gaussian mixture in d dimensions (centres fixed by centers_seed)."""
    rng = np.random.default_rng(centers_seed)
    centers = rng.standard_normal((k, d)) * 3
    scales = rng.uniform(0.5, 1.5, (k, d))
    rng = np.random.default_rng(seed)
    labels = rng.integers(k, size=n)
    return centers[labels] + rng.standard_normal((n, d)) * scales[labels]
