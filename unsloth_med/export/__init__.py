"""Export a tuned model: merged 16-bit weights (verified by reload) or the LoRA adapter.

    unsloth-med export RUN_DIR --format adapter|merged-16bit [--out DIR] [--push-to-hub OWNER/NAME] [--public]

Merged export:
- unsloth backend: `model.save_pretrained_merged(dir, processor, save_method="merged_16bit")`.
- hf backend: the base checkpoint is loaded again in 16-bit (or fp32, when the tuned model is fp32) on
  the CPU, the tuned model's LoRA weights are applied to it and `merge_and_unload()` folds them in. This
  also holds when training used a 4-bit base: the merge goes into the original 16-bit weights, never
  into dequantized 4-bit ones, and never needs GPU memory for a second copy of the model.
- Always saved beside the weights: the full processor (tokenizer, image processor, the chat template
  the model was trained with), `unsloth_med.json` (recipe, base_model, image_size), a model card.

Verification after every merged export: the folder is reloaded with plain `AutoModelForImageTextToText`
/ `AutoProcessor` and compared with the in-memory tuned model on a fixed batch of a few dataset rows
(the first rows: images from the dataset, the recipe's prompt and answer): max abs logit difference
and greedy-answer agreement, written to `export.json`. A difference beyond the tolerance of the saved
dtype raises ExportError. When the tuned model is 4-bit, the strict reference is the same adapter on
the 16-bit base before merging (4-bit rounding is not an export error); the difference to the 4-bit
model is reported beside it.

Atomic: everything is written into a hidden temporary sibling folder (`.NAME.partial-*`), and
`export.json`, written last, marks it complete; only then is it renamed to NAME with `os.replace`.
An export that fails or is interrupted leaves no NAME folder (and an older export there untouched).

The package: atomic.py (the folder protocol above), merge.py (the merged export), verify.py (the reload check
and its verdict), adapter.py (the adapter export), from_run.py (`export_run`: any format from a run folder).
"""
from .adapter import export_adapter
from .from_run import FORMATS, export_run
from .merge import describe_weights, export_merged, merge_dtype, sixteen_bit_base
from .verify import (
    LOGIT_POSITIONS,
    MAX_VERIFY_NEW_TOKENS,
    TOLERANCES,
    VERIFY_ROWS,
    synthetic_rows,
    tolerance_for,
    verdict,
    verification_summary,
)

__all__ = ["FORMATS", "LOGIT_POSITIONS", "MAX_VERIFY_NEW_TOKENS", "TOLERANCES", "VERIFY_ROWS", "describe_weights",
           "export_adapter", "export_merged", "export_run", "merge_dtype", "sixteen_bit_base", "synthetic_rows",
           "tolerance_for", "verdict", "verification_summary"]
