"""main.py and the config system: stage listing, unknown stage/key errors, typing and precedence."""

import inspect
import re
import subprocess
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest

from trainer.config import ConfigError, load_config
from trainer.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]


def run_main(*args):
    return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.slow  # runs main.py in a fresh interpreter
def test_help_lists_every_stage():
    out = run_main("--help")
    assert out.returncode == 0
    for name, (module, description) in STAGES.items():
        assert (ROOT / (module.replace(".", "/") + ".py")).exists(), module
        assert f"  {name:<10} {description}" in out.stdout, name


@pytest.mark.slow  # runs main.py in a fresh interpreter
def test_unknown_stage_fails_with_message():
    out = run_main("--stage", "pretrian")
    assert out.returncode == 2 and "unknown stage 'pretrian'" in out.stderr


@pytest.mark.slow
def test_unknown_key_and_bad_value_fail_naming_the_key():
    out = run_main("--stage", "pretrain", "max_stepz=3")
    assert out.returncode == 2 and "max_stepz" in out.stderr
    out = run_main("--stage", "pretrain", "max_steps=three")
    assert out.returncode == 2 and "max_steps" in out.stderr


@dataclass
class Demo:
    lr: float = 1e-3
    steps: int = 10
    name: str = "x"
    compile: bool = False
    batch_size: int | str = 4
    maybe: int | None = None


def test_precedence_and_coercion(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("lr: 0.5\nsteps: 20\nname: from_yaml\n")
    cfg = load_config(Demo, str(yaml_file), ["steps=30", "compile=true", "batch_size=auto", "maybe=none"])
    assert (cfg.lr, cfg.steps, cfg.name, cfg.compile, cfg.batch_size, cfg.maybe) == (
        0.5,
        30,
        "from_yaml",
        True,
        "auto",
        None,
    )
    assert load_config(Demo, None, ["steps=1e3", "batch_size=8"]).steps == 1000
    assert load_config(Demo, None, ["batch_size=8"]).batch_size == 8
    for bad in (["steps=2.5"], ["compile=maybe"], ["lr=fast"], ["nope=1"], ["steps"]):
        with pytest.raises(ConfigError):
            load_config(Demo, None, bad)
    yaml_file.write_text("stepz: 3\n")
    with pytest.raises(ConfigError, match="stepz"):
        load_config(Demo, str(yaml_file))


# -----------------------------------------------------------------------------
# A key a stage never reads is refused, naming the key and the stage; the batch unit is said per stage

TRAINING_STAGES = ("pretrain", "sft", "lora", "dpo", "reward", "ppo", "grpo", "distill")


@pytest.mark.parametrize("stage", TRAINING_STAGES)
def test_keys_a_stage_never_reads_are_refused_from_yaml_and_command_line(stage, tmp_path):
    import dataclasses
    import importlib

    from trainer.config import not_here

    cls = importlib.import_module(f"trainer.{stage}").Config
    fields = {f.name for f in dataclasses.fields(cls)}
    # The ones the issue names: keys other stages read, and this one has no field for; what must stay accepted
    # where it is read is a field there.
    expected = {
        "pretrain": {"data_path"},
        "sft": {"data_dir", "model_config"},
        "lora": {"data_dir", "model_config"},
        "dpo": {"data_dir", "model_config", "loss_chunk"},
        "reward": {"data_dir", "model_config", "loss_chunk"},
        "ppo": {"data_dir", "model_config", "loss_chunk", "eval_every", "eval_batches"},
        "grpo": {"data_dir", "model_config", "loss_chunk", "eval_every", "eval_batches"},
        "distill": {"loss_chunk"},
    }
    read_elsewhere = {"data_path", "data_dir", "model_config", "loss_chunk", "eval_every", "eval_batches"}
    assert read_elsewhere - fields == expected[stage] and not (expected[stage] & fields)
    yaml_file = tmp_path / "c.yaml"
    for key in expected[stage]:
        why = not_here(stage, key)
        assert why, f"{key}: a key another stage reads says why it is not read here"
        message = f"'{key}' (command line) is not used by stage {stage} (trainer.{stage}.Config): {why}; remove it"
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(cls, None, [f"{key}=1"])
        yaml_file.write_text(f"{key}: 1\n")
        with pytest.raises(ConfigError, match=rf"'{key}' \({yaml_file}\) is not used by stage {stage}"):
            load_config(cls, str(yaml_file))
    unit = {"dpo": "pairs", "reward": "pairs", "ppo": "replies", "grpo": "replies"}.get(stage, "sequences")
    assert cls.batch_unit == unit


def test_the_reasons_a_key_is_not_read_are_those_of_before():
    """The messages of the class tables this replaced, word for word."""
    from trainer.config import not_here

    assert not_here("pretrain", "data_path") == "pretraining reads token shards from data_dir"
    assert not_here("lora", "data_dir") == "chat data comes from data_path"
    assert not_here("reward", "model_config") == "the architecture comes from init_from's config.json"
    assert not_here("grpo", "model_config") == "the policy's architecture comes from init_from's config.json"
    assert not_here("dpo", "loss_chunk") == (
        "the DPO loss sums per-token log-probs from the full logits, not a chunked cross-entropy"
    )
    assert not_here("ppo", "eval_every") == (
        "rollout stages have no validation set (rollout statistics are logged every step)"
    )
    assert not_here("eval", "data_dir") is None  # no stage-specific reason: the unknown-key message


@pytest.mark.slow
def test_main_refuses_an_unused_key_before_running():
    out = run_main("--stage", "dpo", "--config", "config/dpo.yaml", "loss_chunk=256")
    assert out.returncode == 2 and "'loss_chunk' (command line) is not used by stage dpo" in out.stderr


def test_dash_dash_key_value_overrides_equal_key_value():
    from trainer.config import parse_overrides

    assert parse_overrides(
        ["--lr", "3e-4", "steps=30", "--name=a=b", "--max-steps", "-1", "--compile", "--maybe", "--batch_size", "8"]
    ) == {
        "lr": "3e-4",
        "steps": "30",
        "name": "a=b",
        "max_steps": "-1",
        "compile": "true",
        "maybe": "true",
        "batch_size": "8",
    }
    # a key=value after a bare flag is the next override, not the flag's value
    assert parse_overrides(["--compile", "steps=3"]) == {"compile": "true", "steps": "3"}
    flags = load_config(Demo, None, ["--steps", "30", "--compile", "--name", "y", "--batch-size", "auto"])
    assert flags == load_config(Demo, None, ["steps=30", "compile=true", "name=y", "batch_size=auto"])
    for bad in (["steps", "3"], ["--", "3"]):
        with pytest.raises(ConfigError, match="key"):
            parse_overrides(bad)


@pytest.mark.slow
def test_main_accepts_dash_dash_overrides_in_order(tmp_path):
    import main

    # Through the real dispatcher: a --key value pair reaches the stage config together (its bad value fails
    # naming the key), and an unknown --key is reported with the hint of the key that does the same.
    out = run_main("--stage", "pretrain", "--max_steps", "three")
    assert out.returncode == 2 and "'max_steps'" in out.stderr and "three" in out.stderr
    out = run_main("--stage", "pretrain", "--gradient_accumulation_steps", "4")
    assert out.returncode == 2 and "unknown config key 'gradient_accumulation_steps'" in out.stderr
    assert "did you mean global_batch_size?" in out.stderr and "gradient_checkpointing" not in out.stderr
    assert main.main(["--stage", "pretrain", "--config", str(tmp_path / "missing.yaml"), "--lr", "1"]) == 2


@dataclass
class Trainerish:
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    batch_size: int = 4
    global_batch_size: int = 0
    gradient_checkpointing: bool = False
    max_steps: int = 10
    out_dir: str = "out"
    init_from: str = ""
    seq_len: int = 64
    warmup_steps: int = 0


@pytest.mark.parametrize(
    "key, target",
    [
        ("gradient_accumulation_steps", "global_batch_size"),
        ("learning_rate", "lr"),
        ("per_device_train_batch_size", "batch_size"),
        ("num_train_epochs", "max_steps"),
        ("epochs", "max_steps"),
        ("output_dir", "out_dir"),
        ("model_name_or_path", "init_from"),
        ("max_seq_length", "seq_len"),
        ("max_length", "seq_len"),
        ("warmup_ratio", "warmup_steps"),
        ("max_stepz", "max_steps"),
        ("bach_size", "batch_size"),
    ],
)
def test_unknown_key_hints_the_key_that_does_the_same(key, target):
    with pytest.raises(ConfigError) as err:
        load_config(Trainerish, None, [f"{key}=1"])
    message = str(err.value)
    assert f"did you mean {target}?" in message
    hinted = message.split("did you mean ")[1]
    assert all(
        other not in hinted.split("?")[0] for other in ("gradient_checkpointing", "lr_schedule") if other != target
    )
    if key == "gradient_accumulation_steps":
        assert "batch_size x accumulation" in message


def test_no_hint_when_nothing_is_close():
    with pytest.raises(ConfigError) as err:
        load_config(Trainerish, None, ["gradient_foo=1"])
    assert "did you mean" not in str(err.value)
    with pytest.raises(ConfigError) as err:  # an alias whose target this config lacks falls back to spelling
        load_config(Demo, None, ["gradient_accumulation_steps=2"])
    assert "did you mean" not in str(err.value)


# -----------------------------------------------------------------------------
# Config values are checked up front, in one place (trainer/config.py validate), naming the key and the choices


@pytest.mark.slow  # runs main.py in a fresh interpreter
@pytest.mark.parametrize(
    "stage, override, message",
    [
        ("pretrain", "lr_schedule=bogus", "lr_schedule must be cosine, wsd or constant, got 'bogus'"),
        ("pretrain", "batch_size=0", "config key 'batch_size': must be >= 1, got 0"),
        ("pretrain", "batch_size=many", "config key 'batch_size': expected a number or auto, got 'many'"),
        ("pretrain", "seq_len=0", "config key 'seq_len': must be >= 1, got 0"),
        ("pretrain", "dtype=int3", "dtype must be auto, bf16, fp16 or fp32, got 'int3'"),
        ("pretrain", "device=gpu", "device must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
        ("pretrain", "min_lr_ratio=1.5", "config key 'min_lr_ratio': must be in [0, 1], got 1.5"),
        ("sft", "on_bad_record=ignore", "on_bad_record must be skip, error or skip_file, got 'ignore'"),
        ("dpo", "loss_type=kto", "loss_type must be sigmoid, ipo or hinge, got 'kto'"),
        ("grpo", "top_p=1.5", "config key 'top_p': must be in [0, 1], got 1.5"),
        ("eval", "quantize=int2", "quantize must be none, int8 or int4, got 'int2'"),
    ],
)
def test_bad_values_fail_before_anything_runs(stage, override, message, tmp_path):
    out = run_main("--stage", stage, f"out_dir={tmp_path / 'run'}", override)
    assert out.returncode == 2 and message in out.stderr and "error: config key '" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and not (tmp_path / "run").exists()


@pytest.mark.slow  # runs main.py in a fresh interpreter
def test_negative_max_steps_writes_nothing(tmp_path):
    out = run_main("--stage", "pretrain", f"out_dir={tmp_path / 'run'}", "max_steps=-5")
    assert out.returncode == 2 and "config key 'max_steps': must be >= 1, got -5" in out.stderr
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.slow  # runs main.py in a fresh interpreter
def test_malformed_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 3e-4\nmax_steps: 10\nwarmup_steps: [1, 2\nseed: 3\n")
    out = run_main("--stage", "pretrain", "--config", str(bad))
    assert out.returncode == 2 and f"{bad}:4:" in out.stderr and "malformed YAML" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow  # runs main.py in a fresh interpreter
def test_missing_paths_are_named_before_a_model_is_built(tmp_path):
    out = run_main(
        "--stage",
        "sft",
        f"init_from={tmp_path / 'nope'}",
        f"tokenizer_dir={tmp_path / 'no_tok'}",
        f"out_dir={tmp_path / 'run'}",
    )
    assert out.returncode == 2 and f"init_from '{tmp_path / 'nope'}' is not a directory" in out.stderr
    assert "tokenizer" not in out.stderr.split("init_from")[0] and "Traceback" not in out.stderr
    out = run_main(
        "--stage",
        "pretrain",
        f"data_dir={tmp_path / 'no_shards'}",
        f"tokenizer_dir={tmp_path}",
        f"out_dir={tmp_path / 'run'}",
    )
    assert out.returncode == 2 and f"config key 'data_dir': '{tmp_path / 'no_shards'}' does not exist" in out.stderr
    out = run_main("--stage", "pretrain", f"resume={tmp_path / 'step_000009'}", f"out_dir={tmp_path / 'run'}")
    assert (
        out.returncode == 2 and "config key 'resume': must be auto, never or an existing step_* directory" in out.stderr
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # runs main.py in a fresh interpreter
def test_a_corpus_too_small_for_the_vocab_fails_clearly(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("你好" * 100, encoding="utf-8")
    out = run_main("--stage", "tokenizer", f"data_path={text}", "vocab_size=6400", f"out_dir={tmp_path / 'tok'}")
    assert out.returncode == 2 and "trained only" in out.stderr and "of the vocab_size=6400" in out.stderr
    assert "the corpus is too small" in out.stderr and not (tmp_path / "tok" / "tokenizer.json").exists()


def test_every_stage_default_is_valid_and_every_rule_is_well_formed():
    import dataclasses
    import importlib

    from trainer.config import PATH_KINDS, Bound, rules_of, validate

    for name, (module, _) in STAGES.items():
        cls = importlib.import_module(module).Config
        validate(load_config(cls), paths=False)
        for f in dataclasses.fields(cls):
            rules = rules_of(cls, f.name)
            assert set(rules) <= {"bound", "path", "device", "unchecked"}, (name, f.name)
            assert isinstance(rules.get("bound", Bound()), Bound) and rules.get("path", "dir") in PATH_KINDS


# The keys added after the tables were written, in process (load_config is what main.py runs first).
@pytest.mark.parametrize(
    "stage, override, message",
    [
        ("pretrain", "optimizer=bogus", "config key 'optimizer': optimizer must be adamw or muon, got 'bogus'"),
        ("sft", "muon_momentum=-3", "config key 'muon_momentum': must be in [0, 1), got -3.0"),
        ("pretrain", "muon_momentum=1", "config key 'muon_momentum': must be in [0, 1), got 1.0"),
        ("pretrain", "muon_lr_ratio=-1", "config key 'muon_lr_ratio': must be > 0, got -1.0"),
        ("pretrain", "fp16_init_scale=0", "config key 'fp16_init_scale': must be > 0, got 0.0"),
        ("dpo", "max_skipped_steps=-1", "config key 'max_skipped_steps': must be >= 1, got -1"),
        ("pretrain", "seed=-1", "config key 'seed': must be in [0, 2147483647], got -1"),
        ("grpo", "num_generations=1", "config key 'num_generations': must be >= 2, got 1"),
        ("ppo", "num_generations=0", "config key 'num_generations': must be >= 1, got 0"),
        ("grpo", "clip_eps=0", "config key 'clip_eps': must be > 0, got 0.0"),
        ("ppo", "clip_value=0", "config key 'clip_value': must be > 0, got 0.0"),
        ("eval", "repetition_penalty=0", "config key 'repetition_penalty': must be > 0, got 0.0"),
        ("tokenizer", "vocab_size=100", "config key 'vocab_size': must be >= 261, got 100"),
        ("tokenizer", "heldout_every=1", "config key 'heldout_every': must be >= 2, got 1"),
        ("all", "n_docs=0", "config key 'n_docs': must be >= 1, got 0"),
    ],
)
def test_late_keys_are_checked_by_load_config(stage, override, message):
    import importlib

    cls = importlib.import_module(STAGES[stage][0]).Config
    with pytest.raises(ConfigError) as err:
        load_config(cls, None, [override])
    assert str(err.value) == message


def float_fields(cls) -> list[str]:
    hints = typing.get_type_hints(cls)
    return [name for name, hint in hints.items() if hint is float or hint == (float | None)]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_nan_and_infinity_are_refused_for_every_number_of_every_stage(stage):
    """NaN compares false with everything, so it passed every bound (lr=nan, beta=nan, temperature=nan), and
    lr=inf trained into non-finite weights: every float field refuses both, from YAML, the command line or code."""
    import dataclasses
    import importlib

    from trainer.config import validate

    cls = importlib.import_module(STAGES[stage][0]).Config
    names = float_fields(cls)
    assert names or stage in ("tokenizer", "all"), stage  # the others all have one: a miss would test nothing
    for name in names:
        for text in ("nan", "inf", "-inf", "NaN", "Infinity"):
            with pytest.raises(ConfigError, match=f"config key '{name}': must be a finite number"):
                load_config(cls, None, [f"{name}={text}"])
        with pytest.raises(ConfigError, match=f"config key '{name}': must be a finite number"):
            validate(dataclasses.replace(load_config(cls), **{name: float("nan")}), paths=False)


def test_a_nan_from_a_yaml_file_is_refused(tmp_path):
    from trainer.sft import Config

    path = tmp_path / "sft.yaml"
    path.write_text("lr: .nan\nweight_decay: .inf\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="config key 'lr': must be a finite number, got nan"):
        load_config(Config, str(path))


@pytest.mark.parametrize(
    "content, message",
    [
        (
            "lr: 0.1\n# \xb5\n".encode("latin-1"),
            ":2: not UTF-8 text (byte b'\\xb5' at offset 10); save the file as UTF-8",
        ),
        (b"\xff\xfe\x00", "not UTF-8 text"),
        (b"1: 2\n", "config key 1 (CONFIG): a key must be a name, got int"),
        (b"true: x\n", "config key True (CONFIG): a key must be a name, got bool"),
        (b"~: 1\n", "config key None (CONFIG): a key must be a name, got NoneType"),
    ],
)
def test_config_files_that_are_not_utf8_or_have_non_string_keys_fail_naming_the_file(tmp_path, content, message):
    """A YAML file in another encoding ended in a UnicodeDecodeError naming no file; a key such as `1:` in a
    TypeError from the key hint. Both are config errors naming the file now."""
    from trainer.sft import Config

    path = tmp_path / "sft.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        load_config(Config, str(path))
    assert str(path) in str(err.value) and message.replace("CONFIG", str(path)) in str(err.value)


@pytest.mark.slow  # main.py in a fresh interpreter
def test_main_py_reports_a_non_utf8_config_without_a_traceback(tmp_path):
    path = tmp_path / "pretrain.yaml"
    path.write_bytes("max_steps: 3 # \u6b65\u6570\n".encode("gbk"))
    out = run_main("--stage", "pretrain", "--config", str(path))
    assert out.returncode == 2 and "Traceback" not in out.stderr and f"error: {path}:1: not UTF-8 text" in out.stderr


def test_a_config_made_in_code_is_checked_before_a_model_is_built():
    from trainer import grpo

    with pytest.raises(ConfigError, match="'num_generations': must be >= 2, got 1"):
        grpo.run(grpo.Config(num_generations=1))  # the default paths do not exist: nothing was read or built


# -----------------------------------------------------------------------------
# A guard against the next key: every field a value can be wrong for has a rule, or says why any value will do

# Fields validate() checks with a rule of its own rather than a field rule.
OWN_RULES = {"resume": "auto | never | an existing step_* directory"}
_STR_FIELD = re.compile(
    r'^ +(\w+): (?:str|Literal\[.*\]|DtypeName) = (?:setting\()?"([^"]*)"[^#\n]*(?:# *(.*))?$', re.M
)
_BARE_WORD = re.compile(r"[a-z][a-z0-9_]*")


def vocabulary_fields(cls) -> set[str]:
    """str fields of cls (its bases too) that take one of a fixed vocabulary: a bare-word default ("cosine",
    "auto") or a trailing comment that lists alternatives ("sigmoid | ipo | hinge")."""
    found = set()
    for klass in cls.__mro__[:-1]:  # not object
        for name, default, comment in _STR_FIELD.findall(inspect.getsource(klass)):
            if _BARE_WORD.fullmatch(default) or " | " in comment:
                found.add(name)
    return found


def test_vocabulary_fields_finds_the_enums():
    from trainer import eval as eval_stage
    from trainer import pretrain

    assert {"optimizer", "lr_schedule", "dtype", "parallel", "logger", "device", "resume"} <= vocabulary_fields(
        pretrain.Config
    )
    assert {"quantize", "mc_score", "mc_split"} <= vocabulary_fields(eval_stage.Config)
    assert not {"out_dir", "data_dir", "init_from", "sample_prompts", "run_name"} & vocabulary_fields(pretrain.Config)


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_field_is_checked_or_listed_as_unchecked(stage):
    import dataclasses
    import importlib

    from trainer.config import rules_of

    cls = importlib.import_module(STAGES[stage][0]).Config
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        rules = rules_of(cls, f.name)
        kinds = typing.get_args(hints[f.name]) or (hints[f.name],)  # batch_size: int | str
        checked = "bound" in rules or rules.get("device") or typing.get_origin(hints[f.name]) is typing.Literal
        checked = checked or f.name in OWN_RULES
        if "unchecked" in rules:
            assert rules["unchecked"] and not checked, f"{f.name}: either checked or unchecked, with the reason"
        if int in kinds or float in kinds:
            assert "bound" in rules or "unchecked" in rules, (
                f"{cls.__module__}.Config.{f.name} is a number without a bound: give it setting(..., bound=...), "
                f"or setting(..., unchecked=...) with the reason every value is valid"
            )
    for name in vocabulary_fields(cls):
        rules = rules_of(cls, name)
        assert (
            typing.get_origin(hints[name]) is typing.Literal
            or rules.get("device")
            or name in OWN_RULES
            or ("unchecked" in rules)
        ), (
            f"{cls.__module__}.Config.{name} takes one of a fixed vocabulary: annotate it Literal[...], "
            f"or give it setting(..., unchecked=...) with the reason"
        )


def test_help_does_not_import_torch():
    """Issue 27.6: `--help` took ~6 s because main.py imported torch first; it answers before any stage import
    (bench/bench_startup.py measures the time; tests never assert it)."""
    code = (
        "import sys, main\ntry:\n    main.main(['--help'])\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("False"), out.stdout[-300:]


@pytest.mark.slow  # runs main.py in a fresh interpreter
@pytest.mark.parametrize("override", ["data_path=/nonexistent/corpus.jsonl", "data_path="])
def test_tokenizer_stage_without_its_data_is_one_line_and_exit_2(override, tmp_path):
    out = run_main("--stage", "tokenizer", override, f"out_dir={tmp_path / 'tok'}")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith("error: data_path") and out.stderr.count("\n") == 1, out.stderr


def test_the_log_shows_only_the_keys_that_differ_from_the_defaults():
    """Issue 27.6: 205 of the demo's 395 lines were full config dumps; config.yaml keeps the whole config."""
    from trainer.config import format_config
    from trainer.sft import Config

    lines = format_config(Config(lr=1e-3, out_dir="out/x")).splitlines()
    assert lines[:2] == ["  out_dir: 'out/x'", "  lr: 0.001"]  # declaration order
    assert len(lines) == 3 and "keys at their defaults" in lines[2]


def test_a_saved_config_holds_only_what_the_stage_reads_and_reads_back(tmp_path):
    """Issue 27.6: SFT's config.yaml said `model_config: config/model/small.json` for a tiny model (SFT takes the
    architecture from init_from, so that default never applied)."""
    from trainer.config import save_config
    from trainer.sft import Config

    save_config(Config(lr=1e-3), str(tmp_path / "config.yaml"))
    text = (tmp_path / "config.yaml").read_text(encoding="utf-8")
    assert "model_config" not in text and "lr: 0.001" in text
    assert load_config(Config, str(tmp_path / "config.yaml"), []).lr == 1e-3
