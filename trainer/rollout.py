"""
RolloutTrainer, the shared part of PPO and GRPO: sample replies through the shared Engine, score them (rule rewards
of trainer/rewards.py and/or a reward model), keep what the loss needs before the policy changes, then train on that
rollout buffer for ppo_epochs x rollout_minibatches optimizer steps. An unfinished buffer is part of the checkpoint,
so a resumed run continues exactly. Not a stage itself; trainer/ppo.py and trainer/grpo.py subclass it.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist

from dataset.batches import IndexBatches
from dataset.chat_data import parse_columns
from dataset.prompt_data import load_prompts
from model.engine import Engine, SamplingParams
from model.runtime import frozen_autocast, load_pretrained
from trainer.common import host_to_device, print0
from trainer.config import FileData, TrainConfig, above, at_least, between, setting
from trainer.core import Trainer
from trainer.logprobs import kl_estimate, load_reference, masked_mean, token_logprobs
from trainer.rewards import Completion, parse_rules, rule_rewards

# -----------------------------------------------------------------------------


@dataclass
class RLConfig(FileData, TrainConfig):
    init_from: str = "out/sft/final"  # the policy to improve (an SFT final/)
    data_path: str = "dataset/rl_prompts.jsonl"  # prompt files (dataset/prompt_data.py), comma-separated
    ref_from: str = setting("", path="checkpoint")  # frozen reference for the KL term; "" = init_from
    # "" = the training device | cpu = offload the reference (slower, saves GPU memory)
    ref_device: str = setting("", device=True)
    reward_from: str = setting("", path="checkpoint")  # reward model dir (trainer/reward.py final/); "" = rules only
    reward_rules: str = ""  # rule rewards (trainer/rewards.py), added to the reward model's score
    # Sampling of rollouts, passed to model/engine.py as SamplingParams. Not its greedy defaults: the policy gradient
    # needs replies drawn from the policy itself (temperature 1), and a reply cap of half SamplingParams' 256,
    # since prompts get seq_len - max_new_tokens and every optimizer step samples, scores and trains on the replies
    # (config/ppo.yaml and grpo.yaml set 256 with seq_len 512).
    max_new_tokens: int = setting(128, bound=at_least(1))  # reply length cap in rollouts
    temperature: float = setting(1.0, bound=at_least(0))  # 1.0 = the policy's own distribution; 0 = greedy
    top_k: int = setting(SamplingParams.top_k, bound=at_least(0))  # 0 = off
    top_p: float = setting(SamplingParams.top_p, bound=between(0, 1))  # 1 = off
    num_generations: int = setting(1, bound=at_least(1))  # replies sampled per prompt (GRPO's G)
    rollout_minibatches: int = setting(1, bound=at_least(1))  # a rollout holds global_batch_size x this many replies
    # passes over each rollout; optimizer steps per rollout = ppo_epochs x rollout_minibatches
    ppo_epochs: int = setting(1, bound=at_least(1))
    # PPO ratio clip; 0 clips every ratio to 1: the policy could never move past the old one
    clip_eps: float = setting(0.2, bound=above(0))
    kl_coef: float = setting(0.05, bound=at_least(0))  # weight of the KL to the reference
    # stop the epochs over a rollout early when approx KL(old || new) passes 1.5x this
    target_kl: float = setting(0.0, bound=at_least(0))
    warmup_steps: int = 0
    lr: float = 1e-6
    weight_decay: float = 0.0
    log_every: int = 1


class RolloutTrainer(Trainer):
    """The shared part of PPO and GRPO. A subclass implements score_rollout(buf) (advantages, and for PPO
    values/returns, into the buffer) and compute_loss(*, batch, num_items)."""

    token_level = True  # count_loss_items: response tokens of the step (True) or sequences (False)

    def setup(self):
        cfg = self.cfg
        self.engine = Engine(self.raw_model, self.tokenizer, self.device)  # the live policy weights
        self.ref = load_reference(cfg, self.device)
        # An offloaded reference (ref_device=cpu while training on cuda) gets the policy's autocast on its device.
        self.ref_autocast = frozen_autocast(next(self.ref.parameters()).device, self.device, self.dtype)
        # The reward model is frozen the same way: fp32 weights under the policy's autocast.
        self.reward_model = (
            load_pretrained(cfg.reward_from, "score", device=self.device, frozen=True) if cfg.reward_from else None
        )
        self.rules = parse_rules(cfg.reward_rules)
        if self.reward_model is None and not self.rules:
            raise ValueError("no reward: set reward_from (a reward model) and/or reward_rules")
        if self.reward_model is not None and self.reward_model.config.vocab_size != self.raw_model.config.vocab_size:
            raise ValueError("the reward model and the policy must share the tokenizer (vocab sizes differ)")
        # The current rollout: the optimizer steps still to take on it (lists of micro-batches) and its statistics,
        # which every one of those steps logs. Both are part of the checkpoint (extra_state).
        self.queue, self.rollout_stats = [], {}

    def build_data(self):
        cfg = self.cfg
        per_rollout = self.global_batch * cfg.rollout_minibatches
        if per_rollout % (cfg.num_generations * self.world_size):
            raise ValueError(
                f"global_batch_size x rollout_minibatches = {per_rollout} must be a multiple of "
                f"num_generations x processes = {cfg.num_generations} x {self.world_size}"
            )
        prompts = load_prompts(
            cfg.data_path,
            self.tokenizer,
            cfg.seq_len - cfg.max_new_tokens,
            cfg.on_bad_record,
            cfg.max_samples,
            print0,
            parse_columns(cfg.columns),
        )
        n_prompts = per_rollout // cfg.num_generations
        print0(
            f"[{self.stage}] {len(prompts):,} prompts | a rollout = {n_prompts} prompts x {cfg.num_generations} "
            f"replies, trained for {cfg.ppo_epochs} epoch(s) x {cfg.rollout_minibatches} minibatch(es)"
        )
        return IndexBatches(
            prompts, n_prompts, n_prompts // self.world_size, self.rank, self.world_size, cfg.seed, collate=list
        ), None

    # ---- rollouts --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def make_rollout(self, prompts: list[dict]) -> tuple[dict, dict]:
        """Sample replies, score them, and compute what the loss needs before the policy changes. Returns (the
        buffer of (N, ...) tensors the loss reads, the rollout's statistics to log)."""
        cfg = self.cfg
        G = cfg.num_generations
        prompts = [p for p in prompts for _ in range(G)]  # groups are contiguous rows
        with self.autocast:
            sampling = SamplingParams(
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                top_k=cfg.top_k,
                top_p=cfg.top_p,
                seed=cfg.seed + 7919 * self.step + self.rank,
            )
            replies = self.engine.generate([p["ids"] for p in prompts], sampling)
        rows = [p["ids"] + r for p, r in zip(prompts, replies)]
        T = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), T), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.bool)
        for i, p in enumerate(prompts):
            input_ids[i, : len(rows[i])] = torch.tensor(rows[i])
            attention_mask[i, : len(rows[i])] = 1
            mask[i, len(p["ids"]) : len(rows[i])] = True
        buf = {
            "input_ids": input_ids.to(self.device),
            "attention_mask": attention_mask.to(self.device),
            "mask": mask[:, 1:].float().to(self.device),
        }  # (N, T-1): targets that are reply tokens
        # Each row's reply targets and tokens, (N, 2) on the host: next_step sums them per micro-batch.
        buf["host_counts"] = torch.stack([mask[:, 1:].sum(-1), attention_mask.sum(-1)], dim=1)
        stops = set(self.engine.stop_token_ids)
        completions = [
            Completion(self.engine.decode(r), r, p["prompt"], p["answer"], bool(r) and r[-1] in stops)
            for p, r in zip(prompts, replies)
        ]
        rewards = (
            rule_rewards(self.rules, completions).to(self.device)
            if self.rules
            else torch.zeros(len(rows), device=self.device)
        )
        with self.autocast:
            if self.reward_model is not None:
                rewards = (
                    rewards
                    + self.reward_model(input_ids=buf["input_ids"], attention_mask=buf["attention_mask"])
                    .logits[:, 0]
                    .float()
                )
            buf["old_logps"] = token_logprobs(self.model, buf["input_ids"])
            with self.ref_autocast:
                buf["ref_logps"] = token_logprobs(self.ref, buf["input_ids"])
        buf["rewards"] = rewards
        self.score_rollout(buf)
        lengths = buf["mask"].sum(-1)
        stats = {
            "reward": rewards.mean(),
            "reward_std": rewards.std() if len(rows) > 1 else rewards.new_zeros(()),
            "response_len": lengths.mean(),
            "kl_ref": (kl_estimate(buf["old_logps"], buf["ref_logps"], "k1") * buf["mask"]).sum(-1).mean(),
        }
        return buf, stats

    def score_rollout(self, buf: dict) -> None:
        raise NotImplementedError

    def next_step(self) -> list:
        if not self.queue:
            cfg = self.cfg
            (prompts,) = self.train_data.next_step()
            buf, self.rollout_stats = self.make_rollout(prompts)
            counts = buf.pop("host_counts")
            n = len(buf["input_ids"])
            per_step = n // cfg.rollout_minibatches
            for _ in range(cfg.ppo_epochs):
                # The order is drawn on the host, so each micro-batch's counts are host sums (count_loss_items).
                order = torch.randperm(n) if cfg.rollout_minibatches > 1 else torch.arange(n)
                order_on_device = host_to_device(order, self.device)
                for s in range(0, n, per_step):
                    micro_batches = []
                    for m in range(s, s + per_step, self.micro_batch):
                        micro = {k: v[order_on_device[m : m + self.micro_batch]] for k, v in buf.items()}
                        reply_tokens, tokens = counts[order[m : m + self.micro_batch]].sum(0).tolist()
                        micro_batches.append({**micro, "num_reply_tokens": reply_tokens, "num_tokens": tokens})
                    self.queue.append(micro_batches)
        return self.queue.pop(0)

    def train_step(self) -> tuple[dict, int]:
        metrics, tokens = super().train_step()
        metrics.update(self.rollout_stats)
        # The early stop's one host read per optimizer step (none with target_kl=0, GRPO's default): whether the
        # next step trains on this rollout or samples a new one is decided on the host, so it waits for this step.
        if self.cfg.target_kl > 0 and "approx_kl" in metrics:
            # Decided on the KL averaged over the ranks, so all of them take the same number of steps per rollout
            # (each rank's own KL, from its own prompts, would let them drift onto different steps, whose collectives
            # then no longer match); the logged KL is that mean too.
            kl = metrics["approx_kl"].detach().clone()
            if self.distributed:
                dist.all_reduce(kl)
                kl /= self.world_size
            metrics["approx_kl"] = kl
            if float(kl) > 1.5 * self.cfg.target_kl:
                self.queue.clear()  # the policy moved too far from the one that sampled: roll out afresh
        return metrics, tokens

    def count_loss_items(self, *, batch) -> int:
        return batch["num_reply_tokens"] if self.token_level else len(batch["mask"])  # counted in next_step

    def count_tokens(self, *, batch) -> int:
        return batch["num_tokens"]

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
            stats = {
                "clip_frac": masked_mean(((ratio - 1).abs() > eps).float(), mask),
                "approx_kl": masked_mean(ratio - 1 - log_ratio, mask),
            }  # k3 of KL(old || new)
        return loss, stats

    # ---- checkpoint: an unfinished rollout buffer resumes exactly --------------------------------------------
    def extra_state(self) -> dict:
        return {"queue": self.queue, "rollout_stats": self.rollout_stats}

    def load_extra_state(self, *, state: dict) -> None:
        self.queue = [[self.to_device(b) for b in step] for step in state.get("queue", [])]
        for b in (b for step in self.queue for b in step):  # a buffer saved before the counts were kept
            b.setdefault("num_reply_tokens", int(b["mask"].sum()))
            b.setdefault("num_tokens", int(b["attention_mask"].sum()))
        self.rollout_stats = state.get("rollout_stats", {})
