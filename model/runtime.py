"""
Where a model runs, in which number format, and how a checkpoint is loaded: one policy for training, the engine,
evaluation, frozen reference/reward models, the export scripts and the benchmarks.

The dtype vocabulary is the same everywhere: auto | bf16 | fp16 | fp32. `auto` means
    CUDA, compute capability >= 8.0 (A100, RTX 30xx/40xx, L4, H100): bf16 (native bf16 tensor cores)
    CUDA below 8.0 (T4, V100, RTX 20xx):                            fp16 (training adds a GradScaler)
    CPU and anything else:                                           fp32 (CPU bf16 autocast is slow and inexact)
torch.cuda.is_bf16_supported() is not the test: it answers True on a T4 because bf16 can be *emulated* there, on
CUDA cores at a fraction of the fp16 tensor-core speed, and Inductor and SDPA's memory-efficient kernel refuse bf16
below sm80. Every choice is a pure function of (device type, capability) so tests can fake any GPU on a CPU.
"""

import contextlib
import glob
import hashlib
import json
import os
import warnings

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BF16_NATIVE = (8, 0)  # Ampere: the first compute capability with bf16 tensor cores


# -----------------------------------------------------------------------------
# Device and dtype


def resolve_device(name: str = "auto") -> torch.device:
    """auto = the first CUDA GPU if there is one, else the CPU; otherwise a torch device string (cpu, cuda:1)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got '{name}'") from e


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device, None elsewhere."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(device)


def auto_dtype(device_type: str, capability: tuple[int, int] | None) -> torch.dtype:
    """The pure policy behind dtype=auto (see the module docstring)."""
    if device_type == "cuda":
        return torch.bfloat16 if capability is not None and tuple(capability) >= BF16_NATIVE else torch.float16
    return torch.float32


def dtype_from_name(name: str) -> torch.dtype:
    """bf16 | fp16 | fp32 -> torch dtype, with an error that lists the choices."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be auto, {', '.join(DTYPES)}; got '{name}'")
    return DTYPES[name]


def resolve_dtype(
    name: str | torch.dtype, device: torch.device, capability: tuple[int, int] | None = None
) -> torch.dtype:
    """The compute dtype for `device`: auto (policy above) or an explicit name. `capability` overrides the
    device's own (tests fake GPUs with it). Asking for bf16 where it is only emulated works but warns."""
    if isinstance(name, torch.dtype):
        return name
    dtype = None if name == "auto" else dtype_from_name(name)
    if dtype in (None, torch.bfloat16) and capability is None:  # only these answers depend on the GPU
        capability = cuda_capability(device)
    if dtype is None:
        return auto_dtype(device.type, capability)
    if dtype == torch.bfloat16 and device.type == "cuda" and capability is not None and tuple(capability) < BF16_NATIVE:
        warnings.warn(
            f"dtype=bf16 on a GPU of compute capability {capability[0]}.{capability[1]}: bf16 is emulated "
            f"there (several times slower than fp16, and torch.compile falls back to eager); dtype=auto "
            f"picks fp16",
            stacklevel=2,
        )
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bf16' (for log lines and metadata)."""
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype).replace("torch.", ""))


def autocast_context(device: torch.device, dtype: torch.dtype):
    """Mixed precision for fp32 weights: matmuls in `dtype`, reductions in fp32. fp32 means no autocast at all."""
    if dtype == torch.float32:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def frozen_autocast(device: torch.device, policy_device: torch.device, dtype: torch.dtype):
    """Autocast for a frozen model (an offloaded reference) on `device` while the policy runs under
    autocast_context(policy_device, dtype): that autocast covers only its own device type, so a reference on
    another one (ref_device=cpu while training on cuda) gets the same dtype's autocast on its own device. On the
    same device type it needs nothing. The one exception: fp16 on a CPU runs fp32, because CPU fp16 matmuls have
    no fast kernels on most CPUs (many times slower than fp32); such a reference differs from the policy by
    fp16 rounding only."""
    if device.type == policy_device.type:
        return contextlib.nullcontext()
    if device.type == "cpu" and dtype == torch.float16:
        dtype = torch.float32
    return autocast_context(device, dtype)


# -----------------------------------------------------------------------------
# Loading a checkpoint


KINDS = ("causal", "score")
CHECKSUMS_FILE = "checksums.json"


class CheckpointError(ValueError):
    """A checkpoint that must not be loaded or resumed from: unreadable, corrupted (checksum), not matching its own
    config, or holding code. The message names the file."""


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (a checkpoint is never held twice in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _checkpoint_files(path: str) -> list[str]:
    """Every file under a checkpoint dir but the manifest, as sorted paths relative to it."""
    found = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        found.extend(os.path.relpath(os.path.join(root, f), path) for f in sorted(files) if f != CHECKSUMS_FILE)
    return found


def write_checksums(path: str) -> None:
    """checksums.json: {"sha256": {relative path: hex digest}} of every file in the checkpoint dir."""
    sums = {name: sha256_file(os.path.join(path, name)) for name in _checkpoint_files(path)}
    with open(os.path.join(path, CHECKSUMS_FILE), "w", encoding="utf-8") as f:
        json.dump({"sha256": sums}, f, indent=1)


def verify_checksums(path: str) -> bool:
    """Raise CheckpointError naming the first file that is missing or whose bytes changed since the save. False
    when the dir has no manifest (written before checksums existed): nothing could be verified."""
    manifest = os.path.join(path, CHECKSUMS_FILE)
    if not os.path.isfile(manifest):
        return False
    try:
        with open(manifest, encoding="utf-8") as f:
            sums = json.load(f)["sha256"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest}: unreadable checksum manifest ({type(e).__name__}: {e})") from None
    for name, expected in sums.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"{file}: listed in {CHECKSUMS_FILE} but missing")
        if sha256_file(file) != expected:
            raise CheckpointError(
                f"{file}: SHA-256 differs from {CHECKSUMS_FILE} (the file changed or was corrupted after the save)"
            )
    return True


def check_checkpoint_dir(path: str, what: str = "checkpoint") -> None:
    """A clear error for the common mistakes (a typo, a run dir instead of its final/, a LoRA adapter dir)."""
    if not path or not os.path.isdir(path):
        raise FileNotFoundError(f"{what} '{path}' is not a directory (a stage's final/ or step_*/ folder)")
    if os.path.isfile(os.path.join(path, "config.json")):
        return
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise FileNotFoundError(
            f"{what} '{path}' holds a LoRA adapter, not a full model: merge it first with "
            f"`python scripts/merge_lora.py --adapter {path} --out DIR`, or load it as an adapter"
        )
    hint = (
        " (it looks like a run directory: use its final/ or a step_*/ inside)"
        if os.path.isdir(os.path.join(path, "final"))
        else ""
    )
    raise FileNotFoundError(f"{what} '{path}' has no config.json{hint}")


def load_pretrained(
    path: str,
    kind: str = "causal",
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = torch.float32,
    frozen: bool = False,
):
    """A saved model (ours, or an exported Llama) as a causal LM or as a one-score sequence classifier (reward
    model / critic), moved to `device`. dtype="auto" keeps the dtype the weights were saved in.
    frozen=True: eval mode, no gradients (references, reward models, teachers).

    Training keeps fp32 weights (the optimizer's master copy) and runs them under autocast; a frozen model that
    must agree with the policy (a DPO/PPO/GRPO reference) is loaded the same way, so log pi - log ref is exactly 0
    at step 0. Importing this module registers the `slm` type with the Auto classes (model/__init__.py)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got '{kind}'")
    check_checkpoint_dir(path)
    verify_model_files(path)
    try:
        if kind == "causal":
            model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
        else:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, dtype=dtype, output_loading_info=True
            )
    except (RuntimeError, ValueError, OSError, SafetensorError) as e:  # a lying header, shapes not in config.json
        raise CheckpointError(
            f"{_weights_files(path)}: cannot be loaded with {os.path.join(path, 'config.json')}, corrupted or not "
            f"matching it ({_first_line(e)})"
        ) from None
    # A config with more layers than the weights loads with those layers randomly initialised, with a warning
    # only: a corrupted folder must not serve noise. A score model built from a causal one has a new head.
    missing = sorted(k for k in info["missing_keys"] if not (kind == "score" and k.startswith("score.")))
    unexpected = sorted(k for k in info["unexpected_keys"] if not (kind == "score" and k.startswith("lm_head.")))
    if missing or unexpected:
        what = f"{len(missing)} weights missing (e.g. {missing[0]})" if missing else ""
        what += ("; " if what else "") + (f"{len(unexpected)} not in it (e.g. {unexpected[0]})" if unexpected else "")
        raise CheckpointError(f"{_weights_files(path)} does not match {os.path.join(path, 'config.json')}: {what}")
    model = model.to(device)
    if frozen:
        model.eval().requires_grad_(False)
    return model


# Files a model folder may hold whose parse errors name no file (a JSONDecodeError from the tokenizer's loader).
JSON_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def verify_model_files(path: str) -> None:
    """Before a model folder is loaded (training, serving, chat, eval, export): its files against checksums.json
    when it has one, and its JSON files parse. Raises CheckpointError naming the file."""
    verify_checksums(path)
    for name in JSON_FILES:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        try:
            with open(file, encoding="utf-8") as f:
                json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{file}: corrupted, not valid JSON ({_first_line(e)})") from None


def _weights_files(path: str) -> str:
    files = sorted(glob.glob(os.path.join(path, "*.safetensors"))) or sorted(glob.glob(os.path.join(path, "*.bin")))
    return ", ".join(files) if files else os.path.join(path, "model.safetensors")


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]
