"""
What DPO, the reward model, PPO and GRPO share: frozen models, per-token log-probs, KL estimators, rule rewards,
reward-model scoring, prompt loading, rollouts through the shared Engine, and RolloutTrainer (the rollout buffer
that PPO and GRPO fill and then train on). Not a stage itself; imported by trainer/{dpo,reward,ppo,grpo}.py.

Rule rewards: a rule is fn(c: Completion, arg: str) -> float, registered by name. A user adds one in a few lines:

    from trainer.rl_common import register_rule
    @register_rule("polite")
    def polite(c, arg):            # c.text, c.ids, c.prompt (messages), c.answer (str | None), c.finished
        return 1.0 if "请" in c.text else 0.0

and turns rules on with reward_rules="polite=0.5,exact,repetition:3=1.0" (items name[:arg][=weight]).
Built in: format[:regex], length:N, exact, repetition[:n], contains:text, token_ids:lo-hi.
"""

import os
import re
from dataclasses import dataclass, field

import torch

from model.engine import SamplingParams
from trainer.core import IndexBatches, TrainConfig, Trainer, print0

# -----------------------------------------------------------------------------
# Models that do not train


def load_frozen(path: str, device, dtype: torch.dtype = torch.float32, kind: str = "causal"):
    """A checkpoint in eval mode with no gradients: the DPO/PPO/GRPO reference (causal) or a reward model
    (score). dtype may be bf16 on GPU: a frozen model needs no fp32 master weights, so it costs half."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    import model as _  # noqa: F401  (registers the slm type)

    if not os.path.isdir(path):
        raise FileNotFoundError(f"'{path}' is not a checkpoint directory")
    if kind == "causal":
        m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        m = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
    return m.to(device).eval().requires_grad_(False)


# -----------------------------------------------------------------------------
# Log-probabilities and KL


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) ids -> (B, T-1) fp32 log p(token t+1 | tokens <= t). logsumexp + gather, never a full log_softmax
    copy of the (B, T, V) logits. The model may live on another device (an offloaded reference)."""
    device = next(model.parameters()).device
    logits = model(input_ids=input_ids.to(device), attention_mask=None if attention_mask is None else
                   attention_mask.to(device)).logits[:, :-1].float()
    targets = input_ids[:, 1:].to(device)
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (picked - logits.logsumexp(-1)).to(input_ids.device)


def sequence_logprobs(model, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum of log-probs over the response targets only (loss_mask (B, T-1)) -> (B,)."""
    return (token_logprobs(model, input_ids) * loss_mask).sum(-1)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from a sample of pi (Schulman, "Approximating KL divergence"):
    k1 = log r^-1 (unbiased, can be negative), k2 = (log r)^2 / 2, k3 = r - 1 - log r (unbiased, >= 0; GRPO's),
    with r = ref / pi."""
    log_ratio = ref_logp - logp
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio ** 2
    if kind == "k3":
        return torch.exp(log_ratio) - 1 - log_ratio
    raise ValueError(f"kl estimator must be k1, k2 or k3, got '{kind}'")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


# -----------------------------------------------------------------------------
# Rule rewards


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
    """\\boxed{...} if present, else the last non-empty line, without spaces and trailing punctuation."""
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
    lines = [line for line in text.strip().splitlines() if line.strip()]
    ans = boxed[-1] if boxed else (lines[-1] if lines else "")
    ans = re.sub(r"^(答案|answer)\s*[:：是为]?\s*", "", ans.strip(), flags=re.IGNORECASE)
    return re.sub(r"\s+", "", ans).rstrip("。.!！")


@register_rule("exact")
def rule_exact(c: Completion, arg: str) -> float:
    """1 if the reply's final answer equals the data's reference answer (0 when the data has none)."""
    return float(c.answer is not None and final_answer(c.text) == final_answer(c.answer))


@register_rule("repetition")
def rule_repetition(c: Completion, arg: str) -> float:
    """Minus the share of repeated token n-grams (n = arg, default 3): 0 for no repetition, towards -1 for loops."""
    n = int(arg or 3)
    grams = [tuple(c.ids[i:i + n]) for i in range(len(c.ids) - n + 1)]
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


# -----------------------------------------------------------------------------
# Prompts


def load_prompts(paths: str, tokenizer, max_prompt_tokens: int, on_bad: str = "skip", max_samples: int = 0,
                 log=print) -> list[dict]:
    """Prompts for rollouts -> [{"prompt": messages, "answer": str | None, "ids": [int]}].

    Reads {"prompt": str | messages, "answer"?: str}, any preference-pair format (the shared prompt) and any
    chat format of dataset/chat_data.py (the conversation before the last assistant turn; that turn becomes the
    answer). Prompts longer than max_prompt_tokens are skipped: cutting them would change the question."""
    from collections import Counter

    from dataset.chat_data import BadRecord, detect_format, expand_paths, to_messages, usable_records
    from dataset.preference_data import prompt_ids, record_to_pair

    def to_prompt(record, where) -> tuple[list[dict], str | None]:
        if isinstance(record, dict) and "chosen" in record:
            messages, answer = record_to_pair(record, where)["prompt"], None
        elif isinstance(record, dict) and "prompt" in record:
            p = record["prompt"]
            messages = [{"role": "user", "content": p}] if isinstance(p, str) else p
            answer = record.get("answer")
        else:
            messages = to_messages(record, detect_format(record, where), where)
            answer = None
            if messages and messages[-1]["role"] == "assistant":
                messages, answer = messages[:-1], messages[-1]["content"]
        if not messages or messages[-1]["role"] != "user":
            raise BadRecord(where, "prompt not ending with user")
        return messages, answer

    out, stats = [], Counter()
    for path in expand_paths(paths):
        kept = 0
        for messages, answer in usable_records(path, to_prompt, on_bad, stats, log):
            ids = prompt_ids(tokenizer, messages)
            if len(ids) > max_prompt_tokens:
                stats["skip:prompt too long"] += 1
                continue
            out.append({"prompt": messages, "answer": None if answer is None else str(answer), "ids": ids})
            kept += 1
            if max_samples and kept >= max_samples:
                break
        log(f"[data] {path}: {kept:,} prompts")
    skipped = sum(n for reason, n in stats.items() if reason.startswith("skip:"))
    if skipped:
        log(f"[data] {skipped:,} records skipped (malformed, no user turn last, or prompt > {max_prompt_tokens} "
            f"tokens)")
    return out


# -----------------------------------------------------------------------------
# RolloutTrainer: generate with the Engine, score, then train on the buffer for ppo_epochs x minibatches steps


@dataclass
class RLConfig(TrainConfig):
    init_from: str = "out/sft/final"  # the policy to improve (an SFT final/)
    data_path: str = "dataset/rl_prompts.jsonl"  # prompt files (see load_prompts), comma-separated
    ref_from: str = ""  # frozen reference for the KL term; "" = init_from
    ref_device: str = ""  # "" = the training device | cpu = offload the reference (slower, saves GPU memory)
    reward_from: str = ""  # reward model dir (trainer/reward.py final/); "" = rules only
    reward_rules: str = ""  # rule rewards, added to the reward model's score; see the module docstring
    max_new_tokens: int = 128  # reply length cap in rollouts
    temperature: float = 1.0  # sampling temperature of rollouts (1.0 = the policy's own distribution)
    top_k: int = 0
    top_p: float = 1.0
    num_generations: int = 1  # replies sampled per prompt (GRPO's G)
    rollout_minibatches: int = 1  # a rollout holds global_batch_size x this many replies
    ppo_epochs: int = 1  # passes over each rollout; optimizer steps per rollout = ppo_epochs x rollout_minibatches
    clip_eps: float = 0.2  # PPO ratio clip
    kl_coef: float = 0.05  # weight of the KL to the reference
    target_kl: float = 0.0  # stop the epochs over a rollout early when approx KL(old || new) passes 1.5x this
    on_bad_record: str = "skip"
    max_samples: int = 0  # prompts read per file; 0 = all
    warmup_steps: int = 0
    lr: float = 1e-6
    weight_decay: float = 0.0
    log_every: int = 1


class RolloutTrainer(Trainer):
    """The shared part of PPO and GRPO. A subclass implements score_rollout(buf) (advantages, and for PPO
    values/returns, into the buffer) and compute_loss(batch, num_items)."""

    token_level = True  # batch_weight: response tokens of the step (True) or sequences (False)

    def setup(self):
        from model.engine import Engine

        cfg = self.cfg
        self.engine = Engine(self.raw_model, self.tokenizer, self.device)  # the live policy weights
        ref_device = torch.device(cfg.ref_device) if cfg.ref_device else self.device
        frozen_dtype = self.dtype if self.device.type == "cuda" else torch.float32
        self.ref = load_frozen(cfg.ref_from or cfg.init_from, ref_device, frozen_dtype) if cfg.init_from else None
        self.reward_model = load_frozen(cfg.reward_from, self.device, frozen_dtype, kind="score") \
            if cfg.reward_from else None
        self.rules = parse_rules(cfg.reward_rules)
        if self.reward_model is None and not self.rules:
            raise ValueError("no reward: set reward_from (a reward model) and/or reward_rules")
        if self.reward_model is not None and self.reward_model.config.vocab_size != self.raw_model.config.vocab_size:
            raise ValueError("the reward model and the policy must share the tokenizer (vocab sizes differ)")
        self.queue = []  # optimizer steps still to take on the current rollout (lists of micro-batches)

    def build_data(self):
        cfg = self.cfg
        per_rollout = self.global_batch * cfg.rollout_minibatches
        if per_rollout % (cfg.num_generations * self.world_size):
            raise ValueError(f"global_batch_size x rollout_minibatches = {per_rollout} must be a multiple of "
                             f"num_generations x processes = {cfg.num_generations} x {self.world_size}")
        prompts = load_prompts(cfg.data_path, self.tokenizer, cfg.seq_len - cfg.max_new_tokens, cfg.on_bad_record,
                               cfg.max_samples, print0)
        n_prompts = per_rollout // cfg.num_generations
        self.train_data = IndexBatches(prompts, n_prompts, n_prompts // self.world_size, self.rank,
                                       self.world_size, cfg.seed, collate=list)
        print0(f"[{self.stage}] {len(prompts):,} prompts | a rollout = {n_prompts} prompts x {cfg.num_generations} "
               f"replies, trained for {cfg.ppo_epochs} epoch(s) x {cfg.rollout_minibatches} minibatch(es)")

    # ---- rollouts --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def make_rollout(self, prompts: list[dict]) -> dict:
        """Sample replies, score them, and compute what the loss needs before the policy changes."""
        cfg = self.cfg
        G = cfg.num_generations
        prompts = [p for p in prompts for _ in range(G)]  # groups are contiguous rows
        with self.autocast:
            sampling = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                      top_k=cfg.top_k, top_p=cfg.top_p, seed=cfg.seed + 7919 * self.step + self.rank)
            replies = self.engine.generate([p["ids"] for p in prompts], sampling)
        rows = [p["ids"] + r for p, r in zip(prompts, replies)]
        T = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), T), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.bool)
        for i, (p, r) in enumerate(zip(prompts, replies)):
            input_ids[i, :len(rows[i])] = torch.tensor(rows[i])
            attention_mask[i, :len(rows[i])] = 1
            mask[i, len(p["ids"]):len(rows[i])] = True
        buf = {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device),
               "mask": mask[:, 1:].float().to(self.device)}  # (N, T-1): targets that are reply tokens
        stops = set(self.engine.stop_token_ids)
        completions = [Completion(self.engine.decode(r), r, p["prompt"], p["answer"], bool(r) and r[-1] in stops)
                       for p, r in zip(prompts, replies)]
        rewards = rule_rewards(self.rules, completions).to(self.device) if self.rules else \
            torch.zeros(len(rows), device=self.device)
        with self.autocast:
            if self.reward_model is not None:
                rewards = rewards + self.reward_model(input_ids=buf["input_ids"],
                                                      attention_mask=buf["attention_mask"]).logits[:, 0].float()
            buf["old_logps"] = token_logprobs(self.model, buf["input_ids"])
            buf["ref_logps"] = token_logprobs(self.ref, buf["input_ids"]) if self.ref is not None else \
                buf["old_logps"].clone()
        buf["rewards"] = rewards
        self.score_rollout(buf)
        lengths = buf["mask"].sum(-1)
        self.rollout_stats = {"reward": rewards.mean(), "reward_std": rewards.std() if len(rows) > 1 else
                              rewards.new_zeros(()), "response_len": lengths.mean(),
                              "kl_ref": (kl_estimate(buf["old_logps"], buf["ref_logps"], "k1") * buf["mask"]).sum(-1)
                              .mean()}
        return buf

    def score_rollout(self, buf: dict) -> None:
        raise NotImplementedError

    def next_step(self) -> list:
        if not self.queue:
            cfg = self.cfg
            (prompts,) = self.train_data.next_step()
            buf = self.make_rollout(prompts)
            n = len(buf["input_ids"])
            per_step = n // cfg.rollout_minibatches
            for _ in range(cfg.ppo_epochs):
                order = torch.randperm(n, device=self.device) if cfg.rollout_minibatches > 1 else \
                    torch.arange(n, device=self.device)
                for s in range(0, n, per_step):
                    rows = order[s:s + per_step]
                    self.queue.append([{k: v[rows[m:m + self.micro_batch]] for k, v in buf.items()}
                                       for m in range(0, per_step, self.micro_batch)])
        return self.queue.pop(0)

    def train_step(self) -> dict:
        metrics = super().train_step()
        metrics.update(self.rollout_stats)
        if self.cfg.target_kl > 0 and float(metrics.get("approx_kl", 0.0)) > 1.5 * self.cfg.target_kl:
            self.queue.clear()  # the policy moved too far from the one that sampled: roll out afresh
        return metrics

    def batch_weight(self, batch) -> int:
        return int(batch["mask"].sum()) if self.token_level else len(batch["mask"])

    def batch_tokens(self, batch) -> int:
        return int(batch["attention_mask"].sum())

    # ---- the clipped policy objective both stages use ------------------------------------------------------
    def policy_loss(self, logps: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
        """Per-token clipped surrogate -min(r A, clip(r) A), r = pi / pi_old, with diagnostics."""
        eps = self.cfg.clip_eps
        log_ratio = logps - batch["old_logps"]
        ratio = torch.exp(log_ratio)
        adv = batch["advantages"]
        loss = -torch.min(ratio * adv, torch.clamp(ratio, 1 - eps, 1 + eps) * adv)
        mask = batch["mask"]
        with torch.no_grad():
            stats = {"clip_frac": masked_mean(((ratio - 1).abs() > eps).float(), mask),
                     "approx_kl": masked_mean(ratio - 1 - log_ratio, mask)}  # k3 of KL(old || new)
        return loss, stats

    # ---- checkpoint: an unfinished rollout buffer resumes exactly --------------------------------------------
    def extra_state(self) -> dict:
        return {"queue": self.queue, "rollout_stats": getattr(self, "rollout_stats", {})}

    def load_extra_state(self, state: dict) -> None:
        self.queue = [[self.to_device(b) for b in step] for step in state.get("queue", [])]
        self.rollout_stats = state.get("rollout_stats", {})

