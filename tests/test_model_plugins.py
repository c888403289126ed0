"""A researcher's network in an installed package (an entry point in ``fedmix_engine.models``) is
found by every command and process: simulate, serve, join, predict, evaluate. Before, the commands
knew only the built-in U-Net and another network could only be run from Python.

The package is installed the way pip leaves it on disk (a module and its ``*.dist-info`` folder on
the import path), and importlib.metadata finds it there; the commands run as real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from federation_helpers import TINY_SETTINGS, free_port, make_tokens, running_server
from fedmix_engine.checkpoint import load_checkpoint
from fedmix_engine.cli import main
from fedmix_engine.data.synthetic import make_sample
from fedmix_engine.errors import InputError
from fedmix_engine.model import config as model_config
from model_package_helpers import install_network_package


@pytest.fixture()
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    return install_network_package(tmp_path, monkeypatch)


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedmix_engine.cli", *args], env=env, capture_output=True,
                          text=True, timeout=300)


def test_simulate_predict_and_evaluate_use_an_installed_packages_network(installed: dict[str, str],
                                                                          tmp_path: Path, capsys) -> None:
    make_sample(tmp_path / "fed", sites=2, images=6, eval_images=2, seed=0, size=32)
    assert "tiny-conv" not in model_config._REGISTRY  # nothing imported before a command asks for it
    assert model_config.known_models() == ["unet", "broken", "not-a-builder", "tiny-conv"]
    run = tmp_path / "run"
    assert main(["simulate", "--sample", str(tmp_path / "fed"), "--model", "tiny-conv", "--rounds", "1",
                 "--image-size", "32", "--crop-size", "32", "--batch-size", "4", "--device", "cpu",
                 "--out", str(run)]) == 0, capsys.readouterr().err
    pair, config, _ = load_checkpoint(run / "best.safetensors")
    assert config.name == "tiny-conv" and "net1.body.0.weight" in pair  # the package's network, not a U-Net
    # a new process, which never saw the simulation, reads the checkpoint through the entry point
    images = tmp_path / "images"
    images.mkdir()
    tifffile.imwrite(images / "scan.tif", np.random.default_rng(0).integers(0, 255, (40, 48), dtype=np.uint8))
    predicted = _run(installed, "predict", str(run / "best.safetensors"), str(images), str(tmp_path / "masks"),
                     "--device", "cpu")
    assert predicted.returncode == 0, predicted.stderr
    assert tifffile.imread(tmp_path / "masks" / "scan_mask.tif").shape == (40, 48)
    held_out = tmp_path / "fed" / "eval" / "site-a" / "test"
    scored = _run(installed, "evaluate", str(run / "best.safetensors"), str(held_out), "--device", "cpu")
    assert scored.returncode == 0 and "mean Dice over images" in scored.stdout, scored.stderr
    # without the package, the process names the network and what to do
    bare = {**installed, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    missing = _run(bare, "predict", str(run / "best.safetensors"), str(images), str(tmp_path / "none"))
    assert missing.returncode == 2
    assert ("unknown model 'tiny-conv'; known: unet (another network: install the package that offers it"
            in missing.stderr), missing.stderr


def test_an_unknown_or_broken_network_is_named_under_model_before_training(installed: dict[str, str],
                                                                          tmp_path: Path, capsys) -> None:
    make_sample(tmp_path / "fed", sites=2, images=4, eval_images=1, seed=0, size=32)
    for name, said in [
        ("nope", "--model: unknown model 'nope'; known: unet, broken, not-a-builder, tiny-conv"),
        ("broken", "--model: network 'broken' of fedmix-tinynet 0.1 (fedmix_tinynet_broken:build) cannot be "
                   "loaded: ImportError: needs timm, which is not installed"),
        ("not-a-builder", "--model: network 'not-a-builder' of fedmix-tinynet 0.1: fedmix_tinynet:__doc__ is not "
                          "a builder"),
    ]:
        assert main(["simulate", "--sample", str(tmp_path / "fed"), "--model", name, "--rounds", "1",
                     "--image-size", "32", "--device", "cpu", "--out", str(tmp_path / name)]) == 2
        assert said in capsys.readouterr().err, name
        assert not (tmp_path / name / "metrics.jsonl").exists()
    # two packages offering one name: which one a checkpoint was trained with cannot be told
    other = tmp_path / "site-packages" / "fedmix_othernet-0.2.dist-info"
    other.mkdir()
    (other / "METADATA").write_text("Metadata-Version: 2.1\nName: fedmix-othernet\nVersion: 0.2\n")
    (other / "entry_points.txt").write_text("[fedmix_engine.models]\ntiny-conv = fedmix_othernet:build\n")
    assert main(["simulate", "--sample", str(tmp_path / "fed"), "--model", "tiny-conv", "--rounds", "1",
                 "--image-size", "32", "--device", "cpu", "--out", str(tmp_path / "twice")]) == 2
    assert ("--model: network 'tiny-conv' is offered by several installed packages (fedmix-" in (
        err := capsys.readouterr().err)) and "fedmix_othernet:build" in err and "fedmix_tinynet:build" in err, err


def test_serve_and_join_federate_an_installed_packages_network(installed: dict[str, str], tmp_path: Path) -> None:
    make_sample(tmp_path / "fed", sites=2, images=6, eval_images=1, seed=0, size=32)
    state = tmp_path / "state"
    tokens = make_tokens(state, ["site-a", "site-b"])
    with running_server(state, ["--model", "tiny-conv", "--sites", "2", "--rounds", "1", *TINY_SETTINGS]) as server:
        # a site without the package: told which network and what to do, before it trains
        bare = {**installed, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
        checked = _run(bare, "join", "--server", server.url, "--token", tokens["site-a"], "--site",
                       str(tmp_path / "fed" / "site-a"), "--device", "cpu", "--check")
        assert checked.returncode == 2, checked.stdout + checked.stderr
        assert "unknown model 'tiny-conv'; known: unet (another network: install the package" in checked.stderr
        joins = [subprocess.Popen([sys.executable, "-m", "fedmix_engine.cli", "join", "--server", server.url,
                                   "--token", tokens[name], "--site", str(tmp_path / "fed" / name), "--device", "cpu",
                                   "--poll", "0.2"], env=installed, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
                 for name in ("site-a", "site-b")]
        outputs = [join.communicate(timeout=300)[0] for join in joins]
        assert all(join.returncode == 0 for join in joins), outputs
        assert server.status()["finished"]
    _, config, _ = load_checkpoint(tmp_path / "fed" / "site-a" / "models" / "global.safetensors")
    assert config.name == "tiny-conv"
    status = _run(installed, "status", "--state", str(state))
    assert status.returncode == 0 and "\nmodel: network tiny-conv, width 4, 1 class, 1 channel;" in status.stdout
    # the server's network is part of the federation's settings: a restart cannot change it
    changed = _run(installed, "serve", "--state", str(state), "--model", "unet", "--port", str(free_port()))
    assert changed.returncode == 2 and "fixed for the life of a federation (--model: tiny-conv → unet)" in (
        changed.stderr), changed.stderr


def test_a_network_that_breaks_the_contract_is_refused_by_name_before_training(tmp_path: Path, capsys,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A network whose logits are not B×classes×H×W (a stride left in, the class count ignored) or that cannot
    take the images failed mid-round, deep in the Dice loss, with torch's shape error. It is probed once when
    built; the probe moves no BatchNorm statistic, leaves the module training and draws nothing from the RNG."""
    import torch

    from fedmix_engine.model import ModelConfig, build_model, register_model

    class Refuses(torch.nn.Module):
        def forward(self, x):
            raise ValueError("this network needs 3 channels")

    monkeypatch.setattr(model_config, "_REGISTRY", {"unet": model_config._unet})
    monkeypatch.setattr(model_config, "_PROBED", set())
    register_model("strided", lambda c: torch.nn.Conv2d(c.in_channels, c.num_classes, 3, stride=2, padding=1))
    register_model("one-class", lambda c: torch.nn.Conv2d(c.in_channels, 1, 3, padding=1))
    register_model("refuses", lambda c: Refuses())
    register_model("normed", lambda c: torch.nn.Sequential(torch.nn.Conv2d(c.in_channels, c.num_classes, 1),
                                                           torch.nn.BatchNorm2d(c.num_classes)))
    make_sample(tmp_path / "fed", sites=2, images=4, eval_images=1, seed=0, size=32, classes=2)
    for name, said in [
        ("strided", "--model: network 'strided' maps a 2×1×64×64 batch of images to 2×2×32×32; it must return "
                    "2×2×64×64 logits: one channel per class, at the images' size"),
        ("one-class", "--model: network 'one-class' maps a 2×1×64×64 batch of images to 2×1×64×64; it must return "
                      "2×2×64×64 logits"),
        ("refuses", "--model: network 'refuses' cannot take a 2×1×64×64 batch of images: ValueError: this network "
                    "needs 3 channels"),
    ]:
        assert main(["simulate", "--sample", str(tmp_path / "fed"), "--model", name, "--rounds", "1",
                     "--image-size", "32", "--crop-size", "32", "--device", "cpu", "--out", str(tmp_path / name)]) == 2
        assert said in capsys.readouterr().err, name
        assert not (tmp_path / name / "metrics.jsonl").exists()

    from fedmix_engine.federation.server_config import ServerConfig
    from fedmix_engine.federation.state import ServerState

    with pytest.raises(InputError, match=r"model.name: network 'strided' maps a 2×1×64×64 batch of images to "
                                         r"2×1×32×32"):
        ServerState(tmp_path / "state", ServerConfig(model=ModelConfig(name="strided")))
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").iterdir()), "a state half made"

    config = ModelConfig(name="normed", num_classes=2)
    torch.manual_seed(7)
    probed = build_model(config)
    after_probe = torch.rand(3)
    assert config in model_config._PROBED
    torch.manual_seed(7)
    again = build_model(config)  # probed already: not again
    assert torch.equal(torch.rand(3), after_probe), "the probe drew from the RNG"
    assert torch.equal(probed[0].weight, again[0].weight)
    norm = probed[1]
    assert probed.training and norm.training
    assert int(norm.num_batches_tracked) == 0 and torch.equal(norm.running_var, torch.ones(2))
