"""The training core through the pretraining stage: learning, exact resume, torn checkpoints, accumulation and
DDP equivalence, metrics and plot, and the error cases."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import (
    ROOT,
    losses,
    main_py_command,
    make_pretrain_cfg,
    pretrain_args,
    read_metrics,
    run_main_py,
)
from trainer.common import TrainingStopped
from trainer.core import run_trainer
from trainer.pretrain import PretrainTrainer


@pytest.fixture(scope="module")
def straight(tiny_tokenizer_dir, shards, tmp_path_factory):
    """The 12-step run that an interrupted and resumed one must equal, trained once for the tests that only read it."""
    cfg = make_pretrain_cfg(tiny_tokenizer_dir, shards, tmp_path_factory.mktemp("straight") / "run")
    run_trainer(PretrainTrainer, cfg)
    return cfg


@pytest.fixture(scope="module")
def eight_steps(tiny_tokenizer_dir, shards, tmp_path_factory) -> Path:
    """An 8-step run (checkpoints at steps 4 and 8), trained once; tests that damage it take a copy (run_copy)."""
    cfg = make_pretrain_cfg(tiny_tokenizer_dir, shards, tmp_path_factory.mktemp("eight_steps") / "run", max_steps=8)
    run_trainer(PretrainTrainer, cfg)
    return Path(cfg.out_dir)


def run_copy(eight_steps: Path, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(eight_steps, tmp_path / "run"))


@pytest.mark.slow  # over 3 s: kept out of the quick suite (pytest -m 'not slow')
def test_loss_decreases_and_run_dir_is_complete(tiny_tokenizer_dir, shards, tmp_path):
    cfg = make_pretrain_cfg(tiny_tokenizer_dir, shards, tmp_path / "run", max_steps=30, sample_tokens=4, eval_every=15)
    run_trainer(PretrainTrainer, cfg)
    curve = losses(cfg.out_dir)
    assert len(curve) == 30 and sum(curve[-5:]) / 5 < 0.6 * sum(curve[:3]) / 3
    evals = read_metrics(cfg.out_dir, "eval")
    assert [e["step"] for e in evals] == [15, 30] and all(0 < e["bpb"] < 10 for e in evals)
    run = Path(cfg.out_dir)
    assert (run / "config.yaml").exists() and (run / "latest").read_text().strip() == "step_000030"
    state = torch.load(run / "step_000030" / "trainer_state.pt", weights_only=False)
    assert {"optimizer", "step", "tokens_seen", "data", "rng", "scaler"} <= set(state)
    assert state["tokens_seen"] == 30 * 8 * 32
    weights = load_file(run / "final" / "model.safetensors")
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in weights)
    assert (run / "final" / "tokenizer.json").exists()
    # metrics.jsonl -> PNG
    pytest.importorskip("matplotlib")
    subprocess.run(
        [sys.executable, "scripts/plot_metrics.py", str(run / "metrics.jsonl"), "--out", str(tmp_path / "loss.png")],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    assert (tmp_path / "loss.png").stat().st_size > 1000


class Interrupted(Exception):
    pass


class DiesAtStep7(PretrainTrainer):
    def train_step(self):
        if self.step == 6:  # mid-shard, two steps after the step-4 checkpoint
            raise Interrupted
        return super().train_step()


def test_interrupted_run_resumes_bit_identical(tiny_tokenizer_dir, shards, straight, tmp_path):
    crashed = make_pretrain_cfg(tiny_tokenizer_dir, shards, tmp_path / "crashed")
    with pytest.raises(Interrupted):
        run_trainer(DiesAtStep7, crashed)
    assert sorted(p.name for p in Path(crashed.out_dir).glob("step_*")) == ["step_000004"]
    resumed = run_trainer(PretrainTrainer, crashed)  # resume=auto
    assert resumed.tokens_seen == 12 * 8 * 32
    assert losses(crashed.out_dir) == losses(straight.out_dir)  # exact equality, not a tolerance
    a = load_file(Path(straight.out_dir) / "final" / "model.safetensors")
    b = load_file(Path(crashed.out_dir) / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# -----------------------------------------------------------------------------
# Real crashes: main.py killed with SIGKILL (no handler, no cleanup, no flush) at the moments that can tear state


def newest_complete_step(out_dir: Path) -> int:
    steps = [int(p.name[5:]) for p in out_dir.glob("step_*") if p.name[5:].isdigit()]
    return max(steps, default=0)


def last_logged_step(out_dir: Path) -> int:
    try:
        lines = (out_dir / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (FileNotFoundError, ValueError, KeyError):  # not written yet, or caught mid-append
        return 0


def inside_a_checkpoint_write(out_dir: Path, resumed_from: int, started: float) -> str | None:
    """A step_*.tmp folder being written, once the run has a checkpoint of its own to fall back to."""
    if newest_complete_step(out_dir) > resumed_from and any(out_dir.glob("step_*.tmp")):
        return "inside a checkpoint write"
    return None


def after_a_metrics_append(out_dir: Path, resumed_from: int, started: float) -> str | None:
    """A line this process logged (the resume rewrote the file without the later ones) for the second step after
    the resume point: the step before it was saved, this one not yet, so it must be redone."""
    metrics = out_dir / "metrics.jsonl"
    appended = metrics.exists() and metrics.stat().st_mtime > started
    return "after a metrics append" if appended and last_logged_step(out_dir) >= resumed_from + 2 else None


def start_main_py(out_dir: Path, args: list[str]) -> subprocess.Popen:
    """main.py in the background, its stderr into OUT_DIR.stderr beside out_dir (read by finish)."""
    command, env = main_py_command(out_dir, args)
    with open(f"{out_dir}.stderr", "w", encoding="utf-8") as stderr:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr)


def finish(proc: subprocess.Popen, out_dir: Path) -> None:
    assert proc.wait(timeout=300) == 0, Path(f"{out_dir}.stderr").read_text(encoding="utf-8")[-3000:]


def run_and_kill(out_dir: Path, args: list[str], kill_when) -> str | None:
    """main.py until kill_when(out_dir, resumed_from, started) names a moment, then SIGKILL; the moment, or None if
    the run ended first (it must then have succeeded)."""
    resumed_from, started = newest_complete_step(out_dir), time.time()
    proc = start_main_py(out_dir, args)
    try:
        while proc.poll() is None:
            moment = kill_when(out_dir, resumed_from, started)
            if moment:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return moment
            time.sleep(0.001)
    finally:
        if proc.poll() is None:  # the test failed while it ran
            proc.kill()
            proc.wait()
    finish(proc, out_dir)
    return None


@pytest.mark.slow  # three main.py processes one after the other, a fourth beside them
def test_sigkilled_run_resumes_byte_identical(tiny_tokenizer_dir, shards, tmp_path):
    """SIGKILL inside a checkpoint write (step_*.tmp on disk), then right after a metrics.jsonl append, each rerun
    with resume=auto: the final losses and final/ weights are those of a run never interrupted, byte for byte. A
    checkpoint every step keeps a write in progress most of the time, so the first moment comes early."""
    args = ["--stage", "pretrain", *pretrain_args(tiny_tokenizer_dir, shards, max_steps=10, save_every=1)]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    reference = start_main_py(straight, args)  # on the other core meanwhile
    try:
        crashed.mkdir()
        moments = [
            run_and_kill(crashed, args, kill_when) for kill_when in (inside_a_checkpoint_write, after_a_metrics_append)
        ]
        assert moments == ["inside a checkpoint write", "after a metrics append"]
        assert run_and_kill(crashed, args, lambda *_: None) is None  # resume=auto, to the end
        finish(reference, straight)
    finally:
        reference.kill()  # a no-op once it has ended
        reference.wait()
    records = [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(str(crashed))]
    assert [step for step, _, _ in records] == list(range(1, 11))  # every step once: the redone ones replaced
    assert records == [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(str(straight))]
    final = "final/model.safetensors"
    assert (crashed / final).read_bytes() == (straight / final).read_bytes()


def test_resuming_with_changed_settings_says_which(tiny_tokenizer_dir, shards, tmp_path, capsys):
    """A resume with another lr or seq_len said nothing; now each changed setting is named with both values, and
    the settings a resume is meant to change (max_steps, logging) are not."""
    out = tmp_path / "run"
    run_trainer(PretrainTrainer, make_pretrain_cfg(tiny_tokenizer_dir, shards, out, max_steps=4, eval_every=0))
    capsys.readouterr()
    changed = make_pretrain_cfg(tiny_tokenizer_dir, shards, out, max_steps=5, eval_every=0, lr=1e-3, seq_len=16)
    run_trainer(PretrainTrainer, changed)
    log = capsys.readouterr().out
    warnings = [line for line in log.splitlines() if "WARNING: resuming from" in line]
    assert len(warnings) == 2, log
    assert "with seq_len=16, but it was saved with seq_len=32" in warnings[0]  # in the Config's field order
    assert "with lr=0.001, but it was saved with lr=0.003" in warnings[1]
    run_trainer(
        PretrainTrainer,
        make_pretrain_cfg(tiny_tokenizer_dir, shards, out, max_steps=6, eval_every=0, lr=1e-3, seq_len=16),
    )
    assert "WARNING: resuming" not in capsys.readouterr().out  # the same settings as the checkpoint's


def sigkill_torchrun_after(out_dir: Path, args: list[str], step: int) -> None:
    """torchrun with 2 gloo processes until step_{step} is complete on disk, then SIGKILL to the whole group
    (torchrun and both workers at once: nothing is flushed, no lock released, no process group torn down)."""
    command, env = main_py_command(out_dir, args, processes=2)
    with open(f"{out_dir}.stderr", "w", encoding="utf-8") as stderr:
        proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 300
        while not (out_dir / f"step_{step:06d}" / "checksums.json").exists():
            # it must not end before the kill
            assert proc.poll() is None, Path(f"{out_dir}.stderr").read_text(encoding="utf-8")[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            # torchrun starts its workers in sessions of their own: stop the whole tree first (so no worker goes
            # on meanwhile), then kill every process in it
            tree = [proc.pid, *descendants(proc.pid)]
            for pid in tree:
                os.kill(pid, signal.SIGSTOP)
            tree += [pid for pid in descendants(proc.pid) if pid not in tree]
            for pid in tree:
                os.kill(pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and (out_dir / ".run.lock").exists()
    assert not (out_dir / "final").exists()  # killed mid-run, not after its end


def descendants(pid: int) -> list[int]:
    """Every process below pid (Linux /proc: no psutil in the requirements)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


@pytest.mark.slow  # five torchrun / main.py runs
def test_torchrun_resumes_after_a_sigkill_with_the_same_or_another_world_size(tiny_tokenizer_dir, shards, tmp_path):
    """2 gloo processes SIGKILLed mid-run (a checkpoint every step, so a write is often in progress), then rerun
    with resume=auto: with 2 processes the run ends as one never interrupted, loss for loss and weight for weight;
    with 1 process it goes on from the same checkpoint and its losses match too (the data position is global and
    pretraining has no dropout). The stale lock of the killed run is taken over each time."""
    args = ["--stage", "pretrain", *pretrain_args(tiny_tokenizer_dir, shards, max_steps=12, save_every=1)]
    args += ["lr_schedule=constant"]
    straight = tmp_path / "straight"
    run_main_py(straight, args, processes=2)
    for name, processes in (("two", 2), ("one", 1)):
        crashed = tmp_path / name
        sigkill_torchrun_after(crashed, args, step=3)
        resumed = run_main_py(crashed, args, processes=processes)
        assert "taking over the stale lock" in resumed.stdout and "resumed from" in resumed.stdout, resumed.stdout[
            :3000
        ]
        records = read_metrics(str(crashed))
        assert [r["step"] for r in records] == list(range(1, 13))  # every step once: redone ones replaced
        assert [r["loss"] for r in records] == pytest.approx(losses(straight), abs=1e-5 if processes == 2 else 1e-4)
        a = load_file(straight / "final" / "model.safetensors")
        b = load_file(crashed / "final" / "model.safetensors")
        assert all(torch.allclose(a[k], b[k], atol=1e-5 if processes == 2 else 1e-4) for k in a), name
        assert not (crashed / ".run.lock").exists()


def test_checkpoint_after_every_shard(tiny_tokenizer_dir, shards, tmp_path):
    meta = json.loads((Path(shards) / "meta.json").read_text())
    per_shard = (meta["train_shards"][0]["tokens"] - 1) // (16 * 64)
    cfg = make_pretrain_cfg(
        tiny_tokenizer_dir,
        shards,
        tmp_path / "run",
        max_steps=per_shard + 2,
        save_every=0,
        eval_every=0,
        global_batch_size=16,
        batch_size=16,
        seq_len=64,
    )
    run_trainer(PretrainTrainer, cfg)
    saved = sorted(p.name for p in Path(cfg.out_dir).glob("step_*"))
    assert f"step_{per_shard:06d}" in saved  # written when shard 0 ran out, without save_every


def test_torn_checkpoint_is_skipped(tiny_tokenizer_dir, shards, eight_steps, tmp_path, capsys):
    torn = run_copy(eight_steps, tmp_path) / "step_000010"
    torn.mkdir()
    (torn / "trainer_state.pt").write_bytes(b"\x80\x02 torn")
    trainer = PretrainTrainer(make_pretrain_cfg(tiny_tokenizer_dir, shards, tmp_path / "run", max_steps=8))
    trainer.prepare()
    assert trainer.step == 8
    out = capsys.readouterr().out
    assert "skipping unreadable checkpoint" in out
    assert "micro-batch 4 x accum 2 = global batch 8 sequences" in out
    # A step returns its tokens (all ranks) with its metrics; nothing passes between methods on the side.
    metrics, tokens = trainer.train_step()
    assert tokens == 8 * 32 and trainer.tokens_seen == 9 * 8 * 32 and set(metrics) >= {"loss", "lr", "grad_norm"}


def test_accumulation_equals_large_batch(tiny_tokenizer_dir, shards, tmp_path):
    big = make_pretrain_cfg(tiny_tokenizer_dir, shards, tmp_path / "big", batch_size=8, max_steps=6)
    small = make_pretrain_cfg(tiny_tokenizer_dir, shards, tmp_path / "small", batch_size=2, max_steps=6)
    run_trainer(PretrainTrainer, big)
    run_trainer(PretrainTrainer, small)
    assert losses(big.out_dir) == pytest.approx(losses(small.out_dir), rel=2e-5)  # fp32 summation order only


def test_chunked_loss_trains_the_same(tiny_tokenizer_dir, shards, tmp_path):
    plain = make_pretrain_cfg(tiny_tokenizer_dir, shards, tmp_path / "plain", max_steps=4, eval_every=2)
    chunked = make_pretrain_cfg(
        tiny_tokenizer_dir, shards, tmp_path / "chunked", max_steps=4, eval_every=2, loss_chunk=48
    )
    run_trainer(PretrainTrainer, plain)
    run_trainer(PretrainTrainer, chunked)
    assert losses(chunked.out_dir) == pytest.approx(losses(plain.out_dir), rel=1e-5)
    evals = [[r["loss"] for r in read_metrics(c.out_dir, split="eval")] for c in (plain, chunked)]
    assert len(evals[0]) == 2 and evals[1] == pytest.approx(evals[0], rel=1e-5)


def test_batch_size_auto_probes_and_keeps_the_global_batch(tiny_tokenizer_dir, shards, tmp_path, monkeypatch):
    """The CUDA probe, on CPU: a forward that runs "out of memory" above 16 sequences. The probe must keep the last
    micro-batch that fit, halved for headroom, and set accumulation so the global batch stays 64."""
    from model import SLMForCausalLM

    forward = SLMForCausalLM.forward

    def limited(self, input_ids=None, **kwargs):
        if input_ids is not None and input_ids.shape[0] > 16:
            raise torch.OutOfMemoryError("fake: over 16 sequences")
        return forward(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(SLMForCausalLM, "forward", limited)
    monkeypatch.setattr(PretrainTrainer, "_auto_micro_batch", lambda self: self._probe_micro_batch())
    trainer = PretrainTrainer(
        make_pretrain_cfg(
            tiny_tokenizer_dir, shards, tmp_path / "auto", batch_size="auto", global_batch_size=64, max_steps=1
        )
    )
    trainer.prepare()
    assert (trainer.micro_batch, trainer.accum_steps, trainer.global_batch) == (8, 8, 64)
    assert all(p.grad is None for p in trainer.raw_model.parameters())  # the probe leaves no gradients behind
    # When everything up to the per-process target fits, there is no need for headroom.
    trainer = PretrainTrainer(
        make_pretrain_cfg(
            tiny_tokenizer_dir, shards, tmp_path / "fits", batch_size="auto", global_batch_size=16, max_steps=1
        )
    )
    trainer.prepare()
    assert (trainer.micro_batch, trainer.accum_steps) == (16, 1)


@pytest.mark.slow
def test_ddp_two_processes_match_one(tiny_tokenizer_dir, shards, tmp_path):
    # a constant lr: the schedule then does not depend on max_steps (the resume below extends it); 3 val batches
    # over 2 ranks
    args = pretrain_args(tiny_tokenizer_dir, shards, lr_schedule="constant", eval_batches=3)
    run_main_py(tmp_path / "one", ["--stage", "pretrain", *args])
    run_main_py(tmp_path / "two", ["--stage", "pretrain", *args], processes=2)
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-4)
    evals = [[r["loss"] for r in read_metrics(str(tmp_path / d), split="eval")] for d in ("one", "two")]
    assert len(evals[0]) == 1 and evals[1] == pytest.approx(evals[0], abs=1e-4)
    state = torch.load(tmp_path / "two" / "step_000005" / "trainer_state.pt", weights_only=False)
    assert len(state["rng"]) == 2 and state["data"]["offset"] == 5 * 8 * 32
    # Resume the 2-process run with 1 process: the token position is global, so steps 6-7 read the same tokens as
    # a 1-process run that was never interrupted (pretraining has no dropout, so the RNG layout does not matter).
    longer = [a for a in args if not a.startswith("max_steps=")] + ["max_steps=7"]
    for name in ("two", "straight"):
        run_main_py(tmp_path / name, ["--stage", "pretrain", *longer])
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "straight"), abs=1e-4)
    state = torch.load(tmp_path / "two" / "step_000007" / "trainer_state.pt", weights_only=False)
    assert len(state["rng"]) == 1 and state["data"]["offset"] == 7 * 8 * 32


def test_bad_inputs_fail_clearly(tiny_tokenizer_dir, shards, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_trainer(PretrainTrainer, make_pretrain_cfg(tiny_tokenizer_dir, str(tmp_path / "nope"), tmp_path / "a"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="meta.json"):
        run_trainer(PretrainTrainer, make_pretrain_cfg(tiny_tokenizer_dir, str(empty), tmp_path / "b"))
    meta = json.loads((Path(shards) / "meta.json").read_text())
    for change, message in (({"vocab_size": 100000}, "vocab_size"), ({"tokenizer_fingerprint": "0" * 16}, "tokenizer")):
        other = tmp_path / f"other_{message}"
        other.mkdir()
        for f in Path(shards).iterdir():
            (other / f.name).write_bytes(f.read_bytes())
        (other / "meta.json").write_text(json.dumps({**meta, **change}))
        with pytest.raises(ValueError, match=message):
            run_trainer(PretrainTrainer, make_pretrain_cfg(tiny_tokenizer_dir, str(other), tmp_path / "c"))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        run_trainer(PretrainTrainer, make_pretrain_cfg(tiny_tokenizer_dir, shards, tmp_path / "d", seq_len=4096))


class NanAtStep3(PretrainTrainer):
    def compute_loss(self, *, batch, num_items):
        loss, metrics = super().compute_loss(batch=batch, num_items=num_items)
        return (loss * float("nan") if self.step == 2 else loss), metrics


def test_nan_loss_stops_with_last_good_checkpoint(tiny_tokenizer_dir, shards, tmp_path):
    cfg = make_pretrain_cfg(tiny_tokenizer_dir, shards, tmp_path / "nan", save_every=0)
    with pytest.raises(TrainingStopped, match="not finite at step 3") as err:
        run_trainer(NanAtStep3, cfg)
    # The NaN step was skipped on the device (trainer/guard.py) and counts as a step: the state saved when it is
    # noticed, at step 3 here (log_every=1), holds the weights of step 2. tests/test_step_guard.py checks more.
    assert "step_000003" in str(err.value)
    good = load_file(Path(cfg.out_dir) / "step_000003" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in good.values())


# -----------------------------------------------------------------------------
# A checkpoint is data, not code; its bytes are checked; a torn metrics line does not block resuming


class WritesAMarker:
    """A pickle payload: unpickling it calls open(marker, "w"), i.e. creates the file (any code could run)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_checkpoint_that_carries_code_is_refused_not_run(tiny_tokenizer_dir, shards, eight_steps, tmp_path, capsys):
    from trainer.checkpoint import CheckpointError, write_checksums

    newest = run_copy(eight_steps, tmp_path) / "step_000008"
    marker = tmp_path / "pwned"
    state = torch.load(newest / "trainer_state.pt", weights_only=False)
    torch.save({**state, "extra": {"payload": WritesAMarker(marker)}}, newest / "trainer_state.pt")
    write_checksums(str(newest))  # an attacker rewrites the manifest too: only the loader can stop this
    capsys.readouterr()
    trainer = PretrainTrainer(make_pretrain_cfg(tiny_tokenizer_dir, shards, tmp_path / "run", max_steps=8))
    trainer.prepare()  # resume=auto: the crafted one is skipped, the one before used
    assert trainer.step == 4 and not marker.exists()
    out = capsys.readouterr().out
    assert f"skipping unreadable checkpoint {newest}" in out
    assert "trainer_state.pt: refused" in out and "would run code" in out and "io.open" in out
    explicit = PretrainTrainer(make_pretrain_cfg(tiny_tokenizer_dir, shards, tmp_path / "run", resume=str(newest)))
    with pytest.raises(CheckpointError, match=r"step_000008/trainer_state.pt: refused.*would run code"):
        explicit.prepare()
    assert not marker.exists()
    torch.load(newest / "trainer_state.pt", weights_only=False)  # the payload is live: loaded unsafely, it runs
    assert marker.exists()


def flip_one_byte(path: Path, at: int = 4096) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_corrupted_checkpoint_is_skipped_or_refused(tiny_tokenizer_dir, shards, eight_steps, tmp_path, capsys):
    from trainer.checkpoint import CheckpointError

    run = run_copy(eight_steps, tmp_path)
    sums = json.loads((run / "step_000008" / "checksums.json").read_text())["sha256"]
    assert {"model.safetensors", "trainer_state.pt", "config.json", "tokenizer.json"} <= set(sums)
    flip_one_byte(run / "step_000008" / "model.safetensors")  # still a loadable safetensors file
    assert load_file(run / "step_000008" / "model.safetensors")
    capsys.readouterr()
    trainer = PretrainTrainer(make_pretrain_cfg(tiny_tokenizer_dir, shards, run, max_steps=8))
    trainer.prepare()
    assert trainer.step == 4
    out = capsys.readouterr().out
    assert "skipping unreadable checkpoint" in out and "step_000008/model.safetensors: SHA-256 differs" in out
    # The only checkpoint, named explicitly: an error, not a silent resume.
    only = make_pretrain_cfg(tiny_tokenizer_dir, shards, tmp_path / "only", max_steps=4)
    run_trainer(PretrainTrainer, only)
    flip_one_byte(Path(only.out_dir) / "step_000004" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"step_000004/model.safetensors: SHA-256 differs"):
        PretrainTrainer(
            make_pretrain_cfg(tiny_tokenizer_dir, shards, only.out_dir, resume=str(Path(only.out_dir) / "step_000004"))
        ).prepare()
    # A checkpoint from before checksums (no manifest) still resumes, with a note that says so.
    (run / "step_000004" / "checksums.json").unlink()
    shutil_rmtree(run / "step_000008")
    capsys.readouterr()
    trainer = PretrainTrainer(make_pretrain_cfg(tiny_tokenizer_dir, shards, run, max_steps=8))
    trainer.prepare()
    assert trainer.step == 4 and "has no checksums.json (written before checksums)" in capsys.readouterr().out


def test_a_corrupted_final_is_refused_by_the_next_stage(tiny_tokenizer_dir, shards, tmp_path):
    from trainer.config import ConfigError, validate

    run_trainer(PretrainTrainer, make_pretrain_cfg(tiny_tokenizer_dir, shards, tmp_path / "base", max_steps=2))
    final = tmp_path / "base" / "final"
    sums = json.loads((final / "checksums.json").read_text())["sha256"]
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= set(sums)
    next_stage = make_pretrain_cfg(tiny_tokenizer_dir, shards, tmp_path / "next", init_from=str(final), max_steps=2)
    validate(next_stage)  # intact: accepted
    flip_one_byte(final / "model.safetensors")
    with pytest.raises(ConfigError, match=rf"config key 'init_from': {final}/model.safetensors: SHA-256 differs"):
        run_trainer(PretrainTrainer, next_stage)
    assert not (tmp_path / "next").exists()  # refused before anything was built or written


def shutil_rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path)


def test_a_torn_metrics_line_does_not_block_resume(tiny_tokenizer_dir, shards, straight, tmp_path, capsys):
    crashed = make_pretrain_cfg(tiny_tokenizer_dir, shards, tmp_path / "crashed")
    with pytest.raises(Interrupted):
        run_trainer(DiesAtStep7, crashed)
    metrics = Path(crashed.out_dir) / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    torn_middle = lines[1][:25] + "\n"  # a line of an earlier step, cut short (e.g. by an earlier crash)
    metrics.write_text("".join([lines[0], torn_middle, *lines[1:]]) + '{"step": 6, "split": "tr')  # no newline
    capsys.readouterr()
    run_trainer(PretrainTrainer, crashed)  # resume=auto, past both torn lines
    out = capsys.readouterr().out
    assert f"{metrics}:2: dropping a torn or malformed line" in out
    assert f"{metrics}:{len(lines) + 2}: dropping a torn or malformed line" in out
    assert losses(crashed.out_dir) == losses(straight.out_dir)  # both torn lines gone, the run reads whole
