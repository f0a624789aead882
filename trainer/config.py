"""
Stage configs: flat dataclasses filled from YAML and `key=value` (or `--key value`) overrides.

Precedence: dataclass defaults < YAML file < command-line overrides. Unknown keys and values that do not
fit the field's type fail at once with a message naming the key (nanoGPT's strictness, without exec).

    cfg = load_config(PretrainConfig, "config/pretrain.yaml", ["lr=3e-4", "max_steps=100"])

A setting's rules sit on its own line: `Literal[...]` for a fixed vocabulary, and `setting(default, bound=...,
path=..., device=True, unchecked="why")` for a numeric range, a path that must exist, a device name, or the reason
any value of its type will do. validate(cfg) walks the fields and raises ConfigError naming the key and what is
allowed. load_config runs the value checks; run_trainer and the non-training stages' run() run them again with the
path checks, before any model is built (a Config made in code is checked too).

A stage's Config mixes in what it reads (TrainConfig, the loop's settings, plus ShardData, FileData, TokenLoss,
Evaluation, Architecture), so it has no key it does not read; NOT_HERE says why a key another stage reads is not one
of its keys.
"""

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass
from typing import ClassVar, Literal

import yaml

from dataset.text_sources import expand_paths
from model.runtime import DTYPES, check_checkpoint_dir, resolve_device
from trainer.checkpoint import CheckpointError, verify_checksums
from trainer.common import no_tokenizer_at
from trainer.errors import ConfigError, MissingPathError  # torch-free, for the scripts; imported from here too

OPTIMIZERS = ("adamw", "muon")  # trainer/optim.py builds them
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_OVERRIDE_PAIR = re.compile(r"[A-Za-z_][\w-]*=")  # `key=value`: the start of the next override


# -----------------------------------------------------------------------------
# A setting's rules, on its own line


@dataclass(frozen=True)
class Bound:
    """A numeric range; None = unbounded on that side. NaN and infinity are outside every range: NaN compares
    false with everything, so without the check it would pass any bound, and no setting is meant to be infinite."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value) -> bool:
        if not is_finite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or (value < self.high or (not self.high_open and value == self.high))

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"


def at_least(low: float) -> Bound:
    return Bound(low)


def above(low: float) -> Bound:
    return Bound(low, low_open=True)


def between(low: float, high: float, *, high_open: bool = False) -> Bound:
    return Bound(low, high, high_open=high_open)


def is_finite(value) -> bool:
    """False for a NaN or infinite float; True for any int (math.isfinite would overflow on a huge one)."""
    return not isinstance(value, float) or math.isfinite(value)


SEED_RANGE = between(0, 2**31 - 1)  # seed + rank goes to np.random.seed, which takes [0, 2**32)


def setting(
    default=dataclasses.MISSING,
    *,
    bound: Bound | None = None,
    path: str | None = None,
    device: bool = False,
    unchecked: str = "",
):
    """A dataclass field with its rules in its metadata, read by validate(): bound (a numeric range), path (a
    PATH_KINDS entry: what must exist when the stage runs), device (a device name; "" = the training device),
    unchecked (why any value of its type is valid). A plain `name: type = default` is for what needs no rule
    (bools, free text) or for a subclass that changes only the default (the base's rules hold, rules_of);
    Literal[...] annotations carry their own choices."""
    rules = {"bound": bound, "path": path, "device": device, "unchecked": unchecked}
    metadata = {k: v for k, v in rules.items() if v}
    return dataclasses.field(default=default, metadata=metadata)


def _coerce(key: str, value, annotation):
    """Turn a YAML or command-line value into the field's type, or raise ConfigError naming the key. One coercer per
    kind of annotation (COERCERS, below); a kind with none (e.g. a list) keeps the value as it is."""
    coerce = COERCERS.get(typing.get_origin(annotation) or annotation)
    return coerce(key, value, annotation) if coerce else value


def _wrong(key: str, value, expected: str) -> ConfigError:
    return ConfigError(f"config key '{key}': expected {expected}, got {value!r}")


def _coerce_literal(key: str, value, annotation):
    """A fixed vocabulary: coerced to its values' type; validate() checks it is one of them."""
    return _coerce(key, value, type(typing.get_args(annotation)[0]))


def _coerce_union(key: str, value, annotation):
    """E.g. `int | None`: the first type that takes the value; none/null/"" mean None."""
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
        return None
    errors = []
    for option in (a for a in typing.get_args(annotation) if a is not type(None)):
        try:
            return _coerce(key, value, option)
        except ConfigError as e:
            errors.append(e)
    raise errors[0]


def _coerce_bool(key: str, value, annotation):
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    if not isinstance(value, bool):
        raise _wrong(key, value, "true/false")
    return value


def _coerce_number(key: str, value, annotation):
    """int or float; a string such as 1e6 or 1_000_000 too. A bool is not a number here, nor 2.5 an int."""
    expected = "an integer" if annotation is int else "a number"
    if isinstance(value, bool):
        raise _wrong(key, value, expected)
    if isinstance(value, int) and annotation is int:
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _wrong(key, value, expected) from None
    if annotation is int and not number.is_integer():
        raise _wrong(key, value, expected)
    return int(number) if annotation is int else number


def _coerce_str(key: str, value, annotation):
    if isinstance(value, (dict, list)):
        raise _wrong(key, value, "a string")
    return "" if value is None else str(value)


def _coerce_mapping(key: str, value, annotation):
    if not isinstance(value, dict):
        raise _wrong(key, value, "a mapping")
    return value


# What typing.get_origin(annotation) (or the annotation itself, for a plain type) is -> its coercer.
COERCERS = {
    Literal: _coerce_literal,
    typing.Union: _coerce_union,
    types.UnionType: _coerce_union,
    bool: _coerce_bool,
    int: _coerce_number,
    float: _coerce_number,
    str: _coerce_str,
    dict: _coerce_mapping,
}


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
            key, value, i = _flag_override(args, i)
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


def _flag_override(args: list[str], i: int) -> tuple[str, str, int]:
    """args[i] is `--key=value`, `--key value` or a bare `--flag`: (key, value, index of the last argument used)."""
    key, sep, value = args[i][2:].partition("=")
    if sep:
        return key, value, i
    nxt = args[i + 1] if i + 1 < len(args) else None
    if nxt is None or nxt.startswith("--") or _OVERRIDE_PAIR.match(nxt):
        return key, "true", i
    return key, nxt, i + 1


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


def read_yaml(yaml_path: str) -> dict:
    """A YAML config file's mapping of key: value; ConfigError naming the file (and line) when it is not one."""
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
    return data


def load_config(cls, yaml_path: str | None = None, overrides: list[str] | dict | None = None):
    """Build a `cls` dataclass: defaults, then the YAML file, then overrides. Strict about keys and types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    sources = []
    if yaml_path:
        sources.append((yaml_path, read_yaml(yaml_path)))
    if overrides:
        sources.append(("command line", overrides if isinstance(overrides, dict) else parse_overrides(overrides)))
    for where, data in sources:
        for key, value in data.items():
            if key not in fields:
                raise unknown_key(cls, key, where)
            values[key] = _coerce(key, value, hints[key])
    try:
        cfg = cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None
    validate(cfg, paths=False)  # the paths are checked when the stage runs: an earlier stage may write them
    return cfg


# Keys a stage has no field for although other stages read them, with why: the stage's own words instead of
# "unknown config key". stage names (space-separated) -> why.
NOT_HERE = {
    "data_path": {"pretrain": "pretraining reads token shards from data_dir"},
    "data_dir": {
        "sft lora": "chat data comes from data_path",
        "dpo reward": "preference pairs come from data_path",
        "ppo grpo": "prompts come from data_path",
    },
    "model_config": {
        "sft lora dpo reward": "the architecture comes from init_from's config.json",
        "ppo grpo": "the policy's architecture comes from init_from's config.json",
    },
    "loss_chunk": {
        "dpo": "the DPO loss sums per-token log-probs from the full logits, not a chunked cross-entropy",
        "reward": "the reward model reads one score per sequence, there is no token cross-entropy",
        "ppo grpo": "the policy loss needs per-token log-probs from the full logits",
        "distill": "the distillation loss needs the student's full logits for the KL term",
    },
    "eval_every": {"ppo grpo": "rollout stages have no validation set (rollout statistics are logged every step)"},
    "eval_batches": {"ppo grpo": "rollout stages have no validation set"},
}


def unknown_key(cls, key, where: str) -> ConfigError:
    """The error for a key `cls` has no field for: why its stage does not read it (NOT_HERE), or a spelling hint."""
    if not isinstance(key, str):  # YAML reads `1: 2` or `true: x` as a number or bool key
        return ConfigError(f"config key {key!r} ({where}): a key must be a name, got {type(key).__name__}")
    stage = cls.__module__.rsplit(".", 1)[-1]
    why = not_here(stage, key)
    if why:
        return ConfigError(
            f"config key '{key}' ({where}) is not used by stage {stage} "
            f"({cls.__module__}.{cls.__qualname__}): {why}; remove it"
        )
    hint = did_you_mean(key, [f.name for f in dataclasses.fields(cls)])
    return ConfigError(f"unknown config key '{key}' ({where}) for {cls.__name__}{hint}")


def not_here(stage: str, key: str) -> str | None:
    """Why stage `stage` has no key `key` (NOT_HERE), or None when no stage reads it either."""
    return next((why for stages, why in NOT_HERE.get(key, {}).items() if stage in stages.split()), None)


# -----------------------------------------------------------------------------
# Validation: one walk over the fields, each carrying its rules


def rules_of(cls, key: str) -> dict:
    """The rules setting() gave field `key`: its own, or, where a subclass only changes the default
    (`lr: float = 1e-4`), its base's."""
    for klass in cls.__mro__:
        field = getattr(klass, "__dataclass_fields__", {}).get(key)
        if field is not None and field.metadata:
            return field.metadata
    return {}


def validate(cfg, *, paths: bool = True) -> None:
    """Every value of `cfg` against its field's rules; paths=True also checks what must exist. Raises ConfigError
    (MissingPathError for a missing path) naming the key and what is allowed."""
    cls = type(cfg)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cfg):
        key, rules, value = field.name, rules_of(cls, field.name), getattr(cfg, field.name)
        if not is_finite(value):  # every number, bounded or not: NaN passes any bound
            raise ConfigError(f"config key '{key}': must be a finite number, got {value!r}")
        if typing.get_origin(hints[key]) is Literal and value not in typing.get_args(hints[key]):
            raise _not_a_choice(key, value, typing.get_args(hints[key]))
        bound = rules.get("bound")
        if bound and not (key == "batch_size" and value == "auto"):
            if isinstance(value, str):
                raise _not_a_number(key, value)
            if not bound.holds(value):
                raise ConfigError(f"config key '{key}': must be {bound}, got {value!r}")
        if rules.get("device") and value:  # "" = the training device, where allowed
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
        for field in dataclasses.fields(cfg):
            if "path" in rules_of(cls, field.name):
                _check_path(cfg, field.name, rules_of(cls, field.name)["path"])


def _not_a_number(key: str, value: str) -> ConfigError:
    return ConfigError(
        f"config key '{key}': expected a number{' or auto' if key == 'batch_size' else ''}, got {value!r}"
    )


def _not_a_choice(key: str, value, choices: tuple) -> ConfigError:
    names = [str(a) for a in choices]
    return ConfigError(f"config key '{key}': {key} must be {', '.join(names[:-1])} or {names[-1]}, got {value!r}")


def _check_path(cfg, key: str, kind: str) -> None:
    """The check of PATH_CHECKS[kind] (below). An empty value is not checked: it means "none" or "the default" to
    the stage."""
    value = getattr(cfg, key)
    if value:
        PATH_CHECKS[kind](cfg, key, value)


def _check_dir(cfg, key: str, value: str) -> None:
    if not os.path.isdir(value.strip()):
        raise MissingPathError(f"config key '{key}': '{value.strip()}' does not exist (or is not a directory)")


def _check_dirs(cfg, key: str, value: str) -> None:
    """Comma-separated directories, each of which must exist."""
    for path in value.split(","):
        _check_dir(cfg, key, path)


def _check_tokenizer(cfg, key: str, value: str) -> None:
    """A tokenizer folder, needed only when init_from brings none."""
    init_from = getattr(cfg, "init_from", "")
    brought = bool(init_from) and os.path.isfile(os.path.join(init_from, "tokenizer.json"))
    if not brought and not os.path.isdir(value):
        raise MissingPathError(f"config key '{key}': {no_tokenizer_at(value)}")


def _check_checkpoint(cfg, key: str, value: str) -> None:
    """A saved model dir; its files verified against its checksums.json when it has one."""
    try:
        check_checkpoint_dir(value, key)
    except (FileNotFoundError, ValueError) as e:
        raise _missing_path(key, e) from None
    try:  # a final/ or step_*/ whose bytes changed since the save fails here, naming the file
        verify_checksums(value)
    except CheckpointError as e:
        raise ConfigError(f"config key '{key}': {e}") from None


def _check_files(cfg, key: str, value: str) -> None:
    """Data files, globs, folders (dataset/text_sources.py expand_paths)."""
    try:
        expand_paths(value)
    except (FileNotFoundError, ValueError) as e:
        raise _missing_path(key, e) from None


def _missing_path(key: str, e: Exception) -> MissingPathError:
    message = str(e)
    return MissingPathError(message if message.startswith(key) else f"config key '{key}': {message}")


# What a `path=` setting must be when the stage runs -> its check.
PATH_CHECKS = {
    "dir": _check_dir,
    "dirs": _check_dirs,
    "checkpoint": _check_checkpoint,
    "files": _check_files,
    "tokenizer": _check_tokenizer,
}
PATH_KINDS = tuple(PATH_CHECKS)


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)  # every field is one the stage reads (no stage has a key it does not read)


def format_config(cfg) -> str:
    """One `key: value` line per field that differs from the Config's default, in declaration order, for the start
    of a run's log (the whole config is saved as config.yaml; a full dump was half of the demo's output)."""
    defaults = config_to_dict(type(cfg)())
    values = config_to_dict(cfg)
    changed = [f"  {k}: {v!r}" for k, v in values.items() if v != defaults.get(k)]
    return "\n".join(changed + [f"  ({len(values) - len(changed)} keys at their defaults; all in config.yaml)"])


def save_config(cfg, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False, allow_unicode=True)


# -----------------------------------------------------------------------------
# The settings of the training stages. TrainConfig: what the Trainer's loop reads in every stage. The mixins below
# it: what only some stages read; a stage's Config mixes in those it reads and adds its own fields.

DtypeName = Literal[("auto", *DTYPES)]


@dataclass
class TrainConfig:
    # batch_unit: what batch_size and global_batch_size count in this stage (a class attribute, not a key).
    batch_unit: ClassVar[str] = "sequences"
    # --- what to train, on what ---
    init_from: str = setting("", path="checkpoint")  # checkpoint dir to start from (a stage's final/ or step_*/);
    #                                                   "" = random init from model_config where the stage has one
    tokenizer_dir: str = setting("out/tokenizer", path="tokenizer")  # HF tokenizer folder (the tokenizer stage's)
    out_dir: str = "out/run"  # checkpoints, metrics.jsonl, config.yaml
    # --- batch and schedule ---
    max_steps: int = setting(1000, bound=at_least(1))  # optimizer steps
    batch_size: int | str = setting(16, bound=at_least(1))  # micro-batch per process, in batch_unit; "auto" =
    #                                                         largest that fits (CUDA probe)
    global_batch_size: int = setting(0, bound=at_least(0))  # batch_unit per optimizer step over all processes;
    #                                                          0 = batch_size x processes
    seq_len: int = setting(512, bound=at_least(1))  # tokens per sequence
    lr: float = setting(3e-4, bound=at_least(0))  # peak learning rate
    min_lr_ratio: float = setting(0.1, bound=between(0, 1))  # final learning rate as a fraction of lr
    warmup_steps: int = setting(100, bound=at_least(0))  # linear warmup from 0
    lr_schedule: Literal["cosine", "wsd", "constant"] = "cosine"  # wsd = warmup-stable-decay
    decay_ratio: float = setting(0.2, bound=between(0, 1))  # wsd: share of steps spent in the final linear decay
    weight_decay: float = setting(0.1, bound=at_least(0))  # decay on matrices (not norms or biases), AdamW's and
    #                                                         Muon's
    decay_embeddings: bool = True  # false: no weight decay on the token embedding and the output head
    beta1: float = setting(0.9, bound=between(0, 1, high_open=True))  # AdamW betas (under optimizer=muon: of the
    #                                                                     embeddings, head, norms)
    beta2: float = setting(0.95, bound=between(0, 1, high_open=True))
    optimizer: Literal[OPTIMIZERS] = "adamw"  # muon: Muon for the hidden matrices, AdamW for the rest
    #                                           (trainer/optim.py)
    # muon: the hidden matrices' peak lr as a multiple of lr (the AdamW groups keep lr); Muon scales it per matrix by
    # 0.2*sqrt(max(out, in)) (trainer/optim.py); 10 suits short runs, config/pretrain.yaml's long ones use 5
    # (bench/RESULTS.md). Above 0: 0 would freeze every hidden matrix under Muon (lr=0 freezes everything).
    muon_lr_ratio: float = setting(10.0, bound=above(0))
    muon_momentum: float = setting(0.95, bound=between(0, 1, high_open=True))  # muon: Nesterov momentum of the
    #                                                                            hidden matrices (1 never forgets)
    grad_clip: float = setting(1.0, bound=at_least(0))  # clip the global grad norm to this; 0 = off
    # --- system ---
    device: str = setting("auto", device=True)  # auto (CUDA, then Apple MPS, then CPU) | cpu | cuda | cuda:N | mps
    dtype: DtypeName = "auto"  # auto (bf16 on capable GPUs, fp16 + GradScaler on older ones, fp32 on CPU)
    compile: bool = False  # torch.compile the model
    threads: int = setting(0, bound=at_least(0))  # CPU intra-op threads; 0 = auto: OMP_NUM_THREADS if set, else
    #                                 the idle cores, at most 4 (model/runtime.py auto_cpu_threads; on a busy
    #                                 machine 1 thread beats one per core)
    # under torchrun: ddp (every GPU holds the whole model) | fsdp (weights, grads and optimizer state sharded over
    # the GPUs, for a model that does not fit one; pretrain and sft)
    parallel: Literal["ddp", "fsdp"] = "ddp"
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory for one more forward
    seed: int = setting(1337, bound=SEED_RANGE)
    # --- logging and checkpoints ---
    log_every: int = setting(10, bound=at_least(1))  # steps between status lines
    save_every: int = setting(500, bound=at_least(0))  # steps between checkpoints (also at the end); 0 = only at
    #                                                     the end
    keep_last: int = setting(2, bound=at_least(0))  # step_* checkpoints kept on disk
    resume: str = "auto"  # auto = newest complete checkpoint in out_dir | never | path to a step_* dir
    logger: Literal["none", "wandb", "swanlab", "tensorboard"] = "none"
    run_name: str = ""  # name for the external logger (default: out_dir's name)
    # --- mixed precision and the input pipeline (trainer/guard.py, dataset/batches.py PrefetchBatches) ---
    # dtype=fp16: GradScaler's first loss scale (it halves on each overflow); 0 would zero every gradient
    fp16_init_scale: float = setting(65536.0, bound=above(0))
    # stop after this many optimizer steps in a row skipped for non-finite gradients; 0 would stop at the first
    # check, before any step was skipped
    max_skipped_steps: int = setting(20, bound=at_least(1))
    prefetch: bool = True  # build the next step's batches in a background thread (pinned memory on CUDA)


@dataclass
class Architecture:
    """Stages that may start from random weights (pretrain, distill's student)."""

    model_config: str = "config/model/small.json"  # architecture preset (used when init_from is empty)


@dataclass
class ShardData:
    """Stages that read token shards (dataset/shards.py)."""

    data_dir: str = setting("", path="dir")  # token shards (pretraining data)


@dataclass
class FileData:
    """Stages that read records from data files (dataset/records.py: chat, preference pairs, prompts)."""

    data_path: str = setting("", path="files")  # data files, globs or parquet/Arrow/save_to_disk, comma-separated
    columns: str = ""  # rename record keys, "src=dst,..." (e.g. dialog=conversations,q=user,a=assistant); "" = none
    # skip (counted, first few printed; a file that yields nothing or loses over half its records stops the run)
    # | error (stop at the first, naming file:line) | skip_file (skip, and go on without such a file, warned)
    on_bad_record: Literal["skip", "error", "skip_file"] = "skip"
    max_samples: int = setting(0, bound=at_least(0))  # usable records read per file; 0 = all (quick runs)


@dataclass
class TokenLoss:
    """Stages whose loss is the token cross-entropy (model/model_slm.py)."""

    # >0: cross-entropy from hidden states this many tokens at a time, never all logits at once (less memory at big
    # micro-batches, one extra output matmul); 0 = plain loss
    loss_chunk: int = setting(0, bound=at_least(0))


@dataclass
class Evaluation:
    """Stages with a validation set."""

    eval_every: int = setting(200, bound=at_least(0))  # steps between evaluations (also at the end); 0 = only at
    #                                                     the end
    eval_batches: int = setting(20, bound=at_least(0))  # validation micro-batches per evaluation
