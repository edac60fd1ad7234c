"""Writes data.npz beside this file: noisy 1x8x8 images of four bar patterns (x_train, y_train, x_test, y_test).

    python make_data.py [OUT.npz]
"""
import sys
from pathlib import Path

import numpy as np


def make(n_train=2000, n_test=500, seed=0):
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    y = rng.integers(0, 4, n)
    x = rng.normal(0.0, 0.65, (n, 1, 8, 8)).astype(np.float32)
    pos = rng.integers(1, 7, n)
    for i in range(n):  # class 0/1: a horizontal/vertical bar; 2/3: a diagonal/anti-diagonal
        if y[i] == 0:
            x[i, 0, pos[i], :] += 1.5
        elif y[i] == 1:
            x[i, 0, :, pos[i]] += 1.5
        elif y[i] == 2:
            x[i, 0] += 1.5 * np.eye(8, k=pos[i] - 4)
        else:
            x[i, 0] += 1.5 * np.fliplr(np.eye(8, k=pos[i] - 4))
    return {"x_train": x[:n_train], "y_train": y[:n_train], "x_test": x[n_train:], "y_test": y[n_train:]}


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("data.npz")
    np.savez_compressed(out, **make())
    print(out)
