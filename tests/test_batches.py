"""
dataset/batches.py: the StepBatches protocol the loop draws from, and IndexBatches (in-memory samples) against it.

    python -m pytest tests/test_batches.py
"""

from dataset.batches import IndexBatches, StepBatches
from dataset.shards import ShardStream
from tests.helpers import write_shards


def test_shard_stream_and_index_batches_satisfy_the_protocol(tiny_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    from dataset.shards import load_meta

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    data_dir = write_shards(tok, ["北京是中国的首都。今天天气很好。"] * 60, str(tmp_path / "shards"), n_shards=2)
    stream = ShardStream(data_dir, load_meta(data_dir), seq_len=16, global_batch=4, micro_batch=2)
    assert isinstance(stream, StepBatches) and isinstance(IndexBatches(list(range(8)), 4, 2, collate=list), StepBatches)
    assert not isinstance(object(), StepBatches)


def collect(batches: IndexBatches, steps: int) -> list:
    return [[list(m) for m in batches.next_step()] for _ in range(steps)]


def test_index_batches_resume_exactly_and_split_the_step_over_ranks():
    data = list(range(10))  # 10 samples, a global batch of 4: each epoch drops a ragged tail of 2
    one = IndexBatches(data, 4, 2, seed=3, collate=list)
    steps = collect(one, 6)
    assert all(len(s) == 2 and all(len(m) == 2 for m in s) for s in steps)  # 2 micro-batches of 2 per step
    for epoch in (steps[0:2], steps[2:4]):  # within an epoch no sample repeats
        seen = [i for s in epoch for m in s for i in m]
        assert len(set(seen)) == len(seen) == 8
    assert steps[0:2] != steps[2:4]  # every epoch is its own permutation
    # Resume from the position after 3 steps: the same batches follow.
    first = IndexBatches(data, 4, 2, seed=3, collate=list)
    collect(first, 3)
    resumed = IndexBatches(data, 4, 2, seed=3, collate=list)
    resumed.load_state_dict(first.state_dict())
    assert collect(resumed, 3) == steps[3:]
    # Two ranks take the two halves of the same global batch (micro-batch 1 each).
    ranks = [IndexBatches(data, 4, 1, rank=r, world_size=2, seed=3, collate=list) for r in range(2)]
    for step in steps:
        together = [i for r in ranks for m in r.next_step() for i in m]
        assert together == [i for m in step for i in m]


def test_prefetch_hands_out_the_same_steps_and_saves_the_handed_out_position(tiny_tokenizer_dir, tmp_path):
    """PrefetchBatches builds the next step in a thread; its state_dict() and the source's attributes
    (ShardStream.shard_done) must still describe the step last handed out, so a checkpoint resumes exactly."""
    import threading

    from transformers import AutoTokenizer

    from dataset.batches import PrefetchBatches
    from dataset.shards import load_meta

    data = list(range(10))
    plain, ahead = (
        IndexBatches(data, 4, 2, seed=3, collate=list),
        PrefetchBatches(IndexBatches(data, 4, 2, seed=3, collate=list)),
    )
    assert isinstance(ahead, StepBatches)
    assert collect(ahead, 3) == collect(plain, 3)
    assert ahead.state_dict() == plain.state_dict()  # the position after 3 steps, though step 4 is built
    ahead._pending.result()  # let the prefetch finish: the inner source is then one step ahead
    assert ahead.inner.state_dict() != plain.state_dict() and ahead.state_dict() == plain.state_dict()
    resumed = PrefetchBatches(IndexBatches(data, 4, 2, seed=3, collate=list))
    resumed.load_state_dict(ahead.state_dict())
    assert collect(resumed, 3) == collect(plain, 3)
    # The build runs off the calling thread.
    threads = []
    worker = PrefetchBatches(
        IndexBatches(data, 4, 2, collate=lambda items: threads.append(threading.current_thread()) or items)
    )
    worker.next_step()
    assert threads and all(t is not threading.current_thread() for t in threads)

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    data_dir = write_shards(tok, ["北京是中国的首都。今天天气很好。"] * 60, str(tmp_path / "shards"), n_shards=2)
    stream = ShardStream(data_dir, load_meta(data_dir), seq_len=16, global_batch=4, micro_batch=2)
    ahead = PrefetchBatches(ShardStream(data_dir, load_meta(data_dir), seq_len=16, global_batch=4, micro_batch=2))
    done = []
    for _ in range(12):
        x = [b[0].tolist() for b in stream.next_step()]
        assert [b[0].tolist() for b in ahead.next_step()] == x
        assert ahead.shard_done == stream.shard_done and ahead.state_dict() == stream.state_dict()
        done.append(stream.shard_done)
    assert any(done) and not all(done)  # a shard ended within these steps: shard_done was really compared


def test_prefetch_pins_every_tensor_of_a_batch_when_asked(monkeypatch):
    """pin_memory=True (the Trainer asks for it on CUDA only: CPU-only builds cannot pin) page-locks each tensor
    of dict, tuple and list batches, so to_device's non_blocking copies run asynchronously."""
    import torch

    from dataset.batches import PrefetchBatches

    pinned = []

    def fake_pin(self):  # a CPU-only build has no page-locked memory to give: record the call instead
        copy = self.clone()
        pinned.append(copy)
        return copy

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    data = [torch.full((2,), i) for i in range(8)]

    def collate(items):
        return {"x": torch.stack(items), "pair": (torch.stack(items), [torch.stack(items)]), "n": len(items)}

    ahead = PrefetchBatches(IndexBatches(data, 4, 2, collate=collate), pin_memory=True)
    handed = ahead.next_step()
    ahead._pending.result()  # the next step is built (and pinned) too: 2 steps x 2 micro-batches x 3 tensors
    assert len(pinned) == 12
    tensors = [t for b in handed for t in (b["x"], b["pair"][0], b["pair"][1][0])]
    assert all(any(t is p for p in pinned) for t in tensors) and [b["n"] for b in handed] == [2, 2]
    plain = PrefetchBatches(IndexBatches(data, 4, 2, collate=collate))
    plain.next_step()
    plain._pending.result()
    assert len(pinned) == 12  # pin_memory=False (CPU training) pins nothing
