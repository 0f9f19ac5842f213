"""Real DeepSpeed runs: 2 ranks vs 1, exact L0 in master and module weights, exact resume."""

from __future__ import annotations

import json
import re
import socket
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import PYTHON, ROOT, subprocess_env

WORKER = str(ROOT / "tests" / "integration" / "dist_worker.py")


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run_worker(data: Path, out: Path, *args: str, ranks: int = 1) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    if ranks == 1:
        cmd = [PYTHON, WORKER, str(data), str(out), *args]
    else:
        ds = str(Path(PYTHON).parent / "deepspeed")
        cmd = [ds, "--num_gpus", str(ranks), "--master_port", _port(), "--no_local_rank", WORKER,
               str(data), str(out), *args]
    res = subprocess.run(cmd, env=subprocess_env(LOCAL_SIZE=str(ranks)), capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(ranks)]


def _target_nonzeros(state: dict, matrices: list[str]) -> None:
    from sparse_lm.sparsity import SparsityConfig, target_count

    sc = SparsityConfig(target_fraction=0.25)
    for name in matrices:
        w = state[name]
        assert int((w != 0).sum()) == target_count(w.numel(), sc.target_fraction), name


def _assert_adam_got_rms(result: dict, bound: float = 1.0) -> None:
    got = torch.tensor(result["adam_grad_rms"])
    assert len(got) and (got - bound).abs().max() < 1e-3, f"RMS of the gradient AdamW received: {got.tolist()}"
    before = torch.tensor(result["grad_rms"])
    assert (before < 0.1).all(), before  # the raw gradient is far below the bound: the rescaling did act


@pytest.mark.slow  # starts training subprocesses
def test_two_ranks_zero2_identical_exact_l0_and_match_one_rank(small_data, tmp_path):
    """Under grad_rms_mode=normalize (the paper's), with 2 ZeRO-2 ranks and with 1 ZeRO-0 rank."""
    two = run_worker(small_data, tmp_path / "two", "--zero", "2", "--steps", "6", "--grad-rms-mode", "normalize",
                     ranks=2)
    one = run_worker(small_data, tmp_path / "one", "--zero", "0", "--steps", "6", "--grad-rms-mode", "normalize",
                     ranks=1)
    r0, r1 = two
    # the gradient AdamW received has RMS 1 on every step, counted over both ranks' partitions
    for r in (r0, r1, one[0]):
        _assert_adam_got_rms(r)
    assert r0["grad_rms"] == r1["grad_rms"]  # every rank scales by the same factor
    torch.testing.assert_close(torch.tensor(r0["grad_rms"]), torch.tensor(one[0]["grad_rms"]), rtol=1e-3, atol=0)
    matrices = r0["matrices"]
    # every rank holds the same weights, module and master alike
    for name in r0["module"]:
        assert torch.equal(r0["module"][name], r1["module"][name]), name
        assert torch.equal(r0["master"][name], r1["master"][name]), name
    # exact L0 after annealing, in the master copy and in the module, on both ranks
    for r in two:
        _target_nonzeros(r["master"], matrices)
        _target_nonzeros(r["module"], matrices)
        assert r["moments_zero"], "Adam moments are nonzero where the weights were projected to zero"
        for name in matrices:
            assert torch.equal(r["master"][name] != 0, r["module"][name] != 0), name
    # the same global batch split over 2 ranks vs accumulated on 1: same run to rounding
    torch.testing.assert_close(torch.tensor(r0["losses"]), torch.tensor(one[0]["losses"]), rtol=1e-4, atol=1e-5)
    for name in r0["master"]:
        a, b = r0["master"][name], one[0]["master"][name]
        close = torch.isclose(a, b, rtol=1e-3, atol=1e-5)
        assert close.float().mean() > 0.995, f"{name}: {(~close).sum()} of {a.numel()} entries differ"


@pytest.mark.slow  # starts training subprocesses
def test_resumed_run_equals_uninterrupted(small_data, tmp_path):
    full = run_worker(small_data, tmp_path / "full", "--steps", "6")[0]
    run_worker(small_data, tmp_path / "split", "--steps", "6", "--stop-at", "3")
    resumed = run_worker(small_data, tmp_path / "split", "--steps", "6", "--resume")[0]
    assert resumed["step"] == 6
    assert resumed["losses"] == full["losses"][3:]
    # default grad_rms_mode=clip: at an RMS far below 1 the gradient reaches Adam untouched
    assert max(full["grad_rms"]) < 0.1
    torch.testing.assert_close(torch.tensor(full["adam_grad_rms"]), torch.tensor(full["grad_rms"]), rtol=1e-5, atol=0)
    for name, w in full["master"].items():
        assert torch.equal(w, resumed["master"][name]), name


@pytest.mark.slow  # starts training subprocesses
def test_bf16_zero1_keeps_exact_l0(small_data, tmp_path):
    """DeepSpeed bf16 keeps fp32 master weights: the projection must reach them too; normalize acts on them."""
    (r,) = run_worker(small_data, tmp_path / "bf16", "--zero", "1", "--precision", "bf16", "--steps", "4",
                      "--grad-rms-mode", "normalize")
    _assert_adam_got_rms(r)
    _target_nonzeros(r["master"], r["matrices"])
    assert r["moments_zero"]
    for name in r["matrices"]:
        assert torch.equal(r["master"][name] != 0, r["module"][name] != 0), name


@pytest.mark.slow  # starts training subprocesses
@pytest.mark.parametrize("zero,precision,ranks", [(1, "fp32", 2), (2, "bf16", 2), (0, "bf16", 1)])
def test_normalize_holds_rms_under_other_layouts(small_data, tmp_path, zero, precision, ranks):
    """ZeRO-1 steps one group at a time; bf16 keeps fp32 master grads (ZeRO-2; ZeRO-0 via DeepSpeed's FP16_Optimizer)."""
    results = run_worker(small_data, tmp_path / "run", "--zero", str(zero), "--precision", precision, "--steps", "3",
                         "--grad-rms-mode", "normalize", ranks=ranks)
    for r in results:
        _assert_adam_got_rms(r)
    assert all(r["grad_rms"] == results[0]["grad_rms"] for r in results)


def test_grad_rms_modes_on_a_plain_optimizer():
    """normalize rescales up and down to the bound; clip only scales down; none leaves the gradient."""
    from sparse_lm.trainer import GradRMSAdamW

    seen = []
    for mode, raw_rms, want in [("normalize", 3e-4, 0.5), ("normalize", 7.0, 0.5), ("clip", 3e-4, 3e-4),
                                ("clip", 7.0, 0.5), ("none", 7.0, 7.0)]:
        ps = [torch.nn.Parameter(torch.zeros(30, 20)), torch.nn.Parameter(torch.zeros(17))]
        opt = GradRMSAdamW([{"params": ps[:1]}, {"params": ps[1:]}], mode=mode, bound=0.5, n_params=617, lr=0.0)
        g = torch.randn(617, generator=torch.Generator().manual_seed(0))
        g *= raw_rms / g.pow(2).mean().sqrt()
        ps[0].grad, ps[1].grad = g[:600].view(30, 20).clone(), g[600:].clone()
        opt.step()
        got = float(torch.cat([p.grad.flatten() for p in ps]).pow(2).mean().sqrt())
        seen.append((mode, raw_rms, opt.last_grad_rms, got))
        assert opt.last_grad_rms == pytest.approx(raw_rms, rel=1e-5)
        assert got == pytest.approx(want, rel=1e-5), seen
    with pytest.raises(ValueError, match="grad_rms_bound"):
        GradRMSAdamW([torch.nn.Parameter(torch.zeros(2))], mode="normalize", bound=None, n_params=2)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "sparse_lm_app", *args], env=subprocess_env(), capture_output=True, text=True,
                          timeout=600, cwd=cwd)


@pytest.mark.slow  # starts training subprocesses
def test_missing_corpus_path_is_a_clear_error(tmp_path):
    res = _cli("pretrain", "--preset", "tiny", f"out_dir={tmp_path}", "data.source=/no/such/folder", cwd=tmp_path)
    assert res.returncode == 1
    assert "/no/such/folder" in res.stderr and "stdlib" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.slow  # starts training subprocesses
def test_corrupt_checkpoint_is_a_clear_error_and_keeps_earlier_results(small_data, tmp_path):
    run_dir = tmp_path / "run"
    run_worker(small_data, run_dir, "--steps", "4", "--stop-at", "2")
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    state_files = list((run_dir / "checkpoints" / latest).glob("*model_states.pt"))
    assert state_files
    state_files[0].write_bytes(b"this is not a checkpoint")
    res = subprocess.run([PYTHON, WORKER, str(small_data), str(run_dir), "--steps", "4", "--resume"],
                         env=subprocess_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode != 0
    assert "could not be loaded" in res.stderr and "delete it" in res.stderr
    assert (run_dir / "rank0.pt").exists()  # the earlier result is still there


@pytest.mark.slow
def test_launcher_two_ranks_tiny_cli(small_data, tmp_path):
    """scripts/pretrain.sh with 2 CPU ranks: exported model loads and every matrix is at its target L0."""
    res = subprocess.run(
        ["bash", str(ROOT / "scripts" / "pretrain.sh"), "--nproc", "2", "--", "--preset", "tiny", "--no-progress",
         f"out_dir={tmp_path}", "run_name=cli", f"data.data_dir={small_data}", "data.block_size=64",
         "model.n_layer=2", "model.d_model=64", "model.d_mlp=256", "model.n_head=4", "train.steps=12",
         "train.eval_every=6", "train.checkpoint_every=6", "train.global_batch=8", "train.micro_batch=4",
         "train.zero_stage=2"],
        env=subprocess_env(), capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    import sparse_lm  # noqa: F401
    from sparse_lm.sparsity import SparsityConfig, target_count

    run = tmp_path / "cli"
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    cfg = json.loads((run / "config.json").read_text())
    sc = SparsityConfig(**{k: v for k, v in cfg["sparsity"].items()})
    for name, w in model.weight_matrices().items():
        frac = sc.embed_fraction if name.endswith(("wte.weight", "wpe.weight")) else (
            sc.unembed_fraction if name.endswith("lm_head.weight") else sc.target_fraction)
        assert int((w != 0).sum()) == target_count(w.numel(), frac), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 12
    assert (run / "curves.png").stat().st_size > 10_000
    # the launcher removes DeepSpeed's shared-memory all-reduce buffers of its run (66 MB of RAM per rank)
    port = re.search(r"--master_port[= ](\d+)", res.stdout + res.stderr).group(1)
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [6, 12]
