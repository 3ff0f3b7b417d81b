"""2-process DDP worker (run with torchrun): HF Trainer + CompreSSMCallback with cuts; writes per-rank checksums."""

import hashlib
import json
import os
import sys

import torch


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import random_ids, tiny_lm  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from hf_compressssm import CompreSSMCallback  # noqa: E402
from hf_compressssm.families import find_mixers  # noqa: E402


class Blocks(torch.utils.data.Dataset):
    def __init__(self):
        self.ids = random_ids(batch=96, length=16, seed=7)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(out_dir: str, accumulation: int, save_steps: int = 0) -> None:
    if os.environ.get("COMPRESSSSM_NEGATIVE_CONTROL") == "1":
        # Let DDP manage the shrinkable tensors (the naive design): the test must see the replicas drift.
        import hf_compressssm.compression.compressor as compressor_module
        import hf_compressssm.trainer.callback as callback_module

        callback_module.exclude_shrinkable_from_ddp = lambda model: []
        compressor_module.shrinkable_excluded_from_ddp = lambda model: True
        compressor_module.GradientAllReducer.attach = lambda self, model, layers=None: None
    model = tiny_lm(seed=0, state_sizes=[8, 8])
    args = TrainingArguments(
        output_dir=out_dir,
        max_steps=10,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=accumulation,
        learning_rate=5e-3,
        report_to=[],
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        save_total_limit=1,
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=100,
        ddp_backend="gloo",
        seed=0,
    )
    callback = CompreSSMCallback(tau=0.3, reduction_steps=[3, 6], calibration_batches=2)
    trainer = Trainer(model=model, args=args, train_dataset=Blocks(), callbacks=[callback])
    trainer.train()
    rank = int(os.environ.get("RANK", 0))
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    checksums = {
        name: hashlib.sha256(p.detach().cpu().numpy().tobytes()).hexdigest() for name, p in model.named_parameters()
    }
    kept = [[layer["kept"] for layer in entry["layers"]] for entry in getattr(model, "compression_history", [])]
    result = {
        "rank": rank,
        "world_size": world,
        "sizes": [m.A_log.shape[-1] for m in find_mixers(model)],
        "checksums": checksums,
        "kept": kept,
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    try:
        main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1, int(sys.argv[3]) if len(sys.argv) > 3 else 0)
    finally:  # leave the process group: a process can otherwise abort at exit
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
