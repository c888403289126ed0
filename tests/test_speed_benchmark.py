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


def test_the_pseudo_label_batch_rows_time_the_engines_own_pass(speed, monkeypatch) -> None:
    """The rows that chose ``pl_batch_size`` timed a bare forward loop: on a GPU only its launch (nothing
    waited for the results) and in fp32 under ``--full``'s bf16. They time ``predict_binary`` now,
    whose masks come back to the CPU, batch by batch, as the pseudo-label pass's do."""
    real = speed.predict_binary
    asked: list[int] = []

    def recorded(net, images, plan, batch_size=None):
        asked.append(batch_size)
        return real(net, images, plan, batch_size)

    monkeypatch.setattr(speed, "predict_binary", recorded)
    rows = speed.pseudo_label_throughput(ModelConfig(base_width=2), plan_device("cpu"), 16, repeats=1, images=4,
                                         batches=(1, 4))
    assert [batch for batch, _ in rows] == [1, 4] and all(rate > 0 for _, rate in rows)
    assert asked == [1, 1, 4, 4], "a warm-up and one timed run per batch size"


def test_the_machine_line_names_the_cpus_vector_instructions(speed) -> None:
    """Two 'AMD EPYC, 2 cores' machines trained at 94-101 % and 149-174 % of their matmul figure; the second had
    AVX-512, which the issue's machines did not. The tables' machine line could not tell them apart."""
    import torch

    from common import machine

    line = machine()
    assert f"({torch.backends.cpu.get_cpu_capability()}), " in line and " cores, " in line
