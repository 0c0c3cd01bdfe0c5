#!/usr/bin/env python3
"""Trains the example continuum's anomaly models and writes them as ONNX files.

    pip install numpy onnx        # once
    python3 configs/models/train.py [--out configs/models]

Writes `fog.onnx` (small: a 24-reading window, one hidden layer of 24) and `cloud.onnx`
(larger: a 64-reading window, two hidden layers of 128), both trained on readings drawn from
the same distribution as the `sensor` actor's generator (see actors/src/sensor.rs): a
sine plus drift plus Gaussian noise, with spikes (`anomaly_rate`, `anomaly_size`) and level
shifts (`shift_rate`, `shift_len`, `shift_size`). The seeds are fixed: running it again
writes the same files.

The models' input contract (implemented by `strata_actors::inference::normalise`):
`window` is float32 [1, K], the last K readings with the one being scored last, minus the
median of the K readings, divided by the window's noise scale (median absolute difference
of consecutive readings / 0.9539, at least 1e-6 * (1 + |median|)), clamped to [-50, 50].
The output `p_anomaly` [1, 1] is the probability that the last reading is an anomaly.
"""

import argparse
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# The generator's defaults (actors/src/sensor.rs).
BASE, AMPLITUDE, PERIOD_S, NOISE = 20.0, 2.0, 60.0, 0.5
ANOMALY_RATE, ANOMALY_SIZE = 0.01, 8.0
SHIFT_RATE, SHIFT_LEN, SHIFT_SIZE = 0.002, 10, 2.5
CLAMP = 50.0


def series(rng, n, rate_hz):
    """n readings and their labels, drawn like the sensor actor draws them."""
    t = np.arange(n) / rate_hz
    drift = rng.uniform(-0.01, 0.01)
    value = BASE + AMPLITUDE * np.sin(2 * np.pi * t / PERIOD_S) + drift * t + NOISE * rng.standard_normal(n)
    label = np.zeros(n, dtype=bool)
    spikes = rng.random(n) < ANOMALY_RATE
    value += spikes * ANOMALY_SIZE * NOISE * rng.choice([-1.0, 1.0], n)
    label |= spikes
    for start in np.flatnonzero(rng.random(n) < SHIFT_RATE):
        end = min(n, start + SHIFT_LEN)
        value[start:end] += SHIFT_SIZE * NOISE * rng.choice([-1.0, 1.0])
        label[start:end] = True
    return value, label


def normalise(windows):
    """The input contract above, for a batch of windows [N, K]."""
    med = np.median(windows, axis=1, keepdims=True)
    diffs = np.abs(np.diff(windows, axis=1))
    scale = np.median(diffs, axis=1, keepdims=True) / 0.9539
    scale = np.maximum(scale, 1e-6 * (1.0 + np.abs(med)))
    return np.clip((windows - med) / scale, -CLAMP, CLAMP).astype(np.float32)


def dataset(seed, k, runs=60, n=5_000):
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for r in range(runs):
        rate = [10.0, 50.0, 100.0, 1000.0][r % 4]
        value, label = series(rng, n, rate)
        windows = np.lib.stride_tricks.sliding_window_view(value, k)
        xs.append(normalise(windows))
        ys.append(label[k - 1:])
    return np.concatenate(xs), np.concatenate(ys).astype(np.float32)


def train(x, y, hidden, seed, epochs, lr=3e-3, batch=1024):
    """A small MLP (ReLU, sigmoid output) trained with Adam on weighted cross-entropy."""
    rng = np.random.default_rng(seed)
    sizes = [x.shape[1], *hidden, 1]
    params = []
    for a, b in zip(sizes, sizes[1:]):
        params += [rng.standard_normal((a, b)).astype(np.float32) * np.sqrt(2.0 / a), np.zeros(b, np.float32)]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    pos_weight = 2.0  # anomalies are ~3% of readings: weight them up
    step = 0
    for epoch in range(epochs):
        order = rng.permutation(len(x))
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            xb, yb = x[idx], y[idx][:, None]
            acts = [xb]
            for j in range(0, len(params) - 2, 2):
                acts.append(np.maximum(acts[-1] @ params[j] + params[j + 1], 0.0))
            logit = acts[-1] @ params[-2] + params[-1]
            p = 1.0 / (1.0 + np.exp(-np.clip(logit, -30, 30)))
            w = np.where(yb > 0, pos_weight, 1.0)
            grad = w * (p - yb) / len(xb)
            grads = [None] * len(params)
            for j in range(len(params) - 2, -1, -2):
                grads[j] = acts[j // 2].T @ grad
                grads[j + 1] = grad.sum(axis=0)
                if j > 0:
                    grad = (grad @ params[j].T) * (acts[j // 2] > 0)
            step += 1
            for j, g in enumerate(grads):
                m[j] = 0.9 * m[j] + 0.1 * g
                v[j] = 0.999 * v[j] + 0.001 * g * g
                mh, vh = m[j] / (1 - 0.9 ** step), v[j] / (1 - 0.999 ** step)
                params[j] -= lr * mh / (np.sqrt(vh) + 1e-8)
        lr *= 0.8
    return params


def predict(params, x):
    a = x
    for j in range(0, len(params) - 2, 2):
        a = np.maximum(a @ params[j] + params[j + 1], 0.0)
    return 1.0 / (1.0 + np.exp(-np.clip(a @ params[-2] + params[-1], -30, 30)))[:, 0]


def to_onnx(params, k, name, path):
    nodes, inits, prev = [], [], "window"
    layers = len(params) // 2
    for l in range(layers):
        w, b = f"w{l}", f"b{l}"
        inits += [numpy_helper.from_array(params[2 * l].astype(np.float32), w),
                  numpy_helper.from_array(params[2 * l + 1].astype(np.float32), b)]
        nodes.append(helper.make_node("MatMul", [prev, w], [f"mm{l}"]))
        nodes.append(helper.make_node("Add", [f"mm{l}", b], [f"z{l}"]))
        if l < layers - 1:
            nodes.append(helper.make_node("Relu", [f"z{l}"], [f"h{l}"]))
            prev = f"h{l}"
    nodes.append(helper.make_node("Sigmoid", [f"z{layers - 1}"], ["p_anomaly"]))
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("window", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("p_anomaly", TensorProto.FLOAT, [1, 1])],
        inits)
    model = helper.make_model(graph, producer_name="strata configs/models/train.py",
                              opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    args = ap.parse_args()
    for name, k, hidden, epochs in [("fog", 24, [24], 6), ("cloud", 64, [128, 128], 8)]:
        x, y = dataset(seed=1, k=k)
        params = train(x, y, hidden, seed=2, epochs=epochs)
        xv, yv = dataset(seed=3, k=k, runs=8)
        p = predict(params, xv) > 0.5
        tp, fp, fn = np.sum(p & (yv > 0)), np.sum(p & (yv == 0)), np.sum(~p & (yv > 0))
        path = os.path.join(args.out, f"{name}.onnx")
        to_onnx(params, k, f"strata-anomaly-{name}", path)
        print(f"{name}: window {k}, hidden {hidden}, {os.path.getsize(path)} bytes -> {path}; "
              f"validation recall {tp / (tp + fn):.3f} precision {tp / max(1, tp + fp):.3f}")


if __name__ == "__main__":
    main()
