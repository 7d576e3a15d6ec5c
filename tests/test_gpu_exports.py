"""Merged 16-bit exports written on the GPU by the unsloth backend load and answer the same on a CPU.

tests/fixtures/gpu-merged-exports-h100.tar.gz holds the `merged/` folders of three real runs on an
H100 (2026-11-22), one per family, each made by

    python -m unsloth_med.recipes.bone_fracture --data_dir <bone-break> --model tiny:<family> \
        --backend unsloth --max_steps 5 --max_train_samples 64 --max_eval_samples 8 --eval_before false \
        --image_size 64 --export merged-16bit --save_strategy no --output_dir /tmp/exp/<family>

i.e. FastVisionModel 4-bit + LoRA, trained, then `save_pretrained_merged(..., "merged_16bit")` and
verified there. Here, on a machine without a GPU or unsloth, plain transformers must load each folder
with its processor and chat template, and greedy-decode the export's own verification images to the
same answers the GPU recorded after reloading it.
"""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "gpu-merged-exports-h100.tar.gz"


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gpu-exports")
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(root, filter="data")
    return root


@pytest.mark.parametrize("family", ["mistral3", "mllama", "qwen2_5_vl"])
def test_gpu_merged_export_loads_and_answers_the_same_on_cpu(exports, bone_break_dir, family):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from unsloth_med.export.verify import MAX_VERIFY_NEW_TOKENS, _encode_rows, _outputs
    from unsloth_med.models.families import image_fit
    from unsloth_med.recipes.bone_fracture import RECIPE

    folder = exports / family / "merged"
    record = json.loads((folder / "export.json").read_text())
    info = json.loads((folder / "unsloth_med.json").read_text())
    assert record["backend"] == "unsloth" and "save_pretrained_merged" in record["method"]
    assert record["verification"]["passed"] and record["verification"]["greedy_agreement"] == 1.0

    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    assert not any(type(m).__name__ == "Linear4bit" for m in model.modules())
    assert not any("lora" in name for name, _ in model.named_parameters())  # merged, not an adapter
    prompt = processor.apply_chat_template(RECIPE.prompt(), tokenize=False, add_generation_prompt=True)
    assert RECIPE.instruction[:40] in prompt

    images = bone_break_dir / "Bone Break Classification" / "Bone Break Classification"
    rows = [{"image": str(images / row_id), "target": row_id.split("/")[0], "id": row_id}
            for row_id in record["verification"]["row_ids"]]
    fit = image_fit(model.config, info["image_size"], buckets=info["image_buckets"])
    max_new = max(1, min(RECIPE.max_new_tokens, MAX_VERIFY_NEW_TOKENS))
    with torch.no_grad():
        answers = [r["text"] for r in _outputs(model, processor, _encode_rows(processor, RECIPE, rows, fit), max_new)]
    assert answers == record["verification"]["answers_reloaded"]
