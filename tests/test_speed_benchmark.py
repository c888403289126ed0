"""The speed benchmark's prediction baseline does the engine's job, so its ratio compares like with like."""

from __future__ import annotations

import numpy as np

from fedmix_engine.device import plan_device
from fedmix_engine.fedmix.pair import init_pair
from fedmix_engine.model import ModelConfig
from fedmix_engine.predict import Predictor


def test_the_reference_style_prediction_gives_the_engines_probabilities(speed) -> None:
    tiny = ModelConfig(base_width=4)
    predictor = Predictor(init_pair(tiny, 0), tiny, 32, plan_device("cpu"))
    yy, xx = np.mgrid[0:96, 0:80]
    image = (127 + 100 * np.sin(yy / 9) * np.cos(xx / 7)).astype(np.uint8)  # smooth: resizers agree on it
    reference = speed.reference_style_predict(predictor.net1, image, 32, predictor.plan.device)
    engine = predictor.probabilities(image)[0]
    assert reference.shape == engine.shape == (96, 80)
    assert np.abs(reference - engine).mean() < 0.01
    assert np.abs(reference - engine).mean() < np.abs(reference - np.flipud(engine)).mean() / 5

    timings = speed.prediction_latency(tiny, 32, plan_device("cpu"), repeats=1, side=64, frames=3)
    assert {"engine", "forward", "reference", "stack", "per_frame"} <= set(timings)
    assert all(timings[k] > 0 for k in ("engine", "forward", "reference", "stack", "per_frame"))
