"""One JointDPOTrainer run per method, for test_trl_trainer's rank-equality test: started as
`torchrun --nproc-per-node N trl_world.py OUT BATCH METHOD...` (gloo on CPU) or as a plain
process; rank 0 saves, per method, the trained parameters and the logged objectives to OUT."""

import copy
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
import torch  # noqa: E402
from trl import DPOConfig  # noqa: E402

from molkernels.posttrain import JointDPOTrainer  # noqa: E402
from molkernels.posttrain.synthetic import make_data, tiny_bpe_tokenizer, tiny_llama  # noqa: E402


def main(out: str, batch: int, methods) -> None:
    sft, pref = make_data(32, 32, seed=3)
    sft = [{"prompt": r["prompt"], "completion": r["completion"] * (1 + i % 3)} for i, r in enumerate(sft)]  # uneven
    tokenizer = tiny_bpe_tokenizer([r["prompt"] + r["completion"] for r in sft] + [r["chosen"] for r in pref])
    model = tiny_llama(0, hidden_size=32, layers=1, heads=2, tokenizer=tokenizer)
    results = {}
    for method in methods:
        args = DPOConfig(output_dir=os.path.join(out, method), per_device_train_batch_size=batch, max_steps=5,
                         optim="sgd", learning_rate=0.2, lr_scheduler_type="constant", max_grad_norm=0.0,
                         logging_steps=1, report_to=[], save_strategy="no", seed=0, use_cpu=True, bf16=False,
                         max_length=64, disable_tqdm=True, ddp_backend="gloo" if "RANK" in os.environ else None)
        trainer = JointDPOTrainer(copy.deepcopy(model), ref_model=copy.deepcopy(model), args=args,
                                  train_dataset=datasets.Dataset.from_list(pref), processing_class=tokenizer,
                                  sft_dataset=sft, method=method, lam=0.5, max_eval_steps=2)
        trainer.train()
        logged = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
        results[method] = {"params": torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()]),
                           "objectives": [h["objective"] for h in logged],
                           "losses": [[h.get("sft_loss"), h.get("dpo_loss")] for h in logged]}
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(results, os.path.join(out, "results.pt"))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
