"""Fault injection: a hostile or careless user's run folders, checkpoints and models.

Each test reproduces a case that once ran a stranger's code, lost data or reported a wrong
result as success, and asserts the behaviour that replaced it. Runs are in-process, single rank
and tiny (a 1-layer SparseGPT on 64-token blocks); one test starts a second process to hold a
run folder's lock.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import PYTHON, ROOT, subprocess_env

from sparse_lm import config as configlib
from sparse_lm.jobs import PretrainConfig


TINY = ["data.block_size=64", "model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.d_head=8",
        "model.d_mlp=64", "sparsity.target_fraction=0.25", "sparsity.min_fan=2", "train.micro_batch=2",
        "train.global_batch=2", "train.precision=fp32", "train.eval_every=0", "train.eval_batches=1",
        "train.log_every=1", "train.threads=1"]


def _cfg(small_data, tmp_path, *extra: str) -> PretrainConfig:
    return configlib.resolve(PretrainConfig, "pretrain", None, [
        f"out_dir={tmp_path}", "run_name=run", f"data.data_dir={small_data}", *TINY, "train.steps=2", *extra])


def _run(cfg, resume=True):
    from sparse_lm.pretrain import run

    return run(cfg, "pretrain", resume=resume, progress=False)


def _metric_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class Payload:
    """Unpickling this creates a marker file: the stand-in for a stranger's code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _craft(path: Path, marker: Path) -> None:
    """Rewrite a checkpoint file as a pickle that would run code, keeping its real content beside it."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    state["payload"] = Payload(marker)
    torch.save(state, path)


# -- 1. no code runs from a checkpoint ---------------------------------------------------------


def test_crafted_model_states_are_refused_and_nothing_runs(small_data, tmp_path, single_rank):
    from sparse_lm.pretrain import load_run_config
    from sparse_lm.trainer import TrainingError, UnsafeCheckpointError
    from sparse_lm_app.cli import main

    cfg = _cfg(small_data, tmp_path)
    _run(cfg)
    run_dir = tmp_path / "run"
    marker = tmp_path / "PWNED"
    _craft(run_dir / "checkpoints" / "step0000002" / "mp_rank_00_model_states.pt", marker)

    with pytest.raises(UnsafeCheckpointError, match="Nothing in it was run"):
        load_run_config(run_dir)
    with pytest.raises(UnsafeCheckpointError):
        _run(_cfg(small_data, tmp_path, "train.steps=4"))  # resume is the default
    assert main(["pretrain", "--resume", str(run_dir), "train.steps=4", "--no-progress"]) == 1
    assert not marker.exists()

    # `latest` may only name a checkpoint folder inside checkpoints/, not a path elsewhere
    (run_dir / "checkpoints" / "latest").write_text(str(tmp_path))
    with pytest.raises(TrainingError, match="not a checkpoint folder"):
        load_run_config(run_dir)


@pytest.mark.parametrize("zero,precision", [(2, "fp32"), (1, "bf16")])
def test_crafted_optimizer_states_are_refused_inside_deepspeed(small_data, tmp_path, single_rank, zero, precision):
    """The ZeRO optimizer partition is read by DeepSpeed's own loader: that path is made safe too."""
    from sparse_lm.trainer import UnsafeCheckpointError

    cfg = _cfg(small_data, tmp_path, f"train.zero_stage={zero}", f"train.precision={precision}")
    _run(cfg)
    marker = tmp_path / "PWNED"
    (optim,) = (tmp_path / "run" / "checkpoints" / "step0000002").glob("*optim_states.pt")
    state = torch.load(optim, map_location="cpu", weights_only=False)  # our own file: trusted here
    state["payload"] = Payload(marker)
    torch.save(state, optim)
    with pytest.raises(UnsafeCheckpointError, match="optim_states"):
        _run(_cfg(small_data, tmp_path, f"train.zero_stage={zero}", f"train.precision={precision}", "train.steps=3"))
    assert not marker.exists()


LAYOUTS = [(0, "fp32"), (1, "fp32"), (2, "fp32"), (1, "bf16"), (2, "bf16"), (0, "bf16-autocast")]


@pytest.mark.parametrize("zero,precision", LAYOUTS)
def test_every_layout_resumes_through_the_safe_loader(small_data, tmp_path, single_rank, monkeypatch, zero,
                                                      precision):
    """Each ZeRO stage and precision the trainer allows saves only what the weights-only loader accepts."""
    import sparse_lm.trainer as trainer_mod

    loads = []
    safe = trainer_mod.safe_torch_load
    monkeypatch.setattr(trainer_mod, "safe_torch_load", lambda *a, **k: loads.append(a[0]) or safe(*a, **k))
    monkeypatch.setattr(torch, "load", _forbid_unsafe(torch.load))
    layout = [f"train.zero_stage={zero}", f"train.precision={precision}"]
    _run(_cfg(small_data, tmp_path, *layout))
    summary = _run(_cfg(small_data, tmp_path, *layout, "train.steps=3"))
    assert summary["steps"] == 3 and _metric_steps(tmp_path / "run") == [1, 2, 3]
    names = {Path(p).name for p in loads}
    assert "mp_rank_00_model_states.pt" in names
    if zero or precision == "bf16":
        assert any(n.endswith("optim_states.pt") for n in names), names


def _forbid_unsafe(load):
    def guarded(*args, **kwargs):
        assert kwargs.get("weights_only") is True, "torch.load called without weights_only=True"
        return load(*args, **kwargs)

    return guarded


# -- 2. one run per folder -----------------------------------------------------------------------


@pytest.mark.slow
def test_second_run_into_a_busy_folder_fails_with_the_pid_and_a_killed_one_does_not_block(
        small_data, tmp_path, single_rank):
    from sparse_lm.trainer import TrainingError

    run_dir = tmp_path / "run"
    first = subprocess.Popen(
        [PYTHON, "-m", "sparse_lm_app", "pretrain", f"out_dir={tmp_path}", "run_name=run",
         f"data.data_dir={small_data}", *TINY, "train.steps=100000", "--no-progress"],
        env=subprocess_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (run_dir / "metrics.jsonl").exists():  # it holds the lock and is training
            assert first.poll() is None, first.stderr.read()
            assert time.time() < deadline, "the first run did not start training"
            time.sleep(0.5)
        rows = len(_metric_steps(run_dir))
        t0 = time.time()
        with pytest.raises(TrainingError, match=f"in use by another run \\(PID {first.pid}\\)"):
            _run(_cfg(small_data, tmp_path, "train.seed=1"))
        assert time.time() - t0 < 30  # at once, not after training
        assert first.poll() is None and len(_metric_steps(run_dir)) >= rows  # the first run goes on untouched
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the killed run's lock died with it: the folder is free
    summary = _run(_cfg(small_data, tmp_path, "train.steps=2"), resume=False)
    assert summary["steps"] == 2


def test_lock_is_per_process_and_released(tmp_path):
    from sparse_lm.io import RunFolderBusy, lock_run_folder, unlock_run_folder

    lock_run_folder(tmp_path)
    lock_run_folder(tmp_path)  # re-entrant in one process
    holder = (tmp_path / ".lock").read_text().strip()
    assert holder == str(os.getpid())
    # sparse_lm/io.py alone (stdlib only): the package's __init__ would import torch, seconds per process
    code = ("import sys, importlib.util as u\n"
            f"spec = u.spec_from_file_location('io_', {str(ROOT / 'sparse_lm' / 'io.py')!r})\n"
            "io_ = u.module_from_spec(spec); spec.loader.exec_module(io_)\n"
            "lock_run_folder, RunFolderBusy = io_.lock_run_folder, io_.RunFolderBusy\n"
            f"try: lock_run_folder({str(tmp_path)!r})\n"
            "except RunFolderBusy as e: print(e); sys.exit(3)\n")
    res = subprocess.run([PYTHON, "-c", code], env=subprocess_env(), capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 3 and f"PID {os.getpid()}" in res.stdout
    unlock_run_folder(tmp_path)
    # another live process holds it: refused with that PID; SIGKILLed, it leaves no stale lock behind
    proc = subprocess.Popen([PYTHON, "-c", code + "import time; print('held', flush=True); time.sleep(120)"],
                            env=subprocess_env(), stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusy, match=f"PID {proc.pid}"):
            lock_run_folder(tmp_path)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    lock_run_folder(tmp_path)
    unlock_run_folder(tmp_path)


# -- 3. nothing non-finite is saved --------------------------------------------------------------


def test_nan_weights_are_never_checkpointed_and_the_advised_resume_works(small_data, tmp_path, single_rank,
                                                                       monkeypatch):
    from sparse_lm.trainer import Trainer, TrainingError, safe_torch_load

    real_step = Trainer.train_step

    def poisoned_step(self):  # step 3's update turns a weight NaN while its loss was still finite
        loss = real_step(self)
        if self.step == 3:
            with torch.no_grad():
                next(self.module.parameters()).view(-1)[0] = float("nan")
        return loss

    monkeypatch.setattr(Trainer, "train_step", poisoned_step)
    with pytest.raises(TrainingError, match=r"NaN or infinite by step 3.*step0000002.*--resume .*optim\.lr="):
        _run(_cfg(small_data, tmp_path, "train.steps=6", "train.checkpoint_every=1"))
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step0000002"
    assert not (ckpts / "step0000003").exists()
    module = safe_torch_load(ckpts / "step0000002" / "mp_rank_00_model_states.pt")["module"]
    assert all(bool(torch.isfinite(t).all()) for t in module.values())

    monkeypatch.setattr(Trainer, "train_step", real_step)
    summary = _run(_cfg(small_data, tmp_path, "train.steps=6", "train.checkpoint_every=1", "optim.lr=1e-3"))
    assert summary["steps"] == 6 and _metric_steps(tmp_path / "run") == [1, 2, 3, 4, 5, 6]


def test_huge_learning_rate_stops_before_saving_a_ruined_state(small_data, tmp_path, single_rank):
    """The reported case: optim.lr=1e6, a checkpoint every step; then the advised rerun with a lower lr.

    One step at that rate leaves finite but useless weights (loss ~1e10): no checkpoint may hold them.
    """
    from sparse_lm.trainer import TrainingError

    with pytest.raises(TrainingError, match=r"diverged by step 1 .* not saved\. No checkpoint .*optim\.lr \(e\.g\. 0\.01"):
        _run(_cfg(small_data, tmp_path, "train.steps=8", "train.checkpoint_every=1", "optim.lr=1e6"))
    assert not (tmp_path / "run" / "checkpoints" / "latest").exists()
    assert not (tmp_path / "run" / "model").exists()  # nothing exported either
    summary = _run(_cfg(small_data, tmp_path, "train.steps=8", "train.checkpoint_every=1", "optim.lr=0.01"))
    assert summary["steps"] == 8 and _metric_steps(tmp_path / "run") == list(range(1, 9))
    assert summary["val_loss"] < 7


# -- 4. --fresh keeps the old run aside ------------------------------------------------------------


def test_fresh_moves_the_old_run_aside_and_keeps_its_own_checkpoints(small_data, tmp_path, single_rank):
    run_dir = tmp_path / "run"
    _run(_cfg(small_data, tmp_path, "train.steps=5", "train.checkpoint_every=1", "train.keep_checkpoints=2"))
    old_summary = (run_dir / "summary.json").read_text()
    old_weights = (run_dir / "model" / "model.safetensors").read_bytes()

    _run(_cfg(small_data, tmp_path, "train.steps=3", "train.checkpoint_every=1", "train.keep_checkpoints=2",
              "train.seed=7"), resume=False)
    (aside,) = tmp_path.glob("run.before-*")
    assert sorted(p.name for p in (aside / "checkpoints").glob("step*")) == ["step0000004", "step0000005"]
    assert (aside / "summary.json").read_text() == old_summary
    assert (aside / "model" / "model.safetensors").read_bytes() == old_weights
    assert _metric_steps(aside) == [1, 2, 3, 4, 5]
    # the new run: only its own checkpoints, retention applied to them, latest names one that exists
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step*")) == ["step0000002", "step0000003"]
    assert (run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()).is_dir()
    assert _metric_steps(run_dir) == [1, 2, 3]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 3


# -- 6. results are never wiped, torn lines and stale temporaries ----------------------------------------


def test_rerunning_a_finished_run_changes_nothing_and_a_kill_in_the_final_save_loses_nothing(
        small_data, tmp_path, single_rank):
    run_dir = tmp_path / "run"
    _run(_cfg(small_data, tmp_path))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "loss" in summary and "val_loss" in summary
    before = {p: p.stat().st_mtime_ns for p in [run_dir / "summary.json", run_dir / "model" / "model.safetensors"]}

    again = _run(_cfg(small_data, tmp_path))
    assert again == summary
    assert {p: p.stat().st_mtime_ns for p in before} == before

    # killed after the final checkpoint, before the export and the summary
    shutil.rmtree(run_dir / "model")
    (run_dir / "summary.json").unlink()
    resumed = _run(_cfg(small_data, tmp_path))
    for key in ("loss", "val_loss", "steps"):
        assert resumed[key] == summary[key], key
    assert json.loads((run_dir / "summary.json").read_text())["val_loss"] == summary["val_loss"]


def test_torn_metrics_line_is_dropped_on_resume(small_data, tmp_path, single_rank, capsys):
    run_dir = tmp_path / "run"
    _run(_cfg(small_data, tmp_path))
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 4.1')  # a kill mid-write
    _run(_cfg(small_data, tmp_path, "train.steps=3"))
    assert "dropped 1 unreadable line" in capsys.readouterr().out
    assert _metric_steps(run_dir) == [1, 2, 3]


def test_stale_temporaries_are_removed_under_the_lock(small_data, tmp_path, single_rank):
    run_dir = tmp_path / "run"
    (run_dir / ".model.abc123.tmp").mkdir(parents=True)
    (run_dir / ".model.abc123.tmp" / "model.safetensors").write_bytes(b"half")
    (run_dir / ".summary.json.xyz.tmp").write_text("{")
    _run(_cfg(small_data, tmp_path))
    assert not list(run_dir.glob(".*.tmp"))
    assert (run_dir / "model" / "model.safetensors").is_file()


# -- 5/6/7. consistency at load, config errors, exit codes ---------------------------------------


@pytest.fixture
def trained(small_data, tmp_path, single_rank) -> Path:
    _run(_cfg(small_data, tmp_path))
    return tmp_path / "run"


def _copy_model(run_dir: Path, tmp_path: Path, name: str) -> Path:
    dest = tmp_path / name
    shutil.copytree(run_dir / "model", dest)
    return dest


def test_model_checks_at_load(trained, tmp_path):
    from sparse_lm.corpus import load_corpus
    from sparse_lm.loading import load_model_and_tokenizer
    from sparse_lm.tokenizer import train_tokenizer

    model, tok = load_model_and_tokenizer(trained)
    assert len(tok) == model.get_input_embeddings().num_embeddings

    corpus = load_corpus("stdlib", max_documents=10)
    for vocab in (300, 1024):  # smaller: once scored "normally"; larger: once an IndexError
        d = _copy_model(trained, tmp_path, f"tok{vocab}")
        train_tokenizer(corpus, vocab_size=vocab, out_dir=d)
        with pytest.raises(ValueError, match="not the one the model was trained with"):
            load_model_and_tokenizer(d)

    for n_layer, kind in ((2, "missing from the weights"), (0, "in the weights but not in the model config")):
        d = _copy_model(trained, tmp_path, f"layers{n_layer}")
        config = json.loads((d / "config.json").read_text())
        config["n_layer"] = n_layer
        (d / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=kind):
            load_model_and_tokenizer(d)

    d = _copy_model(trained, tmp_path, "wider")
    config = json.loads((d / "config.json").read_text())
    config["d_mlp"] *= 2
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="shape"):
        load_model_and_tokenizer(d)


def test_damaged_files_and_missing_results_exit_1_with_a_message(trained, tmp_path, capsys, monkeypatch):
    from sparse_lm_app.cli import main

    truncated = _copy_model(trained, tmp_path, "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    garbage = _copy_model(trained, tmp_path, "garbage")
    (garbage / "config.json").write_text("{not json")
    no_model = tmp_path / "no_model"
    shutil.copytree(trained, no_model, ignore=shutil.ignore_patterns("model"))

    cases = [(["info", str(truncated)], "damaged or truncated"),
             (["eval-tasks", "--model", str(truncated), "--n", "8"], "damaged or truncated"),
             (["info", str(garbage)], "not a readable JSON model config"),
             (["info", str(no_model)], "without its model")]
    for argv, message in cases:
        capsys.readouterr()
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)

    # eval-tasks: every task failing is not a success
    import tasks.evaluate as evaluate

    def fail(model, tokenizer, name, *a, **k):
        raise evaluate.TaskTokenizationError(f"{name}: cannot be expressed")

    monkeypatch.setattr(evaluate, "evaluate_task", fail)
    assert main(["eval-tasks", "--model", str(trained), "--n", "8"]) == 1
    assert "could not be evaluated" in capsys.readouterr().err


@pytest.mark.parametrize("override,message", [
    ("train.steps=-3", "train.steps must be at least 1"),
    ("train.steps=0", "train.steps must be at least 1"),
    ("train.micro_batch=0", "train.micro_batch must be at least 1"),
    ("train.global_batch=0", "train.global_batch must be at least 1"),
    ("train.log_every=0", "train.log_every must be at least 1"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints must be at least 1"),
    ("optim.lr=-1", "optim.lr must be a finite number > 0"),
    ("optim.warmup=2", "optim.warmup"),
    ("data.block_size=0", "data.block_size must be at least 2"),
])
def test_bad_numbers_are_config_errors(override, message, capsys, tmp_path):
    from sparse_lm_app.cli import main

    assert main(["pretrain", f"out_dir={tmp_path}", override, "--print-config"]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "sparse").exists()


def test_overrides_anywhere_and_a_fast_help(tmp_path, capsys):
    from sparse_lm_app.cli import main

    assert main(["pretrain", "--print-config", "train.steps=7", "--preset", "debug", "model.n_layer=1"]) == 0
    out = capsys.readouterr().out
    assert "steps" in out and "7" in out
    code = "import sys; from sparse_lm_app.cli import main; main(['--help']); assert 'torch' not in sys.modules"
    best = float("inf")
    for _ in range(3):  # the best of three: the machine may be busy
        t0 = time.perf_counter()
        res = subprocess.run([PYTHON, "-c", code], env=subprocess_env(), capture_output=True, text=True, cwd=ROOT)
        best = min(best, time.perf_counter() - t0)
        assert res.returncode == 0, res.stderr
    assert best < 1.0, f"sparse-lm --help took {best:.2f}s"


def test_resume_through_the_job_is_bit_identical(small_data, tmp_path, single_rank, monkeypatch):
    """Killed right after a checkpoint and resumed (safe loader, state checks and all) == never stopped."""
    from safetensors.torch import load_file

    from sparse_lm.trainer import Trainer

    class Killed(BaseException):
        pass

    _run(_cfg(small_data, tmp_path, "run_name=whole", "train.steps=4", "train.checkpoint_every=2"))
    real_save = Trainer.save_checkpoint

    def save_then_die(self):
        real_save(self)
        if self.step == 2:
            raise Killed

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        _run(_cfg(small_data, tmp_path, "run_name=split", "train.steps=4", "train.checkpoint_every=2"))
    monkeypatch.setattr(Trainer, "save_checkpoint", real_save)
    _run(_cfg(small_data, tmp_path, "run_name=split", "train.steps=4", "train.checkpoint_every=2"))
    a = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    b = load_file(tmp_path / "split" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    rows = [[json.loads(line) for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
            for r in ("whole", "split")]
    assert [r["loss"] for r in rows[0]] == [r["loss"] for r in rows[1]]
