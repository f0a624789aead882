"""
Rule rewards for the rollout stages (PPO, GRPO): a rule is fn(c: Completion, arg: str) -> float, registered by
name. A user adds one in a few lines:

    from trainer.rewards import register_rule
    @register_rule("polite")
    def polite(c, arg):            # c.text, c.ids, c.prompt (messages), c.answer (str | None), c.finished
        return 1.0 if "请" in c.text else 0.0

and turns rules on with reward_rules="polite=0.5,exact,repetition:3=1.0" (items name[:arg][=weight]).
Built in: format[:regex], length:N, exact, gsm8k, repetition[:n], contains:text, token_ids:lo-hi.
"""

import re
from dataclasses import dataclass, field

import torch

# -----------------------------------------------------------------------------


@dataclass
class Completion:
    text: str  # the decoded reply (special tokens removed)
    ids: list[int]  # the reply's token ids (the stop token included when it stopped)
    prompt: list[dict] = field(default_factory=list)  # the prompt's messages
    answer: str | None = None  # the reference answer, when the prompt data has one
    finished: bool = True  # ended with a stop token (not cut by max_new_tokens)


RULES = {}


def register_rule(name: str):
    def wrap(fn):
        RULES[name] = fn
        return fn

    return wrap


@register_rule("format")
def rule_format(c: Completion, arg: str) -> float:
    """1 if the reply matches the regex arg (DOTALL), or, with no arg, if it ended on its own with a stop token."""
    return float(bool(re.search(arg, c.text, re.DOTALL))) if arg else float(c.finished and bool(c.text.strip()))


@register_rule("length")
def rule_length(c: Completion, arg: str) -> float:
    """1 at exactly N tokens, falling linearly to 0 at 0 and at 2N tokens."""
    n = int(arg)
    return max(0.0, 1.0 - abs(len(c.ids) - n) / n)


def final_answer(text: str) -> str:
    """\\boxed{...} if present, else what follows GSM8K's "####", else the last non-empty line, without spaces and
    trailing punctuation."""
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
    marked = re.findall(r"####(.*)", text)
    lines = [line for line in text.strip().splitlines() if line.strip()]
    ans = boxed[-1] if boxed else marked[-1] if marked else (lines[-1] if lines else "")
    ans = re.sub(r"^(答案|answer)\s*[:：是为]?\s*", "", ans.strip(), flags=re.IGNORECASE)
    return re.sub(r"\s+", "", ans).rstrip("。.!！")


@register_rule("exact")
def rule_exact(c: Completion, arg: str) -> float:
    """1 if the reply's final answer equals the data's reference answer (0 when the data has none)."""
    return float(c.answer is not None and final_answer(c.text) == final_answer(c.answer))


GSM8K_ANSWER = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def gsm8k_number(text: str) -> float | None:
    """The number a GSM8K-style text answers with: after its "#### " line, else inside its last \\boxed{}, else its
    last number ("1,000" is 1000); None when it has none."""
    marked = GSM8K_ANSWER.findall(text)
    if marked:
        return _number(marked[-1])
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
    numbers = NUMBER.findall(boxed[-1] if boxed else text)
    return _number(numbers[-1]) if numbers else None


@register_rule("gsm8k")
def rule_gsm8k(c: Completion, arg: str) -> float:
    """1 if the reply's final number (gsm8k_number) equals the number after "####" in the data's answer (GSM8K's
    {"question", "answer"} rows load as prompts with that answer); 0 when either has none."""
    want = None if c.answer is None else gsm8k_number(c.answer)
    got = gsm8k_number(c.text)
    return float(want is not None and got is not None and abs(got - want) < 1e-6)


@register_rule("repetition")
def rule_repetition(c: Completion, arg: str) -> float:
    """Minus the share of repeated token n-grams (n = arg, default 3): 0 for no repetition, towards -1 for loops."""
    n = int(arg or 3)
    grams = [tuple(c.ids[i : i + n]) for i in range(len(c.ids) - n + 1)]
    return -(1 - len(set(grams)) / len(grams)) if grams else 0.0


@register_rule("contains")
def rule_contains(c: Completion, arg: str) -> float:
    return float(arg in c.text)


@register_rule("token_ids")
def rule_token_ids(c: Completion, arg: str) -> float:
    """Share of reply tokens with an id in lo-hi (inclusive): a dense toy reward for tests and debugging."""
    lo, hi = (int(x) for x in arg.split("-"))
    return sum(lo <= i <= hi for i in c.ids) / max(1, len(c.ids))


def parse_rules(spec: str) -> list[tuple[str, str, float]]:
    """'exact,repetition:3=0.5' -> [("exact", "", 1.0), ("repetition", "3", 0.5)]; unknown names fail here."""
    rules = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        item, _, weight = item.partition("=")
        name, _, arg = item.partition(":")
        if name not in RULES:
            raise ValueError(f"unknown reward rule '{name}'; known: {', '.join(sorted(RULES))}")
        rules.append((name, arg, float(weight or 1.0)))
    return rules


def rule_rewards(rules: list[tuple[str, str, float]], completions: list[Completion]) -> torch.Tensor:
    return torch.tensor([sum(w * RULES[name](c, arg) for name, arg, w in rules) for c in completions])
