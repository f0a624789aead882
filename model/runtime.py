"""
Where a model runs, in which number format, and how a checkpoint is loaded: one policy for training, the engine,
evaluation, frozen reference/reward models, the export scripts and the benchmarks.

The dtype vocabulary is the same everywhere: auto | bf16 | fp16 | fp32. `auto` means
    CUDA, compute capability >= 8.0 (A100, RTX 30xx/40xx, L4, H100): bf16 (native bf16 tensor cores)
    CUDA below 8.0 (T4, V100, RTX 20xx):                            fp16 (training adds a GradScaler)
    CPU, Apple's GPU (MPS) and anything else:                        fp32 (CPU bf16 autocast is slow and inexact;
                                                                     MPS autocast is young and untested here)
torch.cuda.is_bf16_supported() is not the test: it answers True on a T4 because bf16 can be *emulated* there, on
CUDA cores at a fraction of the fp16 tensor-core speed, and Inductor and SDPA's memory-efficient kernel refuse bf16
below sm80. Every choice is a pure function of (device type, capability) so tests can fake any GPU on a CPU.
"""

import contextlib
import glob
import hashlib
import json
import os
import sys
import warnings

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BF16_NATIVE = (8, 0)  # Ampere: the first compute capability with bf16 tensor cores
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, whose out/ holds the models
MAKE_A_MODEL = "python main.py --stage all --config config/demo.yaml"  # the README's first command, ~5 min on a CPU


# -----------------------------------------------------------------------------
# Device and dtype


def auto_device_type(cuda_available: bool, mps_available: bool) -> str:
    """device=auto: an NVIDIA GPU, then Apple Silicon's GPU (MPS), then the CPU."""
    if cuda_available:
        return "cuda"
    return "mps" if mps_available else "cpu"


def resolve_device(name: str = "auto") -> torch.device:
    """auto = auto_device_type() of this machine; otherwise a torch device string (cpu, cuda:1, mps)."""
    if name == "auto":
        return torch.device(auto_device_type(torch.cuda.is_available(), torch.backends.mps.is_available()))
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got '{name}'") from e


# Per-device choices besides the dtype, each a pure function of the device so the CPU tests run the same code a GPU
# or a Mac does (tests pass torch.device("mps") or "cuda", which need no such hardware to exist).


def pins_memory(device: torch.device) -> bool:
    """Page-locked host buffers for host -> device copies: CUDA only (MPS shares the host's memory, the CPU copies
    nothing)."""
    return device.type == "cuda"


def copies_async(device: torch.device) -> bool:
    """non_blocking host -> device copies: CUDA, from pinned memory. Not on MPS, where non_blocking copies have
    returned stale data in several torch releases, and a copy into shared memory gains little."""
    return device.type == "cuda"


def fuses_adamw(device: torch.device) -> bool:
    """AdamW's fused kernel (one launch per step; a step skipped on a device flag, trainer/guard.py): torch has it
    on CUDA, the CPU and MPS."""
    return device.type in ("cuda", "cpu", "mps")


def scales_loss(dtype: torch.dtype) -> bool:
    """A GradScaler for fp16 only: bf16 and fp32 have fp32's exponent range, so small gradients do not underflow."""
    return dtype == torch.float16


def compiles(device: torch.device, requested: bool) -> bool:
    """torch.compile where asked for, except on MPS: Inductor's Metal backend is a prototype in torch 2.x, so a Mac
    runs eager (with a warning) rather than fail inside a compiled graph."""
    if requested and device.type == "mps":
        warnings.warn(
            "compile=true is ignored on Apple's GPU (MPS): torch.compile's Metal backend is a prototype", stacklevel=2
        )
        return False
    return requested


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
# CPU threads

MAX_AUTO_THREADS = 4  # past this the small presets gain little on a CPU, and a shared machine loses more


def auto_cpu_threads(cores: int, load: float | None, omp_num_threads: str | None) -> int:
    """The pure policy behind threads=0 (auto): OMP_NUM_THREADS when set; else the cores other processes leave idle
    (cores minus the 1-minute load average, rounded), at least 1 and at most MAX_AUTO_THREADS. torch's own default
    (one thread per core) collapses on a busy machine: on a 2-core machine at load 6-15 the demo took 1 h 22 min
    with 2 threads and 4 min 47 s with 1 (40 steps: 145 s vs 17.5 s, identical losses), because each op's threads
    wait for the slowest, descheduled one."""
    if omp_num_threads and omp_num_threads.strip().isdigit() and int(omp_num_threads) > 0:
        return int(omp_num_threads)
    idle = cores if load is None else round(cores - load)
    return max(1, min(cores, MAX_AUTO_THREADS, idle))


def set_cpu_threads(threads: int = 0) -> int:
    """Set torch's intra-op threads for the CPU path: `threads` when > 0, else auto_cpu_threads on this machine
    (the cores this process may use, the load average where the platform has one). Returns the number set."""
    if threads <= 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        threads = auto_cpu_threads(cores, load, os.environ.get("OMP_NUM_THREADS"))
    torch.set_num_threads(threads)
    return threads


# -----------------------------------------------------------------------------
# The matmul dtype of Muon's Newton-Schulz iteration (trainer/optim.py)

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 instructions that multiply bf16 natively (/proc/cpuinfo names)


def newton_schulz_dtype(
    device_type: str, capability: tuple[int, int] | None, cpu_capability: str, cpu_flags: frozenset[str]
) -> torch.dtype:
    """The fastest dtype that is exact enough for Muon's Newton-Schulz iteration on this device (a pure function;
    newton_schulz_dtype_for gathers the facts). Muon's update is only roughly orthogonal by design (its singular
    values land anywhere in ~0.5-1.5), so 16-bit rounding is small beside that (torch.optim.Muon always runs the
    iteration in bf16); what differs between the formats is the speed:
        CUDA, capability >= 8.0          bf16 (tensor cores)
        CUDA below 8.0 (T4, V100)        fp16 (tensor cores; bf16 is emulated there). The input is normalised to
                                         spectral norm <= 1 first, so every value stays far inside fp16's range
        CPU with native bf16 matmuls     bf16: AVX512_BF16 or AMX, and torch allowed to use AVX512 (cpu_capability,
                                         torch.backends.cpu.get_cpu_capability(); ATEN_CPU_CAPABILITY=avx2 lowers it)
        any other CPU (AVX2 and older,   fp32: bf16 matmuls are emulated there, 20x slower than fp32 or worse; fp16
        ARM, CPUs we cannot tell)        is slower still on every CPU (bench/bench_muon.py)
    """
    if device_type == "cuda":  # the same answer as dtype=auto: the GPU's fastest tensor-core format
        return auto_dtype(device_type, capability)
    if device_type == "cpu" and cpu_capability == "AVX512" and any(f in cpu_flags for f in CPU_BF16_FLAGS):
        return torch.bfloat16
    return torch.float32


def cpu_flags() -> frozenset[str]:
    """The x86 CPU feature flags of /proc/cpuinfo (Linux); empty where there are none (other OSes, ARM), which
    means fp32 above."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def newton_schulz_dtype_for(device: torch.device) -> torch.dtype:
    """newton_schulz_dtype for this machine's `device`."""
    if device.type == "cpu":
        return newton_schulz_dtype("cpu", None, torch.backends.cpu.get_cpu_capability(), cpu_flags())
    return newton_schulz_dtype(device.type, cuda_capability(device), "", frozenset())


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


# -----------------------------------------------------------------------------
# Which model a command line means (scripts/chat_terminal.py, scripts/serve_api.py without --model)


def finished_models(*roots: str) -> list[str]:
    """Every finished model under the roots (a final/ folder with a config.json: adapters need their base), newest
    (by the folder's modification time) first."""
    found = set()
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            if os.path.basename(dirpath) == "final" and "config.json" in filenames:
                found.add(os.path.realpath(dirpath))
                dirnames.clear()
    return sorted(found, key=os.path.getmtime, reverse=True)


def resolve_model(model: str | None) -> str:
    """The --model to load: as given, or the newest finished model under out/ (here or in the repository, said on
    stderr). A missing model ends the program with one line naming the command that makes one (exit 2)."""
    if model is not None:
        if os.path.isdir(model):
            return model
        _no_model(f"--model {model} does not exist")
    candidates = finished_models(*{os.path.abspath("out"), os.path.join(ROOT, "out")})
    if not candidates:
        _no_model("no --model given and no finished model (a final/ folder) under out/")
    print(f"[chat] 使用最新的模型 using the newest model under out/: {os.path.relpath(candidates[0])}", file=sys.stderr)
    return candidates[0]


def _no_model(why: str):
    print(
        f"error: {why}; make one with `{MAKE_A_MODEL}` (about 5 minutes on a CPU) or pass --model DIR", file=sys.stderr
    )
    raise SystemExit(2)
