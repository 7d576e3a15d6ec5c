"""Run by tests/test_distributed.py under torchrun: evaluate() with the process group up, as the pipeline does.

    torchrun --nproc_per_node 2 tests/ddp_eval_worker.py MODEL_DIR DATA_DIR N OUT.json
"""
from __future__ import annotations

import json
import sys

import torch.distributed as dist

from unsloth_med.backends.hf import HFBackend
from unsloth_med.config import ModelArgs
from unsloth_med.data.sources import load_recipe_data
from unsloth_med.evaluate import evaluate
from unsloth_med.recipes.bone_fracture import RECIPE


def main(model_dir: str, data_dir: str, n: int, out: str) -> None:
    dist.init_process_group("gloo")
    model, processor = HFBackend().load(model_dir, ModelArgs())
    test = load_recipe_data(RECIPE, data_dir, seed=0)["test"].select(range(n))
    images_seen = {"score": 0, "generate": 0}
    mode = "score"

    def count_images(module, args, kwargs):  # the forwards that carry images: one per prompt
        if kwargs.get("pixel_values") is not None:
            images_seen[mode] += kwargs["input_ids"].shape[0]

    model.register_forward_pre_hook(count_images, with_kwargs=True)
    results = {}
    for mode in ("score", "generate"):
        results[mode] = evaluate(model, processor, RECIPE, test, mode=mode, batch_size=4, image_size=64, progress=False)
    seen: list = [None] * dist.get_world_size()
    dist.all_gather_object(seen, images_seen)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"world": dist.get_world_size(), "images_seen": seen, **results}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
