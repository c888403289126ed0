"""Every option of ``fedmix-engine`` explains itself, and the defaults that help prints are the ones used."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys

import pytest

from fedmix_engine.cli import build_parser
from fedmix_engine.cli_federation import MODEL_OPTIONS, SERVER_OPTIONS, TRAIN_OPTIONS
from fedmix_engine.federation.server_config import ServerConfig
from fedmix_engine.fedmix.train_config import TrainConfig


def _commands(parser: argparse.ArgumentParser, name: str = "fedmix-engine"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _commands(sub, f"{name} {sub_name}")


def _option(parser: argparse.ArgumentParser, dest: str) -> argparse.Action:
    return next(a for a in parser._actions if a.dest == dest)


def _command(name: str) -> argparse.ArgumentParser:
    return dict(_commands(build_parser()))[f"fedmix-engine {name}"]


def test_every_argument_of_every_command_has_help():
    missing = [f"{name}: {a.option_strings or a.dest}" for name, parser in _commands(build_parser())
               for a in parser._actions if not a.help and not isinstance(a, argparse._SubParsersAction)]
    assert missing == []


def test_help_shows_defaults_once_and_not_for_flags_or_unset_options():
    text = _command("simulate").format_help()
    flat = " ".join(text.split())
    assert "(default: 128)" in flat and "(default: runs/simulate)" in flat
    assert "(default: None)" not in flat and "(default: False)" not in flat
    site_init = " ".join(_command("site init").format_help().split())
    assert site_init.count("(default: 1)") == 1  # --channels, added by the formatter
    assert site_init.count("default") == 2  # --name's help says its own default; nothing appended to it


@pytest.mark.parametrize("part, options, defaults", [
    ("server", SERVER_OPTIONS, ServerConfig()),
    ("model", MODEL_OPTIONS, ServerConfig().model),
    ("train", TRAIN_OPTIONS, ServerConfig().train),
])
def test_serve_help_states_the_defaults_a_new_state_directory_gets(part, options, defaults):
    serve = _command("serve")
    for field, option in options:
        action = _option(serve, option)
        assert action.default is None  # unset options keep the stored value on a restart
        stated = re.search(r"default ([^);]+)\)", action.help)
        assert stated, f"--{option} does not state its default"
        default = getattr(defaults, field)
        said = type(default)(stated.group(1)) if isinstance(default, (int, float)) else stated.group(1)
        if isinstance(default, tuple):  # a list option: "none", or its comma-separated items
            said = () if said == "none" else tuple(said.split(","))
        assert said == default, f"--{option}: help says {stated.group(1)}, the default is {default}"


def test_simulate_defaults_are_the_engine_defaults():
    from fedmix_engine.fedmix.train_config import default_crop_size

    simulate, train = _command("simulate"), TrainConfig()
    for option, field in (("image_size", "image_size"), ("batch_size", "batch_size"),
                          ("lr", "lr"), ("local_epochs", "epochs"), ("tau", "tau"), ("loss", "loss"),
                          ("pl_warmup", "pl_warmup_rounds")):
        assert _option(simulate, option).default == getattr(train, field), option
    assert _option(simulate, "crop_size").default is None  # follows --image-size: the engine's default at 128
    assert default_crop_size(_option(simulate, "image_size").default) == train.crop_size


def test_the_overviews_workflow_commands_are_ones_the_parser_accepts():
    """``fedmix-engine --help`` ends with where each user starts; a renamed option would leave it wrong."""
    from fedmix_engine.cli import WORKFLOWS

    parser = build_parser()
    text = parser.format_help()
    assert WORKFLOWS in text and "a clinic site" in text and "the aggregator" in text
    commands = [part.split() for line in WORKFLOWS.splitlines()
                for part in re.split(r";|, then", re.sub(r"\[[^]]*\]|\(.*?\)", "", line))
                if "fedmix-engine " in part]
    commands = [words[words.index("fedmix-engine") + 1:] for words in commands]
    assert len(commands) == 10 and {c[0] for c in commands} >= {"site", "join", "token", "serve", "simulate",
                                                                 "evaluate"}
    for words in commands:
        args = parser.parse_args(["5" if w in ("N", "R") else w for w in words])
        assert callable(args.func), words


@pytest.mark.parametrize("command, given, named", [
    ("serve", ["--width", "3"], "--width: must be an even number ≥ 2, not 3"),
    ("serve", ["--lr", "inf"], "--lr: must be a finite number > 0, not inf"),
    ("serve", ["--max-upload-mb", "inf"], "--max-upload-mb: must be a finite number of MB, not inf"),
    ("serve", ["--image-size", "100000"], "--image-size: must be at most 2048 px, not 100000"),
    ("serve", ["--crop-size", "100"], "--crop-size: must be a multiple of 16"),
    ("serve", ["--local-epochs", "0"], "--local-epochs: must be ≥ 1, not 0"),
    ("serve", ["--round-timeout", "0"], "--round-timeout: must be positive, not 0.0"),
    ("serve", ["--lam", "-1"], "--lam: λ must be a finite number ≥ 0"),
    # a name no site may give its class: every site would be refused at joining
    ("serve", ["--classes", "2", "--class-names", "background,cyst"], "--class-names: 'background' is implicit"),
    ("serve", ["--class-names", "les;ion"], "--class-names: class name 'les;ion' must start with a letter or digit"),
    ("simulate", ["--pl-warmup", "-1"], "--pl-warmup: must be ≥ 0, not -1"),
    ("simulate", ["--tau", "2"], "--tau: must be in (0, 1], not 2.0"),
    ("simulate", ["--image-size", "8"], "--image-size: must be ≥ 16 (four 2× poolings), not 8"),
    ("simulate", ["--image-size", "32", "--crop-size", "64"], "--crop-size: must be at most the image size (32 px), "
                                                              "not 64"),
    ("predict", ["--threshold", "2"], "--threshold: a probability threshold must be in (0, 1), not 2.0"),
])
def test_a_bad_setting_is_named_by_the_option_typed(tmp_path, capsys, command, given, named):
    """Settings are checked by the engine's config classes, which named their fields: an admin who typed
    --width read 'model.base_width', --crop-size read 'crop_size'."""
    from fedmix_engine.cli import main
    from fedmix_engine.data.synthetic import make_sample

    if command == "serve":
        args = ["serve", "--state", str(tmp_path / "state"), *given]
    elif command == "predict":
        (tmp_path / "images").mkdir()
        (tmp_path / "images" / "scan.png").write_bytes(b"")  # checked before anything is read
        args = ["predict", str(tmp_path / "m.safetensors"), str(tmp_path / "images"), str(tmp_path / "run"), *given]
    else:
        make_sample(tmp_path / "fed", sites=1, images=4, eval_images=2, size=32)
        args = ["simulate", "--sample", str(tmp_path / "fed"), "--out", str(tmp_path / "run"), *given]
    assert main(args) == 2
    said = capsys.readouterr()
    assert f"error: {named}" in said.err
    assert said.out == "", "refused before simulate's 'simulating … → OUT' line, as if it had begun"
    assert not (tmp_path / "state").exists() and not (tmp_path / "run").exists(), "refused before anything is written"


def test_a_mistyped_flower_run_config_key_is_named_with_the_nearest_key(tmp_path, capsys):
    from fedmix_engine.cli import main

    assert main(["flower-app", str(tmp_path / "app"), "--set", "num-rounds=50", "--set", "width=16",
                 "--set", "colour=red"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: run config: unknown key(s) ['colour', 'num-rounds', 'width']; num-rounds: did you "
                          "mean num-server-rounds?; width: did you mean model-width?; known: ['batch-size', "), err
    assert not (tmp_path / "app").exists()


@pytest.mark.parametrize("argv, command, hint", [
    (["make-sample", "out", "--images-per-site", "8"], "make-sample", "--images-per-site: did you mean --images?"),
    (["site", "import", "site-a", "--maskz", "masks"], "site import", "--maskz: did you mean --masks?"),
    (["simulate", "--roundz=3"], "simulate", "--roundz: did you mean --rounds?"),
    (["simulate", "stray"], "simulate", None),
])
def test_an_unknown_argument_is_refused_by_its_command_with_the_nearest_option(tmp_path, capsys, monkeypatch,
                                                                              argv, command, hint):
    """argparse alone blamed 'fedmix-engine' with the overview's usage for a mistyped option of a command."""
    from fedmix_engine.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: fedmix-engine {command} ")
    assert f"fedmix-engine {command}: error: unrecognized arguments: " in err
    assert (hint in err) if hint else ("did you mean" not in err)
    assert list(tmp_path.iterdir()) == [], "refused before anything is written"


@pytest.mark.parametrize("command", ["make-sample", "make-federation", "simulate", "serve", "demo"])
@pytest.mark.parametrize("seed", ["-1", str(2**32), "99999999999999999999"])
def test_a_seed_numpy_or_torch_cannot_take_is_refused_before_any_work(tmp_path, capsys, command, seed):
    """make-sample --seed -1 ended in NumPy's 'expected non-negative integer' traceback; simulate with a
    20-digit seed in torch's 'Overflow when unpacking long long', after the sites were loaded."""
    from fedmix_engine.cli import main
    from fedmix_engine.data.synthetic import make_sample

    out = tmp_path / "out"
    if command in ("make-federation", "simulate"):
        make_sample(tmp_path / "fed", sites=1, images=4, eval_images=2, size=32)
    args = {"make-sample": ["make-sample", str(out), "--images", "2"],
            "make-federation": ["make-federation", str(out), "--from", str(tmp_path / "fed" / "site-a")],
            "simulate": ["simulate", "--sample", str(tmp_path / "fed"), "--out", str(out), "--width", "4"],
            "serve": ["serve", "--state", str(out), "--port", "1"],
            "demo": ["demo", str(out)]}[command]
    assert main([*args, "--seed", seed]) == 2
    assert capsys.readouterr().err == f"error: --seed: a seed is a whole number from 0 to 4294967295, not {seed}\n"
    assert not out.exists(), "refused before anything is written"


def test_serve_offers_every_status_access_the_server_knows():
    from fedmix_engine.federation.server import STATUS_ACCESS

    action = _option(_command("serve"), "status_access")
    assert tuple(action.choices) == STATUS_ACCESS and action.default == "sites"


def test_a_given_image_size_alone_is_a_valid_setting_its_crop_follows(tmp_path, capsys):
    """``--image-size 64`` alone was refused: 'crop_size: 112 is larger than image_size 64', the crop's fixed
    default. Without ``--crop-size`` the crop is now 7/8 of the image side, down to a multiple of 16, the rule
    the Train widget used on its own; a crop that is given is kept."""
    from fedmix_engine.cli import main
    from fedmix_engine.cli_federation import _server_config
    from fedmix_engine.data.synthetic import make_sample
    from fedmix_engine.fedmix.train_config import default_crop_size

    assert [default_crop_size(side) for side in (16, 32, 64, 100, 128, 256)] == [16, 16, 48, 80, 112, 224]
    assert default_crop_size(TrainConfig().image_size) == TrainConfig().crop_size, "the defaults keep the rule"
    parser = build_parser()
    for given, crop in ((["--image-size", "64"], 48), (["--image-size", "64", "--crop-size", "32"], 32), ([], 112)):
        args = parser.parse_args(["serve", "--state", str(tmp_path / "state"), *given])
        assert _server_config(args, ServerConfig()).train.crop_size == crop
    make_sample(tmp_path / "fed", sites=1, images=4, eval_images=2, size=48)
    assert main(["simulate", "--sample", str(tmp_path / "fed"), "--out", str(tmp_path / "run"), "--rounds", "1",
                 "--width", "4", "--image-size", "48", "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["crop_size"] == 32


def test_output_piped_into_head_ends_quietly(tmp_path):
    """``fedmix-engine status --state DIR | head`` printed "error: Broken pipe (BrokenPipeError)" when head
    had read its lines: the pipe closed by the reader is how a listing is cut short, not an error."""
    entries = {f"site-{i:04d}": {"sha256": "0" * 64, "created": "2026-11-30T00:00:00+00:00", "revoked": False}
               for i in range(3000)}  # 180 kB: more than a pipe holds
    (tmp_path / "tokens.json").write_text(json.dumps(entries))
    listing = subprocess.Popen([sys.executable, "-m", "fedmix_engine.cli", "token", "list", "--state", str(tmp_path)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert listing.stdout.readline().startswith(b"site-0000\tcreated")
    listing.stdout.close()  # as head does once it has its lines
    assert listing.stderr.read().decode() == ""
    assert listing.wait(30) == 128 + 13  # as a program killed by SIGPIPE: a pipeline with pipefail sees it
