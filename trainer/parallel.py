"""
Several processes under torchrun: joining the process group, and the two ways the Trainer spreads a model over
them, DDP (every rank holds the whole model) and FSDP2 (each decoder layer sharded over the ranks).
"""

import os
import time

import torch
import torch.distributed as dist


def init_process_group(device_name: str) -> tuple[int, int, torch.device]:
    """Join torchrun's process group -> (rank, world size, this rank's device): NCCL and one GPU per process
    where CUDA is there and not turned off (device=cpu), gloo on CPU otherwise."""
    backend = "nccl" if torch.cuda.is_available() and device_name != "cpu" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    device = (
        torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}") if backend == "nccl" else torch.device("cpu")
    )
    if backend == "nccl":
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def end_process_group(*, finished: bool) -> None:
    """Leave torchrun's process group: after a barrier that every rank reaches when the run finished, at once after
    an error."""
    # gloo's threads free finished work objects (and the Python tensors they hold, which needs the GIL) just after a
    # collective returns, while destroy_process_group joins them holding the GIL: a rare shutdown deadlock (seen once
    # in CI, a thread freeing the last checkpoint's barrier). So the last work object is ours, freed by this thread
    # after the join (on return), and the threads get the GIL to free the others.
    last_work = None
    try:
        if finished:
            last_work = dist.barrier(async_op=True)
            last_work.wait()
    finally:
        if dist.is_initialized():
            time.sleep(0.1)
            dist.destroy_process_group()
    del last_work  # here, after the join


def check_fsdp(*, supported: bool, stage: str, dtype: torch.dtype, batch_size) -> None:
    """Fail before anything is built when parallel=fsdp cannot work for this run."""
    if not supported:
        raise ValueError(f"parallel=fsdp is built for the pretrain and sft stages; use parallel=ddp for {stage}")
    if dtype == torch.float16:
        raise ValueError(
            "parallel=fsdp needs bf16 or fp32 (fp16's loss scaling would have to agree across "
            "shards); use dtype=bf16 or parallel=ddp"
        )
    if batch_size == "auto":
        raise ValueError("parallel=fsdp needs an explicit batch_size (the probe runs on one unsharded GPU)")


def shard_model(model, device: torch.device, world_size: int) -> None:
    """FSDP2, in place: each decoder layer is one unit (its weights are gathered just before it runs and freed
    after), the root holds the embeddings, final norm and head. Every rank starts from rank 0's weights, as DDP
    does. Call it before building the optimizer, which must hold the sharded parameters."""
    # distributed modules import only where torch was built with them (dist.is_available())
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(tensor, src=0)
    mesh = init_device_mesh(device.type, (world_size,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def wrap_ddp(model, device: torch.device):
    # distributed modules import only where torch was built with them (dist.is_available())
    from torch.nn.parallel import DistributedDataParallel

    # broadcast_buffers=False: our only buffers are RoPE frequencies, the same on every rank, and DDP would
    # otherwise broadcast them before every forward.
    return DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False
    )
