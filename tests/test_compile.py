"""compile=true that pays: over a real stage's first batches the model compiles to one graph per padded length,
with no graph break and no recompile for a length already seen (pretrain, MoE pretrain, SFT unpacked and packed,
DPO, the reward model).

Dynamo's graph capture decides graphs, breaks and recompiles; the backend only turns each captured graph into
code. The tests run the aot_eager backend (dynamo plus AOTAutograd's joint forward/backward trace, no Inductor
code generation), which counts the same graphs as Inductor at a fraction of the CPU time.

    python -m pytest tests/test_compile.py
"""

import functools
import json

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import AutoTokenizer

from dataset.chat_data import length_bucket
from tests.helpers import spawn_ranks, tiny_checkpoint, write_chat_file, write_shards
from tests.helpers_preference import toy_pairs, write_pairs

pytestmark = pytest.mark.slow

STEPS = 5
COMMON = dict(
    batch_size=4,
    global_batch_size=8,
    seq_len=32,
    lr=1e-3,
    warmup_steps=0,
    lr_schedule="constant",
    eval_every=0,
    save_every=0,
    log_every=100,
    device="cpu",
    dtype="fp32",
    seed=0,
    compile=True,
)


@pytest.fixture
def aot_eager(monkeypatch):
    """trainer/core.py calls torch.compile(model, dynamic=False); give it the cheap backend."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))


@pytest.fixture(scope="module")
def checkpoint(tiny_tokenizer_dir, tmp_path_factory) -> str:
    return tiny_checkpoint(tiny_tokenizer_dir, str(tmp_path_factory.mktemp("ckpt") / "final"))


def first_steps(trainer) -> list[int]:
    """prepare(), then STEPS optimizer steps from a clean dynamo state; returns the padded length of every
    micro-batch the model saw."""
    trainer.prepare()
    assert isinstance(trainer.model, torch._dynamo.eval_frame.OptimizedModule)
    torch._dynamo.reset()
    counters.clear()
    lengths = []
    next_step = trainer.next_step

    def recording_next_step():
        batches = next_step()
        lengths.extend((b[0] if isinstance(b, tuple) else b["input_ids"]).shape[1] for b in batches)
        return batches

    trainer.next_step = recording_next_step
    graphs_after = []
    for _ in range(STEPS):
        trainer.train_step()
        graphs_after.append(counters["stats"]["unique_graphs"])
    breaks = sum(counters["graph_break"].values())
    assert breaks == 0, dict(counters["graph_break"])
    # One graph per distinct padded length, compiled the first time it shows up and never again.
    assert graphs_after[-1] == len(set(lengths)), (graphs_after, lengths)
    seen = []
    for step in range(STEPS):
        seen += lengths[step * trainer.accum_steps : (step + 1) * trainer.accum_steps]
        assert graphs_after[step] == len(set(seen)), (graphs_after, lengths)
    return lengths


def test_pretrain_one_graph(tiny_tokenizer_dir, tmp_path, aot_eager):
    from tests.helpers import pretrain_corpus as corpus
    from trainer.pretrain import Config, PretrainTrainer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    shards = write_shards(tok, corpus(200), str(tmp_path / "shards"), n_shards=1)
    cfg = Config(
        model_config="tiny",
        tokenizer_dir=tiny_tokenizer_dir,
        data_dir=shards,
        out_dir=str(tmp_path / "o"),
        sample_tokens=0,
        **COMMON,
    )
    assert set(first_steps(PretrainTrainer(cfg))) == {32}
    assert counters["stats"]["unique_graphs"] == 1


def test_moe_pretrain_one_graph(tiny_tokenizer_dir, tmp_path, aot_eager):
    """MoE compiles through the all-experts path (static shapes): no break at routing."""
    from tests.helpers import pretrain_corpus as corpus
    from trainer.pretrain import Config, PretrainTrainer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    shards = write_shards(tok, corpus(200), str(tmp_path / "shards"), n_shards=1)
    preset = tmp_path / "tiny_moe.json"
    preset.write_text(
        json.dumps(
            {
                "vocab_size": len(tok),
                "hidden_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "max_position_embeddings": 128,
                "tie_word_embeddings": True,
                "use_moe": True,
                "num_experts": 4,
                "num_experts_per_tok": 2,
                "num_shared_experts": 1,
                "moe_intermediate_size": 64,
            }
        )
    )
    cfg = Config(
        model_config=str(preset),
        tokenizer_dir=tiny_tokenizer_dir,
        data_dir=shards,
        out_dir=str(tmp_path / "o"),
        sample_tokens=0,
        **COMMON,
    )
    assert set(first_steps(PretrainTrainer(cfg))) == {32}
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("pack", [False, True])
def test_sft_one_graph_per_bucket(checkpoint, tmp_path, aot_eager, pack):
    from trainer.sft import Config, SFTTrainer

    data = write_chat_file(tmp_path / "chat.jsonl", n_copies=4)
    cfg = Config(
        init_from=checkpoint,
        out_dir=str(tmp_path / "o"),
        data_path=data,
        pack=pack,
        val_samples=0,
        placeholders="name=Milli-Chat",
        **COMMON,
    )
    lengths = first_steps(SFTTrainer(cfg))
    assert all(T == length_bucket(T, cfg.seq_len) for T in lengths)  # only bucket lengths reach the model


def test_dpo_one_graph_per_bucket(checkpoint, tmp_path, aot_eager):
    from trainer.dpo import Config, DPOTrainer

    data = write_pairs(str(tmp_path / "pairs.jsonl"), toy_pairs(32), "strings")
    cfg = Config(init_from=checkpoint, out_dir=str(tmp_path / "o"), data_path=data, val_samples=0, **COMMON)
    lengths = first_steps(DPOTrainer(cfg))
    assert all(T == length_bucket(T, cfg.seq_len) for T in lengths)


def test_reward_one_graph_per_bucket(checkpoint, tmp_path, aot_eager):
    from trainer.reward import Config, RewardTrainer

    data = write_pairs(str(tmp_path / "pairs.jsonl"), toy_pairs(32), "strings")
    cfg = Config(init_from=checkpoint, out_dir=str(tmp_path / "o"), data_path=data, val_samples=0, **COMMON)
    lengths = first_steps(RewardTrainer(cfg))
    assert all(T == length_bucket(T, cfg.seq_len) for T in lengths)


def _compiled_ddp_worker(rank: int, tokenizer_dir: str, shards: str, out_dir: str) -> dict:
    """One rank of a 2-process gloo run (spawn_ranks' group) of the real PretrainTrainer with compile=true."""
    import logging
    import os

    # The Trainer joins torchrun's group from these; spawn_ranks has already joined it.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(torch.distributed.get_world_size()))
    torch.compile = functools.partial(torch.compile, backend="aot_eager")  # this spawned process only
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: records.append(record.getMessage())
    ddp_log = logging.getLogger("torch._dynamo.backends.distributed")
    ddp_log.setLevel(logging.INFO)
    ddp_log.addHandler(handler)
    from trainer.pretrain import Config, PretrainTrainer

    cfg = Config(
        model_config="tiny", tokenizer_dir=tokenizer_dir, data_dir=shards, out_dir=out_dir, sample_tokens=0, **COMMON
    )
    os.makedirs(out_dir, exist_ok=True)
    trainer = PretrainTrainer(cfg)
    trainer.prepare()
    wrapping = [type(trainer.model).__name__, type(trainer.model.module).__name__]
    losses = [float(trainer.train_step()[0]["loss"]) for _ in range(2)]
    weights = trainer.raw_model.model.layers[0].mlp.up_proj.weight.detach()
    return {"wrapping": wrapping, "losses": losses, "weights": weights, "log": records}


def test_ddp_wraps_the_compiled_module_and_dynamo_splits_at_its_buckets(tiny_tokenizer_dir, tmp_path):
    """DDP outside, the compiled module inside (the torch docs' order): dynamo sees the active DDP module and its
    DDPOptimizer splits the graph at DDP's gradient buckets, which is what lets all-reduce overlap backward."""
    from tests.helpers import pretrain_corpus as corpus

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    shards = write_shards(tok, corpus(200), str(tmp_path / "shards"), n_shards=1)
    ranks = spawn_ranks(_compiled_ddp_worker, (tiny_tokenizer_dir, shards, str(tmp_path / "o")), tmp_path, timeout=400)
    for result in ranks:
        assert result["wrapping"] == ["DistributedDataParallel", "OptimizedModule"]
        assert any("DDPOptimizer used bucket cap" in line for line in result["log"]), result["log"]
    assert ranks[0]["losses"] == ranks[1]["losses"]  # the loss is all-reduced for logging
    assert torch.equal(ranks[0]["weights"], ranks[1]["weights"])  # gradients were averaged: ranks stay in sync
