"""
The stage table: every stage's module and one-line description. main.py dispatches on it and the pipeline
(trainer/pipeline.py, `--stage all`) builds its stages from it, so both always run the same modules.

Each stage is a module in trainer/ exposing `Config` (a dataclass) and `run(cfg)`.
"""

# name -> (module, one-line description)
STAGES = {
    "all": ("trainer.pipeline", "run every stage in order (the demo: --config config/demo.yaml)"),
    "tokenizer": ("trainer.train_tokenizer", "train the byte-level BPE tokenizer on text files"),
    "pretrain": ("trainer.pretrain", "pretrain a model on uint16 token shards (resumable, DDP)"),
    "sft": ("trainer.sft", "full-parameter supervised fine-tuning on chat data"),
    "lora": ("trainer.lora", "LoRA fine-tuning on chat data (PEFT-format adapters)"),
    "dpo": ("trainer.dpo", "direct preference optimisation on chosen/rejected pairs"),
    "reward": ("trainer.reward", "train a Bradley-Terry reward model on preference pairs"),
    "ppo": ("trainer.ppo", "PPO with a reward model and a value head"),
    "grpo": ("trainer.grpo", "GRPO: group-normalised advantages, rule or model rewards"),
    "distill": ("trainer.distill", "knowledge distillation from a teacher checkpoint"),
    "eval": ("trainer.eval", "perplexity, bits-per-byte, CMMLU-style multiple choice, generation report"),
}
