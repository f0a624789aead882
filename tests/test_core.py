"""
The Trainer's hook surface (trainer/core.py): every override point a stage uses is documented in one place and
takes keyword-only arguments, and the shared loop knows nothing about any one kind of data.

    python -m pytest tests/test_core.py
"""

import importlib
import inspect

from trainer.core import Trainer

STAGES = ("pretrain", "sft", "lora", "dpo", "reward", "ppo", "grpo", "distill", "rollout")
PRIVATE_HELPERS = {"policy_loss", "score_rollout", "make_rollout", "reference_logps", "unpack", "values"}


def stage_trainers() -> list[type]:
    classes = []
    for name in STAGES:
        module = importlib.import_module(f"trainer.{name}")
        classes += [c for _, c in inspect.getmembers(module, inspect.isclass)
                    if issubclass(c, Trainer) and c is not Trainer and c.__module__ == module.__name__]
    return classes


def overridden_hooks() -> dict[str, list[str]]:
    """Trainer methods that some stage class defines again -> the classes that do."""
    hooks = {}
    for cls in stage_trainers():
        for name, value in vars(cls).items():
            if callable(value) and not name.startswith("__") and hasattr(Trainer, name):
                hooks.setdefault(name, []).append(cls.__name__)
    return hooks


def test_every_hook_a_stage_overrides_is_documented_with_keyword_only_arguments():
    hooks = overridden_hooks()
    assert {"build_data", "compute_loss", "count_loss_items", "count_tokens", "setup", "build_model", "should_save",
            "on_eval", "next_step", "train_step", "extra_state", "load_extra_state", "trainable_parameters",
            "extra_eval_metrics", "save_pretrained_to", "read_checkpoint_weights", "load_checkpoint_weights",
            "next_stage_hint"} <= set(hooks)
    for name in hooks:
        assert f"{name}(" in Trainer.__doc__, f"{name} is overridden by {hooks[name]} but not in Trainer's docstring"
        for cls in [Trainer] + [c for c in stage_trainers() if name in vars(c)]:
            params = list(inspect.signature(getattr(cls, name)).parameters.values())[1:]
            positional = [p.name for p in params if p.kind != p.KEYWORD_ONLY]
            assert not positional, f"{cls.__name__}.{name}: {positional} should be keyword-only"


def test_the_loop_knows_no_kind_of_data_and_passes_no_state_on_the_side():
    loop = inspect.getsource(Trainer.fit) + inspect.getsource(Trainer.train_step) + inspect.getsource(Trainer.log_step)
    assert "shard_done" not in loop  # pretraining's per-shard checkpoint is its own should_save
    assert "self._" not in loop.replace("self._stop_on_nonfinite", "")  # e.g. no _step_tokens between methods
