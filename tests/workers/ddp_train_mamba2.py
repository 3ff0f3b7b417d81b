"""2-process DDP worker for Mamba-2 (run with torchrun): HF Trainer + CompreSSMCallback with cuts of in_proj/conv1d
rows; writes per-rank checksums, sizes and kept indices."""

import hashlib
import json
import os
import sys

import torch


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import random_ids  # noqa: E402
from mamba2_helpers import tiny_mamba2_lm  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from hf_compressssm import CompreSSMCallback  # noqa: E402


class Blocks(torch.utils.data.Dataset):
    def __init__(self):
        self.ids = random_ids(batch=96, length=16, seed=7)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(out_dir: str, accumulation: int) -> None:
    model = tiny_mamba2_lm(seed=0)
    args = TrainingArguments(
        output_dir=out_dir,
        max_steps=10,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=accumulation,
        learning_rate=5e-3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=100,
        ddp_backend="gloo",
        seed=0,
    )
    callback = CompreSSMCallback(mode="fixed", fixed_fraction=0.25, reduction_steps=[3, 6], calibration_batches=2)
    trainer = Trainer(model=model, args=args, train_dataset=Blocks(), callbacks=[callback])
    trainer.train()
    rank = int(os.environ.get("RANK", 0))
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    checksums = {
        name: hashlib.sha256(p.detach().cpu().numpy().tobytes()).hexdigest() for name, p in model.named_parameters()
    }
    kept = [[layer["kept"] for layer in entry["layers"]] for entry in getattr(model, "compression_history", [])]
    result = {"rank": rank, "world_size": world, "sizes": model.state_sizes(), "checksums": checksums, "kept": kept}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    try:
        main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    finally:  # leave the process group: a process can otherwise abort at exit
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
