"""The app layer: the explicit command list, fast top-level help, overrides anywhere, and a main job
that rejects a bad stage override before it starts anything."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import PYTHON, ROOT, subprocess_env


def test_every_command_has_arguments_and_a_runner():
    import argparse

    from sparse_lm_app.cli import COMMANDS

    assert {"pretrain", "train-dense", "prune", "sweep", "bridge", "intervene", "eval-tasks", "circuit-html"} <= set(COMMANDS)
    for name, command in COMMANDS.items():
        parser = argparse.ArgumentParser(prog=name)
        command.add_arguments(parser)  # builds without importing the libraries' heavy parts
        assert callable(command.run)


def test_top_level_help_does_not_import_torch():
    code = "import sys; from sparse_lm_app.cli import main; main(['--help']); print('torch' in sys.modules)"
    out = subprocess.run([PYTHON, "-c", code], env=subprocess_env(), cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert "pretrain" in out.stdout and out.stdout.strip().endswith("False")


def test_unknown_command_exits_2(capsys):
    from sparse_lm_app.cli import main

    assert main(["no-such-command"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_overrides_may_come_after_flags(capsys):
    from sparse_lm_app.cli import main

    # KEY=VALUE after a flag used to be rejected by argparse
    assert main(["prune", "--model", "m", "--out", "o", "--print-config", "steps=7", "--method", "attribution",
                 "k_coef=0.5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("steps = 7 ") for line in lines)
    assert any(line.startswith("k_coef = 0.5 ") for line in lines)
    assert any(line.startswith('method = "attribution" ') for line in lines)


def test_main_job_rejects_a_bad_override_before_anything_starts(tmp_path, capsys):
    from sparse_lm_app.main_job.pipeline import main

    assert main(["--quick", "--out", str(tmp_path), "sparse.train.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err
    assert not (tmp_path / "quick" / "stages").exists()  # no stage started
    assert main(["--quick", "--out", str(tmp_path), "nostage.x=1"]) == 2


def test_main_job_saves_each_stage_config_before_launching(tmp_path):
    import json

    from sparse_lm_app.main_job.pipeline import PLANS, Pipeline, parse_args

    args = parse_args(["--quick", "--out", str(tmp_path), "sparse.train.steps=3", "prune.steps=5"])
    p = Pipeline(args, PLANS[args.preset])
    p.resolve_configs(args.overrides)
    saved = {s: json.loads((tmp_path / "quick" / "configs" / f"{s}.json").read_text())
             for s in ("sparse", "dense", "bridge", "prune")}
    assert saved["sparse"]["train"]["steps"] == 3 and saved["prune"]["steps"] == 5
    assert saved["sparse"]["job"] == "pretrain" and saved["bridge"]["job"] == "bridge"
    assert saved["dense"]["data"]["data_dir"] == saved["sparse"]["data"]["data_dir"]
    assert saved["bridge"]["dense"].endswith("dense") and saved["bridge"]["sparse"].endswith("model")


@pytest.mark.parametrize("preset", ["tiny", "long", "paper-1x", "debug"])
def test_every_main_plan_resolves_its_configs(tmp_path, preset):
    """A preset of the main job whose stage presets do not load (a typo, an unknown key) fails here,
    not hours into a run."""
    import json

    from sparse_lm_app.main_job.pipeline import PLANS, Pipeline, parse_args

    args = parse_args(["--preset", preset, "--out", str(tmp_path)])
    p = Pipeline(args, PLANS[args.preset])
    p.resolve_configs(args.overrides)
    saved = {s: json.loads((tmp_path / args.name / "configs" / f"{s}.json").read_text())
             for s in ("sparse", "dense", "bridge", "prune")}
    assert saved["dense"]["data"]["data_dir"] == saved["sparse"]["data"]["data_dir"]
    if preset == "long":  # more tokens than one pass over the standard library, from the larger corpus
        assert saved["sparse"]["data"]["source"] == "python-site"
        assert saved["sparse"]["train"]["steps"] * saved["sparse"]["train"]["global_batch"] * 256 > 40e6
