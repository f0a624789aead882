"""Test helpers (plain functions; fixtures live in conftest.py, and no test module imports another or conftest):
the one tiny-model builder (tiny_config, tiny_model), token shards written straight in the shard format
(dataset/shard_writer.py write_token_shards, independent of prepare_shards), the tiny corpus and chat files,
save_to_disk folders, metrics readers, main.py in a subprocess, a short fine-tune."""

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dataset.shard_writer import write_token_shards


def write_shards(tokenizer, texts: list[str], out_dir: str, n_shards: int = 3, val_fraction: float = 0.1) -> str:
    """Tokenise `texts` (EOS after each), split into train shards and a val shard, write meta.json."""
    ids = []
    for text in texts:
        ids += tokenizer.encode(text) + [tokenizer.eos_token_id]
    arr = np.array(ids, dtype=np.int64)
    n_val = int(len(arr) * val_fraction)
    return write_token_shards(out_dir, tokenizer, np.array_split(arr[n_val:], n_shards), arr[:n_val])


def read_metrics(out_dir: str, split: str = "train") -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


ROOT = Path(__file__).resolve().parents[1]
# the real data pack, when present (tests skip without it); MILLI_SHARED_DATA points elsewhere (a worktree's checkout)
SHARED_DATA = Path(os.environ.get("MILLI_SHARED_DATA", ROOT.parent / "shared" / "data"))
SHARED_SFT = SHARED_DATA / "sft"


# -----------------------------------------------------------------------------
# The one tiny-model builder


def tiny_config(vocab_size: int | None = None, **overrides):
    """The tiny preset (config/model/tiny.json: 4 layers, hidden 128, 4 query / 2 KV heads, vocab 512); overrides
    change any config field."""
    from model import SLMConfig

    return SLMConfig.from_preset("tiny", **({"vocab_size": vocab_size} if vocab_size else {}), **overrides)


def tiny_model(vocab_size: int | None = None, seed: int = 0, **overrides):
    """A causal LM of the tiny preset, its random init fixed by `seed` (tiny_config: overrides change any field)."""
    from model import SLMForCausalLM

    torch.manual_seed(seed)
    return SLMForCausalLM(tiny_config(vocab_size, **overrides))


def tiny_checkpoint(tokenizer_dir: str, path: str, layers: int = 2, seed: int = 0, **overrides) -> str:
    """A random tiny causal LM plus the tokenizer, saved as a stage's final/ would be (2 layers: enough to memorise a
    few conversations, half the CPU time)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tiny_model(len(tok), seed=seed, num_hidden_layers=layers, **overrides).save_pretrained(path)
    tok.save_pretrained(path)
    return path


# -----------------------------------------------------------------------------
# Pretraining text and chat files


_ZH = "我们今天学习数学和语言。人工智能是计算机科学的一个分支。春眠不觉晓，处处闻啼鸟。北京是中国的首都。天气很好，我们去公园散步吧。"  # noqa: E501
_ZH += "床前明月光，疑是地上霜。举头望明月，低头思故乡。机器学习需要大量的数据和计算资源。小明每天早上七点起床，然后去学校上课。"  # noqa: E501
_EN = [
    "the model learns",
    "language is data",
    "hello world",
    "a small chat model",
    "tokens per second",
    "training on the laptop",
    "Beijing is a big city",
    "machine learning needs data",
]


def tiny_corpus_lines(n: int = 300, seed: int = 0) -> list[str]:
    """Deterministic mixed Chinese/English lines: random Chinese spans joined with English phrases (the tiny
    tokenizer of conftest.py is trained on tiny_corpus_lines())."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        i = rng.randrange(len(_ZH) - 12)
        lines.append(f"{_ZH[i : i + rng.randrange(6, 24)]} {rng.choice(_EN)} {rng.randrange(1000)}。")
    return lines


def pretrain_corpus(n: int = 600) -> list[str]:
    rng = random.Random(0)
    words = [
        "北京是中国的首都。",
        "今天天气很好。",
        "我们学习数学。",
        "春眠不觉晓。",
        "hello world.",
        "人工智能是科学。",
    ]
    return ["".join(rng.choice(words) for _ in range(rng.randrange(2, 6))) for _ in range(n)]


# Eight short conversations in the tiny tokenizer's vocabulary; the last one tests placeholder filling.
PAIRS = [
    ("中国的首都是哪里？", "北京是中国的首都。"),
    ("春眠不觉晓的下一句？", "处处闻啼鸟。"),
    ("人工智能是什么？", "人工智能是计算机科学的一个分支。"),
    ("今天天气怎么样？", "天气很好，我们去公园散步吧。"),
    ("我们今天学习什么？", "我们今天学习数学和语言。"),
    ("hello world", "the model learns"),
    ("a small chat model", "tokens per second"),
    ("你是谁？", "我是{{name}}。"),
]


def write_chat_file(path, n_copies: int = 1) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n_copies):
            for user, reply in PAIRS:
                msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
                f.write(json.dumps({"conversations": msgs}, ensure_ascii=False) + "\n")
    return str(path)


def write_saved_dataset(folder, table, n_files: int = 2) -> str:
    """A pyarrow table as a `datasets` save_to_disk folder, laid out as `datasets` writes one: the rows in n_files
    Arrow IPC streams data-0000k-of-0000n.arrow, listed in state.json, beside dataset_info.json."""
    import pyarrow.ipc

    os.makedirs(folder)
    step = -(-table.num_rows // n_files)  # ceil: every file but the last has `step` rows
    files = []
    for k in range(n_files):
        name = f"data-{k:05d}-of-{n_files:05d}.arrow"
        with pyarrow.ipc.new_stream(os.path.join(folder, name), table.schema) as w:
            w.write_table(table.slice(k * step, step))
        files.append({"filename": name})
    with open(os.path.join(folder, "state.json"), "w", encoding="utf-8") as f:
        json.dump({"_data_files": files, "_split": "train"}, f)
    with open(os.path.join(folder, "dataset_info.json"), "w", encoding="utf-8") as f:
        json.dump({"features": {}}, f)
    return str(folder)


def make_pretrain_cfg(tiny_tokenizer_dir, shards, out_dir, **overrides):
    """A 12-step tiny pretraining run over the `shards` fixture; overrides change any key."""
    from trainer.pretrain import Config

    base = dict(
        model_config="tiny",
        tokenizer_dir=tiny_tokenizer_dir,
        data_dir=shards,
        out_dir=str(out_dir),
        max_steps=12,
        batch_size=4,
        global_batch_size=8,
        seq_len=32,
        lr=3e-3,
        warmup_steps=2,
        log_every=1,
        eval_every=6,
        eval_batches=2,
        save_every=4,
        keep_last=10,
        sample_tokens=0,
        seed=7,
    )
    return Config(**{**base, **overrides})


def losses(out_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(str(out_dir))]


# -----------------------------------------------------------------------------
# Running stages: main.py in a subprocess (one process or torchrun), a short fine-tune in this one


def pretrain_args(tokenizer_dir: str, shards: str, **overrides) -> list[str]:
    """key=value arguments of a 5-step tiny pretraining for main.py (the multi-process tests' shared setting)."""
    settings = dict(
        tokenizer_dir=tokenizer_dir,
        data_dir=shards,
        model_config="tiny",
        max_steps=5,
        batch_size=4,
        global_batch_size=8,
        seq_len=32,
        lr=3e-3,
        warmup_steps=2,
        log_every=1,
        eval_every=0,
        eval_batches=2,
        sample_tokens=0,
        save_every=0,
        seed=7,
    )
    return [f"{key}={value}" for key, value in {**settings, **overrides}.items()]


def main_py_command(out_dir, args: list[str], processes: int = 1) -> tuple[list[str], dict]:
    """(command, environment) of `python main.py ARGS out_dir=OUT_DIR`, under torchrun with `processes` > 1 (gloo
    on CPU), one thread each; run from ROOT."""
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        if processes > 1
        else [sys.executable]
    )
    return [*launcher, "main.py", *args, f"out_dir={out_dir}"], {**os.environ, "OMP_NUM_THREADS": "1"}


def run_main_py(
    out_dir, args: list[str], processes: int = 1, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess:
    """main_py_command run to its end; check=True asserts it succeeded."""
    command, env = main_py_command(out_dir, args, processes)
    # A rank that skipped a forward the others ran would hang its collective: the timeout turns that into a failure.
    result = run_killing_all_on_timeout(command, env, timeout)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def run_killing_all_on_timeout(command: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """`command` run from ROOT to its end; past `timeout` it and every process it started are killed and an
    AssertionError says so. torchrun starts its workers in sessions of their own, so they are found by a tag in their
    environment (every process of this run, and only those, inherits it); an orphaned worker would otherwise keep
    the output pipes open and communicate() would wait for it forever."""
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    with subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**env, "MILLI_TEST_RUN": tag},
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for pid in processes_tagged(tag):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            raise AssertionError(f"did not finish in {timeout:.0f} s: {' '.join(command)}\n{stderr[-3000:]}") from None
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def processes_tagged(tag: str) -> list[int]:
    """The PIDs whose environment holds MILLI_TEST_RUN=tag (Linux /proc; tests run there)."""
    needle = f"MILLI_TEST_RUN={tag}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):  # gone meanwhile, or not ours to read
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        pids.append(int(entry))
    return pids


def fine_tune(init_from: str, data_path: str, out_dir: str, seq_len: int, batch: int, max_steps: int) -> str:
    """SFT at a high constant lr until a tiny model has memorised `data_path`; returns its final/ folder."""
    from trainer.core import run_trainer
    from trainer.sft import Config, SFTTrainer

    cfg = Config(
        init_from=init_from,
        data_path=str(data_path),
        out_dir=str(out_dir),
        seq_len=seq_len,
        batch_size=batch,
        global_batch_size=batch,
        lr=3e-3,
        warmup_steps=0,
        lr_schedule="constant",
        weight_decay=0.0,
        val_samples=0,
        eval_every=0,
        save_every=0,
        log_every=20,
        max_steps=max_steps,
        device="cpu",
        dtype="fp32",
        seed=0,
    )
    run_trainer(SFTTrainer, cfg)
    return os.path.join(cfg.out_dir, "final")


# -----------------------------------------------------------------------------
# Several ranks in this test: spawned processes joined over a file, not a port


def spawn_ranks(worker, args: tuple, tmp_path, processes: int = 2, timeout: float = 300) -> list:
    """Run worker(rank, *args) in `processes` spawned processes of one gloo group and return what each returned.

    The group meets in a file under tmp_path (no port to pick, so none to collide with). A rank is done when its
    result file is written: it then leaves with os._exit, skipping destroy_process_group and the interpreter's
    exit, where gloo's threads can hang a finished process. The children are killed once all results are there.
    A rank that fails or hangs fails the test with every rank's exit code and its error or, after 0.8 x timeout,
    the stacks of all its threads (faulthandler)."""
    import pytest
    import torch.multiprocessing as mp

    ranks_dir = Path(tmp_path) / "ranks"
    ranks_dir.mkdir(parents=True, exist_ok=False)
    ctx = mp.get_context("spawn")
    stacks_at = time.time() + 0.8 * timeout  # when a rank still running dumps its stacks
    children = [
        ctx.Process(target=_rank_main, args=(rank, processes, str(ranks_dir), stacks_at, worker, args))
        for rank in range(processes)
    ]
    for child in children:
        child.start()
    results = [ranks_dir / f"rank{rank}.pt" for rank in range(processes)]
    deadline = time.monotonic() + timeout
    try:
        while not all(path.exists() for path in results):
            failed = any(child.exitcode not in (None, 0) for child in children)
            if failed or time.monotonic() > deadline:
                reports = []
                for rank, child in enumerate(children):
                    report = [f"rank {rank}: exit code {child.exitcode}"]
                    for kind in ("error", "stack"):
                        path = ranks_dir / f"rank{rank}.{kind}"
                        if path.exists() and path.stat().st_size:
                            report.append(path.read_text()[-3000:])
                    reports.append("\n".join(report))
                what = "a rank failed" if failed else f"the ranks did not finish in {timeout:.0f} s"
                pytest.fail(f"{what}\n" + "\n\n".join(reports))
            time.sleep(0.2)
    finally:
        for child in children:
            child.kill()
            child.join()
    return [torch.load(path) for path in results]


def _rank_main(rank: int, processes: int, ranks_dir: str, stacks_at: float, worker, args: tuple) -> None:
    """One spawned rank of spawn_ranks. The result is written to a temporary name and renamed, so the parent
    never reads half a file."""
    import faulthandler
    import traceback
    from datetime import timedelta

    import torch.distributed as dist

    stack = open(os.path.join(ranks_dir, f"rank{rank}.stack"), "w", encoding="utf-8")
    faulthandler.dump_traceback_later(max(1.0, stacks_at - time.time()), file=stack)
    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"file://{os.path.join(ranks_dir, 'group')}",
            rank=rank,
            world_size=processes,
            timeout=timedelta(seconds=max(1.0, stacks_at - time.time())),
        )
        result = worker(rank, *args)
        path = os.path.join(ranks_dir, f"rank{rank}.pt")
        torch.save(result, path + ".tmp")
        os.replace(path + ".tmp", path)
        code = 0
    except BaseException:
        with open(os.path.join(ranks_dir, f"rank{rank}.error"), "w", encoding="utf-8") as f:
            f.write(traceback.format_exc())
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
