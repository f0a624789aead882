"""TRL's DPO loss on given token ids (run by tests/test_dpo.py in a fresh process, TRL on PYTHONPATH).

    python tests/run_trl_dpo.py <policy llama dir> <reference llama dir> <pairs.json> <beta> <out.json>

pairs.json holds [{"prompt_ids", "chosen_ids", "rejected_ids"}]. For each loss type a stock trl.DPOTrainer is
built (policy, frozen reference, beta), the pairs are batched by TRL's own DataCollatorForPreference and the loss
comes from DPOTrainer.compute_loss, the method its training step calls. Writes {loss_type: loss}."""

import json
import os
import sys
import tempfile

import torch
from datasets import load_dataset
from transformers import AutoTokenizer, LlamaForCausalLM
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

policy_dir, ref_dir, pairs_path, beta, out = sys.argv[1:6]
with open(pairs_path, encoding="utf-8") as f:
    pairs = json.load(f)
tokenizer = AutoTokenizer.from_pretrained(policy_dir)
losses = {}
for loss_type in ("sigmoid", "ipo", "hinge"):  # every loss_type trainer/dpo.py offers
    with tempfile.TemporaryDirectory() as run_dir:
        args = DPOConfig(
            output_dir=run_dir,
            beta=float(beta),
            loss_type=[loss_type],
            use_cpu=True,
            bf16=False,
            per_device_train_batch_size=len(pairs),
            report_to="none",
            max_length=None,
        )
        # TRL needs a train set to build the trainer; the loss below is computed on our ids, not on these. A
        # file-backed set: `datasets` pickles in-memory tables to fingerprint them, which fails under pyarrow 26.
        train_file = os.path.join(run_dir, "train.jsonl")
        with open(train_file, "w", encoding="utf-8") as f:
            f.write(json.dumps({"prompt": "问", "chosen": "好", "rejected": "坏"}, ensure_ascii=False) + "\n")
        train = load_dataset("json", data_files=train_file, split="train")
        trainer = DPOTrainer(
            model=LlamaForCausalLM.from_pretrained(policy_dir, dtype=torch.float32),
            ref_model=LlamaForCausalLM.from_pretrained(ref_dir, dtype=torch.float32),
            args=args,
            train_dataset=train,
            processing_class=tokenizer,
        )
        batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(pairs)
        trainer.model.eval()
        with torch.no_grad():
            losses[loss_type] = float(trainer.compute_loss(trainer.model, batch))
with open(out, "w", encoding="utf-8") as f:
    json.dump(losses, f)
