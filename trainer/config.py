"""
Stage configs: flat dataclasses filled from YAML and `key=value` (or `--key value`) overrides.

Precedence: dataclass defaults < YAML file < command-line overrides. Unknown keys and values that do not
fit the field's type fail at once with a message naming the key (nanoGPT's strictness, without exec).

    cfg = load_config(PretrainConfig, "config/pretrain.yaml", ["lr=3e-4", "max_steps=100"])

A key a stage never reads is refused too (the class's `unused` attribute, see TrainConfig), so a setting that
would silently do nothing fails instead.

Values are checked up front, in one place: validate(cfg) reads each Config class's declarative tables (`choices`
for enums, `bounds` for ranges, `devices`, `paths` for what must exist; `unchecked` lists the fields any value
of whose type is valid, with the reason) and raises ConfigError naming the key and what is allowed. load_config
runs the value checks; run_trainer and the non-training stages' run() run them again with the path checks, before
any model is built (a Config made in code is checked too).
"""

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass
from typing import ClassVar

import yaml

from dataset.text_sources import expand_paths
from model.runtime import DTYPES, check_checkpoint_dir, resolve_device
from trainer.bounds import Bound, above, at_least, between, is_finite  # noqa: F401 (re-exported: the stages import them from here)
from trainer.checkpoint import CheckpointError, verify_checksums
from trainer.errors import ConfigError, MissingPathError  # torch-free, for the tokenizer; imported from here too

OPTIMIZERS = ("adamw", "muon")  # trainer/optim.py builds them
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_OVERRIDE_PAIR = re.compile(r"[A-Za-z_][\w-]*=")  # `key=value`: the start of the next override


def _coerce(key: str, value, annotation):
    """Turn a YAML or command-line value into the field's type, or raise ConfigError naming the key."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):  # e.g. `int | None`
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        errors = []
        for option in options:
            try:
                return _coerce(key, value, option)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            as_float = float(str(value).replace("_", ""))
        except ValueError:
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return int(as_float)  # accepts 1e6 and 1_000_000
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}") from None
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return "" if value is None else str(value)
    if origin is list or annotation is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        (item_type,) = typing.get_args(annotation) or (str,)
        return [_coerce(key, v, item_type) for v in value]
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return value
    return value


def parse_overrides(args: list[str]) -> dict:
    """Command-line overrides -> {key: value string} (_coerce types the values later).

    Accepts `key=value` (ours), `--key value` and `--key=value` (argparse, HF/TRL and litgpt habits), and dashes for
    underscores (`--max-steps 3`). A bare `--flag` before another flag or at the end means true. The value after
    `--key` is the next argument unless that is a flag or a `key=value` pair, so a value that itself holds `=`
    must be written `--key=value`."""
    out = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            key, sep, value = arg[2:].partition("=")
            if not sep:
                nxt = args[i + 1] if i + 1 < len(args) else None
                if nxt is None or nxt.startswith("--") or _OVERRIDE_PAIR.match(nxt):
                    value = "true"
                else:
                    value = nxt
                    i += 1
        elif "=" in arg:
            key, value = arg.split("=", 1)
        else:
            raise ConfigError(f"override '{arg}' is not of the form key=value or --key value")
        key = key.strip().replace("-", "_")
        if not key:
            raise ConfigError(f"override '{arg}' has no key")
        out[key] = value
        i += 1
    return out


# Keys other training projects (HF Trainer/TRL, LLaMA-Factory, MiniMind) use for what ours call differently, with
# what the user must know to translate the value. Checked before the spelling match, which would pair
# gradient_accumulation_steps with gradient_checkpointing, a different thing.
KEY_ALIASES = {
    "gradient_accumulation_steps": (
        "global_batch_size",
        ("global_batch_size = batch_size x accumulation steps x processes; the accumulation follows from it"),
    ),
    "learning_rate": ("lr", ""),
    "per_device_train_batch_size": ("batch_size", "micro-batch per process"),
    "train_batch_size": ("batch_size", "micro-batch per process"),
    "num_train_epochs": ("max_steps", "training length is counted in optimizer steps, not epochs"),
    "epochs": ("max_steps", "training length is counted in optimizer steps, not epochs"),
    "output_dir": ("out_dir", ""),
    "save_dir": ("out_dir", ""),
    "model_name_or_path": ("init_from", "a local checkpoint folder"),
    "max_seq_length": ("seq_len", "tokens per sequence"),
    "max_length": ("seq_len", "tokens per sequence"),
    "max_seq_len": ("seq_len", "tokens per sequence"),
    "warmup_ratio": ("warmup_steps", "a number of steps: warmup_ratio x max_steps"),
}


def did_you_mean(key: str, known: list[str]) -> str:
    """' (did you mean X? ...)' for an unknown key, or '' when nothing is close enough to be a useful hint."""
    alias = KEY_ALIASES.get(key)
    if alias and alias[0] in known:
        target, note = alias
        return f" (did you mean {target}?{' ' + note if note else ''})"
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.8)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def load_config(cls, yaml_path: str | None = None, overrides: list[str] | dict | None = None):
    """Build a `cls` dataclass: defaults, then the YAML file, then overrides. Strict about keys and types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    sources = []
    if yaml_path:
        with open(yaml_path, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:  # e.g. a file saved as GBK: name the file and the line, not a traceback
            line = raw.count(b"\n", 0, e.start) + 1
            raise ConfigError(
                f"{yaml_path}:{line}: not UTF-8 text (byte {raw[e.start : e.start + 1]!r} at offset {e.start}); "
                f"save the file as UTF-8"
            ) from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{yaml_path}:{mark.line + 1}:{mark.column + 1}" if mark else yaml_path
            problem = getattr(e, "problem", None) or str(e)
            raise ConfigError(f"{where}: malformed YAML ({problem})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{yaml_path}: expected a mapping of key: value")
        sources.append((f"{yaml_path}", data))
    if overrides:
        sources.append(("command line", overrides if isinstance(overrides, dict) else parse_overrides(overrides)))
    unused = getattr(cls, "unused", {})
    for where, data in sources:
        for key, value in data.items():
            if not isinstance(key, str):  # YAML reads `1: 2` or `true: x` as a number or bool key
                raise ConfigError(f"config key {key!r} ({where}): a key must be a name, got {type(key).__name__}")
            if key in unused:
                stage = cls.__module__.rsplit(".", 1)[-1]
                raise ConfigError(
                    f"config key '{key}' ({where}) is not used by stage {stage} "
                    f"({cls.__module__}.{cls.__qualname__}): {unused[key]}; remove it"
                )
            if key not in fields:
                hint = did_you_mean(key, list(fields))
                raise ConfigError(f"unknown config key '{key}' ({where}) for {cls.__name__}{hint}")
            values[key] = _coerce(key, value, hints[key])
    try:
        cfg = cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None
    validate(cfg, paths=False)  # the paths are checked when the stage runs: an earlier stage may write them
    return cfg


# -----------------------------------------------------------------------------
# Validation: one step, driven by the tables each Config class declares


def _table(cls, name: str) -> dict:
    """A table merged over the class hierarchy: a stage's Config declares only its own entries."""
    merged = {}
    for klass in reversed(cls.__mro__):
        entries = vars(klass).get(name, {})
        merged.update(dict.fromkeys(entries) if isinstance(entries, tuple) else entries)
    return merged


def validate(cfg, *, paths: bool = True) -> None:
    """Every value of `cfg` against its class's tables; paths=True also checks what must exist. Raises ConfigError
    (MissingPathError for a missing path) naming the key and what is allowed."""
    cls = type(cfg)
    for field in dataclasses.fields(cls):  # every number, bounded or not (`unchecked` too): NaN passes any bound
        value = getattr(cfg, field.name)
        if not is_finite(value):
            raise ConfigError(f"config key '{field.name}': must be a finite number, got {value!r}")
    for key, allowed in _table(cls, "choices").items():
        value = getattr(cfg, key)
        if value not in allowed:
            names = [str(a) for a in allowed]
            raise ConfigError(
                f"config key '{key}': {key} must be {', '.join(names[:-1])} or {names[-1]}, got {value!r}"
            )
    for key, bound in _table(cls, "bounds").items():
        value = getattr(cfg, key)
        if key == "batch_size" and value == "auto":
            continue
        if isinstance(value, str):
            raise ConfigError(
                f"config key '{key}': expected a number{' or auto' if key == 'batch_size' else ''}, got {value!r}"
            )
        if not bound.holds(value):
            raise ConfigError(f"config key '{key}': must be {bound}, got {value!r}")
    for key in _table(cls, "devices"):
        value = getattr(cfg, key)
        if value:  # "" = the training device, where allowed
            try:
                resolve_device(value)
            except ValueError as e:
                raise ConfigError(f"config key '{key}': {e}") from None
    resume = getattr(cfg, "resume", "auto")
    if resume == "" or (paths and resume not in ("auto", "never") and not os.path.isdir(resume)):
        raise MissingPathError(
            f"config key 'resume': must be auto, never or an existing step_* directory, got {resume!r}"
        )
    if paths:
        for key, kind in _table(cls, "paths").items():
            _check_path(cfg, key, kind)


def _check_path(cfg, key: str, kind: str) -> None:
    """kind: dir | dirs (comma-separated) | checkpoint (a saved model dir; its files verified against its
    checksums.json when it has one) | files (data files, globs, folders) | tokenizer (a tokenizer folder, needed
    only when init_from brings none). An empty value is not checked: it means "none" or "the default" to the
    stage."""
    value = getattr(cfg, key)
    if not value:
        return
    try:
        for path in value.split(",") if kind == "dirs" else [value] if kind == "dir" else []:
            if not os.path.isdir(path.strip()):
                raise FileNotFoundError(f"'{path.strip()}' does not exist (or is not a directory)")
        init_from = getattr(cfg, "init_from", "")
        brought = bool(init_from) and os.path.isfile(os.path.join(init_from, "tokenizer.json"))
        if kind == "tokenizer" and not brought and not os.path.isdir(value):
            raise FileNotFoundError(
                f"'{value}' does not exist: train one with `python main.py --stage tokenizer` "
                f"or point tokenizer_dir at one"
            )
        if kind == "checkpoint":
            check_checkpoint_dir(value, key)
        if kind == "files":
            expand_paths(value)
    except (FileNotFoundError, ValueError) as e:
        message = str(e)
        raise MissingPathError(message if message.startswith(key) else f"config key '{key}': {message}") from None
    if kind == "checkpoint":
        try:  # a final/ or step_*/ whose bytes changed since the save fails here, naming the file
            verify_checksums(value)
        except CheckpointError as e:
            raise ConfigError(f"config key '{key}': {e}") from None


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def format_config(cfg) -> str:
    """One `key: value` line per field, in declaration order, for the start of a run's log."""
    return "\n".join(f"  {k}: {v!r}" for k, v in config_to_dict(cfg).items())


def save_config(cfg, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False, allow_unicode=True)


# -----------------------------------------------------------------------------
# The settings every training stage shares. A stage's Config subclasses this and adds only its own fields.


@dataclass
class TrainConfig:
    # Class attributes, not fields. unused: TrainConfig fields this stage never reads -> why; load_config rejects
    # them when set in YAML or on the command line (the dataclass defaults stay). batch_unit: what batch_size and
    # global_batch_size count in this stage.
    unused: ClassVar[dict[str, str]] = {}
    batch_unit: ClassVar[str] = "sequences"
    # What validate() checks; a subclass declares only its own entries (the tables merge over the hierarchy).
    # Every int/float field has a `bounds` entry and every str field with a fixed vocabulary a `choices` (or
    # `devices`) entry, or it is listed in `unchecked` with the reason any value will do: tests/test_cli.py
    # fails on a field in none of them, so a new key cannot be forgotten.
    choices: ClassVar[dict[str, tuple]] = {
        "optimizer": OPTIMIZERS,
        "lr_schedule": ("cosine", "wsd", "constant"),
        "dtype": ("auto", *DTYPES),
        "parallel": ("ddp", "fsdp"),
        "logger": ("none", "wandb", "swanlab", "tensorboard"),
    }
    bounds: ClassVar[dict[str, Bound]] = {
        "max_steps": at_least(1),
        "batch_size": at_least(1),
        "global_batch_size": at_least(0),
        "seq_len": at_least(1),
        "lr": at_least(0),
        "min_lr_ratio": between(0, 1),
        "warmup_steps": at_least(0),
        "decay_ratio": between(0, 1),
        "weight_decay": at_least(0),
        "beta1": between(0, 1, high_open=True),
        "beta2": between(0, 1, high_open=True),
        "muon_lr_ratio": above(0),  # 0 would freeze every hidden matrix under Muon (lr=0 freezes everything)
        "muon_momentum": between(0, 1, high_open=True),  # 1 never forgets a gradient
        "grad_clip": at_least(0),
        "loss_chunk": at_least(0),
        "log_every": at_least(1),
        "eval_every": at_least(0),
        "eval_batches": at_least(0),
        "save_every": at_least(0),
        "keep_last": at_least(0),
        "seed": between(0, 2**31 - 1),  # seed + rank goes to np.random.seed, which takes [0, 2**32)
        "fp16_init_scale": above(0),  # GradScaler's first scale multiplies the loss: 0 zeroes every gradient
        "max_skipped_steps": at_least(1),  # 0 would stop at the first check, before any step was skipped
        "threads": at_least(0),
    }
    unchecked: ClassVar[dict[str, str]] = {}  # field -> why every value of its type is valid
    devices: ClassVar[tuple[str, ...]] = ("device",)
    paths: ClassVar[dict[str, str]] = {"init_from": "checkpoint", "tokenizer_dir": "tokenizer"}
    # --- what to train, on what ---
    model_config: str = "config/model/small.json"  # architecture preset (pretraining only; later stages inherit)
    init_from: str = ""  # checkpoint dir to start from (a stage's final/ or step_*/); "" = random init
    tokenizer_dir: str = "out/tokenizer"  # HF tokenizer folder written by the tokenizer stage
    data_dir: str = ""  # token shards (pretraining)
    data_path: str = ""  # data files, comma-separated (chat / preference stages)
    out_dir: str = "out/run"  # checkpoints, metrics.jsonl, config.yaml
    # --- batch and schedule ---
    max_steps: int = 1000  # optimizer steps
    batch_size: int | str = 16  # micro-batch per process, in batch_unit; "auto" = largest that fits (CUDA probe)
    global_batch_size: int = 0  # batch_unit per optimizer step over all processes; 0 = batch_size x processes
    seq_len: int = 512  # tokens per sequence
    lr: float = 3e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of lr
    warmup_steps: int = 100  # linear warmup from 0
    lr_schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    decay_ratio: float = 0.2  # wsd: share of steps spent in the final linear decay
    weight_decay: float = 0.1  # decay on matrices (not on norms or biases), AdamW's and Muon's
    decay_embeddings: bool = True  # false: no weight decay on the token embedding and the output head
    beta1: float = 0.9  # AdamW betas (under optimizer=muon: of the embeddings, head, norms)
    beta2: float = 0.95
    optimizer: str = "adamw"  # adamw | muon: Muon for the hidden matrices, AdamW for the rest (trainer/optim.py)
    muon_lr_ratio: float = 10.0  # muon: the hidden matrices' peak lr as a multiple of lr (the AdamW groups keep
    #                              lr); Muon scales it per matrix by 0.2*sqrt(max(out, in)) (trainer/optim.py); 10
    #                              suits short runs, config/pretrain.yaml's long ones use 5 (bench/RESULTS.md)
    muon_momentum: float = 0.95  # muon: Nesterov momentum of the hidden matrices
    grad_clip: float = 1.0  # clip the global grad norm to this; 0 = off
    # --- system ---
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on capable GPUs, fp16 + GradScaler on older ones, fp32 on CPU) | bf16 | fp16
    #                      | fp32
    compile: bool = False  # torch.compile the model
    threads: int = 0  # CPU intra-op threads; 0 = auto: OMP_NUM_THREADS if set, else the idle cores, at most 4
    #                   (model/runtime.py auto_cpu_threads; on a busy machine 1 thread beats one per core)
    parallel: str = "ddp"  # under torchrun: ddp (every GPU holds the whole model) | fsdp (weights, grads and optimizer
    #                        state sharded over the GPUs, for a model that does not fit one; pretrain and sft)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory for one more forward
    loss_chunk: int = 0  # >0: cross-entropy from hidden states this many tokens at a time, never all logits at once
    #                      (less memory at big micro-batches, one extra output matmul); 0 = plain loss
    seed: int = 1337
    # --- logging, evaluation, checkpoints ---
    log_every: int = 10  # steps between status lines
    eval_every: int = 200  # steps between evaluations (also at the end); 0 = only at the end
    eval_batches: int = 20  # validation micro-batches per evaluation
    save_every: int = 500  # steps between checkpoints (also at the end); 0 = only at the end
    keep_last: int = 2  # step_* checkpoints kept on disk
    resume: str = "auto"  # auto = newest complete checkpoint in out_dir | never | path to a step_* dir
    logger: str = "none"  # none | wandb | swanlab | tensorboard
    run_name: str = ""  # name for the external logger (default: out_dir's name)
    # --- mixed precision and the input pipeline (trainer/guard.py, dataset/batches.py PrefetchBatches) ---
    fp16_init_scale: float = 65536.0  # dtype=fp16: GradScaler's first loss scale (it halves on each overflow)
    max_skipped_steps: int = 20  # stop after this many optimizer steps in a row skipped for non-finite gradients
    prefetch: bool = True  # build the next step's batches in a background thread (pinned memory on CUDA)
