"""Run by tests/test_distributed.py under torchrun: VQA evaluation split across the ranks, and image preparation of
a split with fewer rows than ranks (a rank with nothing to prepare).

    torchrun --nproc_per_node 2 tests/ddp_vqa_worker.py MODEL_DIR DATA_DIR N OUT.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from unsloth_med.backends.hf import HFBackend
from unsloth_med.config import ModelArgs
from unsloth_med.data.prepare import prepare_images
from unsloth_med.data.sources import load_recipe_data
from unsloth_med.distributed import current
from unsloth_med.evaluate import evaluate
from unsloth_med.models.families import image_fit
from unsloth_med.recipes import get_recipe


def main(model_dir: str, data_dir: str, n: int, out: str) -> None:
    dist.init_process_group("gloo")
    recipe = get_recipe("radiology_vqa")
    model, processor = HFBackend().load(model_dir, ModelArgs())
    test = load_recipe_data(recipe, data_dir, seed=0)["test"].select(range(n))
    one_row, _ = current().share_then_all(prepare_images, test.select(range(1)), image_fit(model.config, 32),
                                          Path(out).parent / f"prepared-{dist.get_rank()}")
    rows_seen = {"n": 0}

    def count_rows(module, args, kwargs):  # the forwards that carry images: one per question
        if kwargs.get("pixel_values") is not None:
            rows_seen["n"] += kwargs["input_ids"].shape[0]

    model.register_forward_pre_hook(count_rows, with_kwargs=True)
    result = evaluate(model, processor, recipe, test, batch_size=4, max_new_tokens=2, image_size=32, progress=False)
    seen: list = [None] * dist.get_world_size()
    dist.all_gather_object(seen, rows_seen["n"])
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"world": dist.get_world_size(), "rows_seen": seen, "prepared_rows": len(one_row),
                       **{k: v for k, v in result.items() if k not in ("timing", "input_pipeline")}}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
