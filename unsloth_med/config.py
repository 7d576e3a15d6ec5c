"""The config tree: model, lora, data, training, eval, export.

`training` is TRL's own `SFTConfig` (every Trainer option, unchanged); the other sections are small
dataclasses below. A YAML file holds the sections as nested mappings:

    model:    {model: unsloth/Ministral-3-14B-Instruct-2512, backend: auto}
    lora:     {lora_r: 16, finetune_vision_layers: true}
    training: {learning_rate: 2.0e-4, max_steps: 30}

and every field is also a command-line flag (`--lora_r 8`, `--max-steps 30`; field names are unique
across sections, so the flags are flat). Values are applied in this order, later wins:

    package defaults  <  the recipe's defaults  <  presets (--demo, --quick)  <  --config FILE  <  flags

With --resume, the run folder's own config.yaml comes just below --config FILE: the run continues with the
settings it was started with, less what --config or flags change (e.g. a larger --max_steps). The settings
its checkpoints are made of (RESUME_FIXED) cannot change.

Parsing is TRL's `TrlParser` (an `HfArgumentParser`); `--help` prints the short grouped help of
options.py, `--help-all` every option with its help.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError
from .secrets import is_secret_key


@dataclass
class ModelArgs:
    model: str | None = field(default=None, metadata={
        "help": "Checkpoint: a hub id, a local folder, or tiny:<family> (a tiny random model built offline). "
                "Default: the recipe's model (its 4-bit variant on the unsloth backend)."})
    backend: Literal["auto", "unsloth", "hf"] = field(default="auto", metadata={
        "help": "auto = unsloth when a CUDA GPU and unsloth are available, else hf (transformers + peft)."})
    load_in_4bit: bool | None = field(default=None, metadata={
        "help": "Load the base model in 4-bit (bitsandbytes NF4). Default: yes on a CUDA GPU, no on CPU."})
    max_seq_length: int = field(default=2048, metadata={
        "help": "Longest sample in tokens (image tokens + text). Longer samples are an error, never truncated."})
    full_finetune: bool = field(default=False, metadata={
        "help": "Train every weight instead of LoRA adapters. Only sensible for tiny models (the offline demo)."})
    use_gradient_checkpointing: str = field(default="auto", metadata={
        "help": "unsloth backend: 'auto' (on the GPU when the memory budget is at least 16 GiB, else offloaded), "
                "'unsloth' (offloaded to CPU memory, least GPU memory), 'true' (on the GPU) or 'false'."})
    training_speedups: bool = field(default=True, metadata={
        "help": "Run each same-size group of a batch's images through the Pixtral vision tower as a batch (not one "
                "block-masked sequence), and skip the backward of a frozen vision tower. Same results; off only to "
                "compare speed (models/speedups.py)."})
    warm_up_shapes: bool | None = field(default=None, metadata={
        "help": "When training starts, run one forward and backward for every kind of micro-batch the epoch holds "
                "(its image shapes and their counts; no optimizer step), so that compiling and planning kernels "
                "happens up front, not as slow steps mid-training. Default: on a GPU."})
    train_compiled: bool = field(default=True, metadata={
        "help": "Run Unsloth's torch.compile'd functions compiled in training (its Triton kernels run either way; the "
                "memory plan's probes always run eager). false: no tracing or compiling when training starts, at "
                "eager speed per step (benchmarks/README.md compares them)."})
    memory_plan: bool = field(default=True, metadata={
        "help": "On a GPU, settle the micro-batch and the layers that keep their activations by real probe steps "
                "within the memory budget (printed as 'Memory plan: ...'). false: train exactly the configured "
                "micro-batch and checkpointing (--max_memory_gib then only picks the micro-batch)."})
    max_micro_batch: int | None = field(default=None, metadata={
        "help": "The largest micro-batch the memory plan tries (default: the effective batch; the rest becomes "
                "accumulation, so the effective batch stays the same). For comparisons: a smaller micro-batch leaves "
                "room to keep more layers' activations, but on the 14B shape under 24 GiB micro-batch 4 kept no more "
                "and trained at about half the speed (benchmarks/README.md)."})
    profile_step: int | None = field(default=None, metadata={
        "help": "Profile training's optimizer step N (1-based) under torch.profiler and write profile_step.json to the "
                "run folder: the share of the step the GPU spent in kernels, kernel launches, seconds by kind "
                "(matmuls, attention, 4-bit dequantization, copies, the rest) and the top kernels."})
    max_memory_gib: float | None = field(default=None, metadata={
        "help": "GPU memory budget (GiB; default 92%% of the GPU's; 48 for an RTX A6000). Within it the run trains "
                "with the largest micro-batch that fits (the effective batch, per_device_train_batch_size x "
                "gradient_accumulation_steps, never changes: the rest becomes accumulation) and keeps the "
                "activations of as many layers as fit instead of recomputing them (memory_plan.py)."})


@dataclass
class LoraArgs:
    lora_r: int = field(default=16, metadata={"help": "LoRA rank: adapter size and capacity; memory grows linearly."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA path (0 is fastest with unsloth)."})
    lora_bias: Literal["none", "all", "lora_only"] = field(default="none", metadata={"help": "Which biases to train."})
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised LoRA (scale = alpha / sqrt(r))."})
    lora_random_state: int = field(default=3407, metadata={"help": "Seed for the adapters' initial weights."})
    finetune_vision_layers: bool = field(default=True, metadata={
        "help": "Adapt the vision tower and projector. Costs activation memory per image token; turn off when the "
                "images are like the pre-training data and only the answer style must change."})
    finetune_language_layers: bool = field(default=True, metadata={"help": "Adapt the language model."})
    finetune_attention_modules: bool = field(default=True, metadata={"help": "Adapt attention projections (q/k/v/o)."})
    finetune_mlp_modules: bool = field(default=True, metadata={
        "help": "Adapt MLP projections (gate/up/down): the most parameters; turn off to halve adapter size."})


@dataclass
class DataArgs:
    data_dir: str | None = field(default=None, metadata={
        "help": "A local copy of the recipe's dataset (Kaggle folder layout, or a saved HF dataset). Default: "
                "download the recipe's source (needs network and, for Kaggle, credentials)."})
    image_size: int | None = field(default=None, metadata={
        "help": "Longest image side in pixels; drives image tokens and memory. Default: the recipe's."})
    image_buckets: bool = field(default=True, metadata={
        "help": "Scale every image to image_size and pad it (black) into one of a few fixed boxes (square, 3:4, 1:2, "
                "1:3), so batch shapes repeat: no recompilation per new image shape, same-shape batches. Off: each "
                "image keeps its own size (shrunk to image_size, snapped to the patch grid)."})
    preprocess_images: bool = field(default=True, metadata={
        "help": "Decode and size every image once before training (cached as PNG under the cache folder) instead "
                "of in every batch of every epoch. Same pixels either way."})
    pack_questions: bool = field(default=False, metadata={
        "help": "VQA: train the questions about one image (same images, no conversation of their own) as one "
                "multi-turn conversation, so the image is encoded once per epoch instead of once per question; "
                "evaluation stays one question per row."})
    lazy_images_above: int = field(default=20_000, metadata={
        "help": "A training split with more rows than this is not decoded before training: images are checked from "
                "their headers (file, format, size), then decoded, sized and cached as batches first need them; an "
                "image that fails then is skipped and logged (skipped_in_training.jsonl). The leakage check is left "
                "to `unsloth-med check-data`. 0: always lazy."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training examples."})
    max_eval_samples: int | None = field(default=None, metadata={
        "help": "Evaluate on at most this many test examples."})
    max_bad_fraction: float = field(default=0.05, metadata={
        "help": "Stop before training when more than this fraction of a split's images cannot be decoded "
                "(fewer are skipped and listed in skipped_images.json)."})
    drop_leaked_test_images: bool = field(default=False, metadata={
        "help": "Remove test images that are near-identical copies of training images before evaluating."})
    # Your own data (generic `classify` / `caption` recipes; `instruction` works for every recipe).
    instruction: str | None = field(default=None, metadata={
        "help": "The instruction sent with every image. {labels} becomes the comma-separated class list. "
                "Default: the recipe's."})
    labels: list[str] | None = field(default=None, metadata={
        "help": "classify: the class names, in this order (default: every label found in the data, sorted). "
                "Several values, or one comma-separated value."})
    image_column: str | None = field(default=None, metadata={
        "help": "classify/caption: the listing or dataset column holding the image (a path relative to the listing, "
                "a URL, or a HF image). Default: the first of path, image, file, filename, imageurl, url present."})
    target_column: str | None = field(default=None, metadata={
        "help": "classify/caption: the column holding the answer. Default: label/class (classify), "
                "text/caption/report (caption)."})
    target_template: str | None = field(default=None, metadata={
        "help": "classify/caption: build the answer from several columns instead, e.g. "
                "'Findings: {findings} Impression: {impression}'."})
    split_column: str = field(default="split", metadata={
        "help": "Listing column with train/test (val/validation/dev count as test when there is no test); "
                "'' to ignore it. Without one, test_fraction of the data is held out."})
    test_fraction: float = field(default=0.1, metadata={
        "help": "Fraction held out for testing when the data has no split (stratified by class for classify)."})
    data_format: Literal["auto", "table", "class_folders", "hf"] = field(default="auto", metadata={
        "help": "How to read --data_dir for generic recipes: auto (from what it is), table (CSV/TSV/JSONL/JSON "
                "listing), class_folders, or hf (dataset name / save_to_disk folder)."})
    # Question answering (vqa recipes); an instruction's {question} (any {column}) is filled per row.
    question_column: str | None = field(default=None, metadata={"help": "vqa: the question column (default question)."})
    answer_column: str | None = field(default=None, metadata={"help": "vqa: the answer column (default answer)."})
    answer_type_column: str | None = field(default=None, metadata={
        "help": "vqa: closed/open per row (default answer_type when present; else yes/no answers are closed)."})
    image_group_column: str | None = field(default=None, metadata={
        "help": "vqa: rows with the same value show the same image (default image_group when present)."})
    drop_duplicates: bool = field(default=False, metadata={
        "help": "Listings: keep only the first of rows that repeat an earlier row (same image, answer and split); "
                "without it they are counted in a warning and train twice."})
    split_by: Literal["row", "image"] = field(default="row", metadata={
        "help": "image: re-split so that no image (its group, else its content hash) is in both train and test."})


@dataclass
class EvalArgs:
    eval_mode: Literal["score", "generate"] = field(default="score", metadata={
        "help": "Classification: 'score' ranks every class by its likelihood (no parse failures); 'generate' "
                "decodes greedily and matches the answer to a class. Captioning always generates."})
    eval_batch_size: int | None = field(default=None, metadata={
        "help": "Images per evaluation batch. Default: 32 on a GPU (inference needs little memory, and larger "
                "batches keep the GPU busy), 8 on a CPU."})
    max_new_tokens: int | None = field(default=None, metadata={"help": "Generation budget. Default: the recipe's."})
    eval_compiled: bool | None = field(default=None, metadata={
        "help": "Run Unsloth's torch.compile'd functions compiled during evaluation. Default: not for label scoring "
                "(traced, a process's first pass cost 13.6 s more on the 14B shape and packed batches then ran about "
                "0.15 s faster each: it pays only on splits of thousands of images; benchmarks/README.md), compiled "
                "for generation (captions, answers; not measured eager)."})
    eval_dequantize: bool | None = field(default=None, metadata={
        "help": "Run every 4-bit layer that evaluation does not fold on its weight dequantized once for the pass "
                "(16-bit copies, freed after; only where they take at most half of the free budget) instead of "
                "dequantizing it again in every forward. Default: when the pass generates (captions, answers, "
                "--eval_mode generate), where it made the untrained 11B shape's generation 1.42x faster; label scoring "
                "gained nothing (benchmarks/README.md)."})
    eval_fold_adapters: bool = field(default=True, metadata={
        "help": "Evaluate a LoRA-tuned model with each adapter folded into its layer's 16-bit weight (the merged "
                "export's weights): one matmul a layer instead of three; label scoring after training a fifth "
                "faster on the 14B shape. Done when the 16-bit copy takes at most half of the free memory budget; "
                "freed after."})
    eval_before: bool = field(default=True, metadata={"help": "Evaluate the base model before training."})
    eval_after: bool = field(default=True, metadata={"help": "Evaluate the tuned model after training."})


@dataclass
class ExportArgs:
    export: Literal["adapter", "merged-16bit", "gguf"] = field(default="adapter", metadata={
        "help": "What the run leaves besides the adapter: 'merged-16bit' also writes merged weights to merged/, "
                "verified by reloading them with plain transformers; 'gguf' also writes f16 text + mmproj GGUF "
                "files for llama.cpp / Ollama to gguf/, verified in llama.cpp."})
    push_to_hub_id: str | None = field(default=None, metadata={
        "help": "After the run, push what it exported (gguf/ with --export gguf, else merged/), or else the "
                "adapter, to this Hub repo, OWNER/NAME. Token: HF_TOKEN, `hf auth login` or --hub_token; never "
                "printed or saved."})
    hub_public: bool = field(default=False, metadata={"help": "Make the pushed repo public (default: private)."})


@dataclass
class RunArgs:
    recipe: str | None = field(default=None, metadata={
        "help": "Recipe name (implied by `python -m unsloth_med.recipes.X`)."})
    demo: bool = field(default=False, metadata={
        "help": "Offline demo: tiny Ministral-3-family model + generated fracture X-rays; no GPU, network or "
                "credentials."})
    quick: bool = field(default=False, metadata={
        "help": "Quick trial: exactly 30 training steps (recipes/<recipe>/quick.yaml)."})
    resume: bool = field(default=False, metadata={"help": "Continue from the last checkpoint in --output_dir."})


SECTIONS: dict[str, type] = {"run": RunArgs, "model": ModelArgs, "lora": LoraArgs, "data": DataArgs,
                             "eval": EvalArgs, "export": ExportArgs}


@dataclass
class Config:
    run: RunArgs
    model: ModelArgs
    lora: LoraArgs
    data: DataArgs
    training: Any  # trl.SFTConfig
    eval: EvalArgs
    export: ExportArgs

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The resolved tree, for config.yaml: plain values only, no secrets."""
        out: dict[str, dict[str, Any]] = {}
        for name in ("run", "model", "lora", "data", "training", "eval", "export"):
            section = getattr(self, name)
            values = section.to_dict() if name == "training" else dataclasses.asdict(section)
            out[name] = {k: _plain(v) for k, v in sorted(values.items()) if not is_secret_key(k)}
        return out


def _plain(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(getattr(value, "value", value))


def presets_dir() -> Path:
    """The presets inside the installed package, or recipes/ at the top of the repository (editable install). The
    package's own first: in an installed wheel here.parent is site-packages, where another distribution's top-level
    recipes/ folder would otherwise hide them."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "presets", here.parent / "recipes"):
        if candidate.is_dir():
            return candidate
    return here.parent / "recipes"


def config_file_path(given: str) -> str:
    """--config FILE as given, or, when no such file exists and it names one of the shipped recipe configs
    (`recipes/<recipe>/<name>.yaml`, as the README writes them), that config inside the installed package: the
    README's commands then work outside a checkout too."""
    path = Path(given)
    if path.is_file() or path.parts[:1] != ("recipes",):
        return given
    shipped = presets_dir().joinpath(*path.parts[1:])
    return str(shipped) if shipped.is_file() else given


#: The attribute Unsloth sets on the config classes it generates (unsloth/models/rl.py, 2026.10).
UNSLOTH_PATCHED_CONFIG = "_unsloth_patched_rl_config"


def trl_sft_config() -> type:
    """TRL's own SFTConfig, even after `import unsloth` swapped in its subclass.

    Unsloth's subclass adds a `max_seq_length` field, which would clash with ModelArgs.max_seq_length in
    one flat parser; the pipeline needs only TRL's fields, and Unsloth's trainer accepts TRL's config.
    Name and module do not tell them apart: Unsloth renames its subclass, and the shim it puts above it, to
    `SFTConfig` in TRL's modules so that configs pickle. The marker it sets in each one's own __dict__ does
    (Unsloth's own code walks back to TRL's class the same way).
    """
    from trl import SFTConfig

    for cls in SFTConfig.__mro__:
        if (cls.__name__ == "SFTConfig" and cls.__module__.startswith("trl.")
                and UNSLOTH_PATCHED_CONFIG not in cls.__dict__):
            return cls
    return SFTConfig


def _section_fields() -> dict[str, set[str]]:
    from .options import TRAINER_OPTIONS  # the names only: no TRL import, so a bad file fails at once

    fields = {name: {f.name for f in dataclasses.fields(cls)} for name, cls in SECTIONS.items()}
    fields["training"] = set(TRAINER_OPTIONS)
    return fields


def read_yaml_tree(path: str | Path, *, strict: bool = True) -> dict[str, Any]:
    """A nested config file, flattened to {field: value}; unknown sections or keys are errors.

    `strict=False` skips them instead: a run's own config.yaml, written by the package, may hold an option
    that another version of TRL no longer has."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file not found: {path}. Pass an existing YAML file to --config.")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} must be a mapping of sections ({', '.join(_section_fields())}).")
    fields = _section_fields()
    flat: dict[str, Any] = {}
    for section, values in tree.items():
        if not strict and (section not in fields or not isinstance(values, dict)):
            continue
        if section not in fields:
            raise ConfigError(f"{path}: unknown section '{section}'. Sections: {', '.join(fields)}.")
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: section '{section}' must be a mapping of option: value.")
        for key, value in values.items():
            if not strict and key not in fields[section]:
                continue
            if key not in fields[section]:
                close = difflib.get_close_matches(key, sorted(fields[section]), n=1)
                owner = next((s for s, names in fields.items() if key in names), None)
                hint = (f" It belongs in section '{owner}'." if owner
                        else f" Did you mean '{close[0]}'?" if close else "")
                raise ConfigError(f"{path}: '{key}' is not an option of section '{section}'.{hint}")
            flat[key] = value
    return flat


def device_defaults() -> dict[str, Any]:
    """Defaults that depend on the machine: 8-bit AdamW and bf16 need a CUDA GPU.

    On a GPU, batches are also grouped by length (with image buckets: one image shape per micro-batch,
    data/batching.py; no padding, shapes repeat) and collated by 2 worker processes into pinned memory
    while the GPU computes. On a CPU the workers would only compete with training for the cores.
    """
    import torch

    cuda = torch.cuda.is_available()
    return {
        "optim": "adamw_8bit" if cuda else "adamw_torch",
        "bf16": bool(cuda and torch.cuda.is_bf16_supported()),
        "fp16": bool(cuda and not torch.cuda.is_bf16_supported()),
        "train_sampling_strategy": "group_by_length" if cuda else "random",
        "dataloader_num_workers": 2 if cuda else 0,
        "dataloader_pin_memory": cuda,
    }


# The seeds' settings (Unsloth notebooks and the Ministral 3 tutorial).
TRAINING_DEFAULTS: dict[str, Any] = {
    "learning_rate": 2e-4,
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 4,
    "lr_scheduler_type": "linear",
    "warmup_steps": 5,
    "num_train_epochs": 1,
    "weight_decay": 0.001,
    "seed": 3407,
    "logging_steps": 1,
    "save_strategy": "steps",
    "save_steps": 100,
    "save_total_limit": 2,
    "report_to": "none",
    "max_length": None,  # our collators never truncate: an over-long sample is an error naming it
    "remove_unused_columns": False,  # the collator needs the raw image column
    "dataset_text_field": "",
    "dataset_kwargs": {"skip_prepare_dataset": True},
    "gradient_checkpointing": False,
    "dataloader_num_workers": 0,
}


def _raise_config_error(message: str):
    raise ConfigError(message)


def build_parser(prog: str = "unsloth-med train"):
    """The full parser (TRL's TrlParser over every section); its errors raise ConfigError (one `error:` style)."""
    from trl import TrlParser

    parser = TrlParser((RunArgs, ModelArgs, LoraArgs, DataArgs, trl_sft_config(), EvalArgs, ExportArgs), prog=prog)
    parser.error = _raise_config_error
    return parser


def parse_config(argv: list[str] | None, recipe=None, *, prog: str = "unsloth-med train") -> Config:
    """Resolve the config from defaults, the recipe, presets, the resumed run's config.yaml, --config and flags.

    `--help` (short, grouped) and `--help-all` print and exit; an unknown flag is an error before anything
    heavy (torch, TRL) is imported."""
    import argparse
    import sys

    from .options import check_known_options, short_help

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(short_help(prog, recipe_given=recipe is not None))
        raise SystemExit(0)
    if "--help-all" in argv:
        print(build_parser(prog).format_help())
        raise SystemExit(0)
    check_known_options(argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    pre.add_argument("--recipe")
    pre.add_argument("--demo", nargs="?", const="true")
    pre.add_argument("--quick", nargs="?", const="true")
    pre.add_argument("--resume", nargs="?", const="true")
    pre.add_argument("--output_dir", "--output-dir")
    known, _ = pre.parse_known_args(argv)
    if recipe is None and known.recipe:
        from .recipes import get_recipe

        recipe = get_recipe(known.recipe)

    # (where the values come from, for messages; the values), later wins
    layers: list[tuple[str, dict[str, Any]]] = [("the defaults", TRAINING_DEFAULTS),
                                                ("the defaults", device_defaults())]
    if recipe is not None:
        layers.append((f"recipe {recipe.name}'s defaults", {"recipe": recipe.name, **recipe.defaults}))
        for flag, preset in (("demo", "demo.yaml"), ("quick", "quick.yaml")):
            if _truthy(getattr(known, flag)):
                path = presets_dir() / recipe.name / preset
                # A user's own recipe: every recipe's quick trial is the same 30 steps (the shipped quick.yaml files
                # differ only in their comments). A demo needs data and a model of its own: no such fallback.
                if not path.is_file() and flag == "quick":
                    path = presets_dir() / "classify" / preset
                if not path.is_file():
                    raise ConfigError(f"Recipe '{recipe.name}' has no --{flag} preset ({path} is missing).")
                layers.append((str(path), read_yaml_tree(path)))
    if known.config:
        known.config = config_file_path(known.config)
    from_file = read_yaml_tree(known.config) if known.config else {}
    resume = _truthy(known.resume if known.resume is not None else str(from_file.get("resume")))
    saved_path, saved = _resumed_run_config(known.output_dir or from_file.get("output_dir"), recipe) if resume \
        else (None, {})
    if saved:
        layers.append((str(saved_path), saved))
    if known.config:
        layers.append((known.config, from_file))

    parser = build_parser(prog)
    for _, layer in layers:
        parser.set_defaults_with_config(**layer)
    args = _without_config_option(argv)
    try:
        sections = parser.parse_args_into_dataclasses(args=args)
    except ValueError as exc:  # TrainingArguments validation, e.g. bf16 without a GPU
        raise ConfigError(f"invalid training option: {exc}") from exc
    run, model, lora, data, training, eval_, export = sections
    _check_choices(parser, sections, layers)
    _check_report_to(training)
    if export.push_to_hub_id:  # a repo id the Hub refuses stops here, not after training and the export
        from .hub import check_repo_id

        check_repo_id(export.push_to_hub_id)
    if saved:
        _check_unchanged_on_resume(sections, saved, saved_path, args, known.config, from_file)
    if model.max_micro_batch is not None and model.max_micro_batch < 1:
        raise ConfigError(f"--max_micro_batch {model.max_micro_batch}: the largest micro-batch to try must be at least "
                          "1; leave it unset to try the whole effective batch first.")
    if model.max_memory_gib is not None and model.max_memory_gib <= 0:  # else 0 meant "unset" and -8 failed on a GPU
        raise ConfigError(f"--max_memory_gib {model.max_memory_gib:g}: a budget in GiB above 0; leave it unset for "
                          "92% of the GPU.")
    if not 0.0 < data.test_fraction < 1.0:  # else the data stage (or, with --split_by image, a later evaluate) failed
        raise ConfigError(f"--test_fraction {data.test_fraction:g}: the share of the data held out for testing, "
                          "between 0 and 1 (e.g. 0.1).")
    if model.profile_step is not None and model.profile_step < 1:
        raise ConfigError(f"--profile_step {model.profile_step}: the optimizer step to profile counts from 1.")
    if eval_.max_new_tokens is not None and eval_.max_new_tokens < 1:  # else a transformers traceback after training
        raise ConfigError(f"--max_new_tokens {eval_.max_new_tokens}: a whole number of tokens above 0; leave it unset "
                          "for the recipe's.")
    if run.recipe is None:
        raise ConfigError("No recipe given. Use `python -m unsloth_med.recipes.bone_fracture` or --recipe NAME.")
    if training.output_dir in (None, "", "trainer_output"):
        training.output_dir = str(Path("runs") / f"{run.recipe}-{time.strftime('%Y%m%d-%H%M%S')}")
    return Config(run=run, model=model, lora=lora, data=data, training=training, eval=eval_, export=export)


def _check_report_to(training) -> None:
    """An experiment logger (--report_to) that is not installed failed when the trainer was built: after the data
    checks, the model load and the evaluation before training. Say so before any of them."""
    wanted = training.report_to
    names = [n for n in ([wanted] if isinstance(wanted, str) else list(wanted or [])) if n not in ("none", "all")]
    if not names:
        return
    from transformers.integrations import get_available_reporting_integrations

    missing = [name for name in names if name not in get_available_reporting_integrations()]
    if missing:
        raise ConfigError(f"--report_to {', '.join(missing)}: not installed here. Install it (pip install -e "
                          "\".[logging]\" adds tensorboard and wandb), or set report_to none.")


def _without_config_option(argv: list[str]) -> list[str]:
    """argv less `--config FILE` and `--config=FILE` (read above; no section has a field of that name)."""
    args, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == "--config":
            skip = True
        elif not token.startswith("--config="):
            args.append(token)
    return args


def _choices(hint: Any) -> tuple | None:
    """The values a Literal field (or an optional one) takes; None for any other type."""
    import typing

    members = typing.get_args(hint) if typing.get_origin(hint) is not typing.Literal else (hint,)
    members = [m for m in members if m is not type(None)]
    if not members or any(typing.get_origin(m) is not typing.Literal for m in members):
        return None
    return tuple(value for m in members for value in typing.get_args(m))


def _check_choices(parser, sections, layers: list[tuple[str, dict[str, Any]]]) -> None:
    """Every Literal field holds one of its values, wherever it came from. argparse checks the choices of a flag
    only: a value from --config, a preset or a resumed run's config.yaml reached the run unchecked (an
    `export: merged` that exported nothing, an `eval_mode: generat` that failed after the model loaded)."""
    import argparse
    import typing

    for section in sections:
        hints = typing.get_type_hints(type(section))
        for f in dataclasses.fields(section):
            choices = _choices(hints.get(f.name))
            value = getattr(section, f.name)
            if choices is None or value is None or value in choices:
                continue
            where = next((source for source, layer in reversed(layers) if f.name in layer), "the defaults")
            action = next((a for a in parser._actions if a.dest == f.name), None)  # HfArgumentParser's, with choices
            if action is None:  # a field the parser has no flag for
                raise ConfigError(f"{f.name}: invalid choice {value!r} (choose from {', '.join(map(repr, choices))}), "
                                  f"set in {where}")
            try:  # argparse's own check of a flag's value: the very error a bad flag gets
                parser._check_value(action, value)
            except argparse.ArgumentError as exc:
                raise ConfigError(f"{exc}, set in {where}") from None


#: What a run's checkpoints are made of: the base model, whether they hold adapters or the whole model, the
#: adapters' shape (rank, bias), the layers they sit on and their scale. A resume with another value fails to
#: load them (a size mismatch) or continues them in a model they were not trained in. Everything else may change
#: on --resume: a larger --max_steps, a smaller batch or --image_size after running out of memory.
RESUME_FIXED = ("model", "full_finetune", "lora_r", "lora_alpha", "use_rslora", "lora_bias", "finetune_vision_layers",
                "finetune_language_layers", "finetune_attention_modules", "finetune_mlp_modules")

#: What the run's train/test split is made from (data/sources.run_splits): with another value on --resume, the split
#: moves and images the run was tested on (before training, or in an earlier session) go into training. --seed also
#: orders the training data, where a resumed epoch picks up. A --data_dir that names the same folder is no change,
#: and one where the recorded folder is gone (the data moved, another machine) is taken with a warning.
RESUME_SPLIT = ("data_dir", "split_by", "test_fraction", "split_column", "seed")


def _resumed_run_config(output_dir: str | None, recipe) -> tuple[Path | None, dict[str, Any]]:
    """The settings the run in output_dir was started with (its config.yaml, flattened); none when the run
    stopped before it recorded them (it then trained nothing to continue)."""
    if not output_dir:
        raise ConfigError("--resume continues the run in --output_dir: name its folder, e.g. "
                          "--resume --output_dir runs/NAME.")
    path = Path(output_dir) / "config.yaml"
    if not path.is_file():
        return None, {}
    saved = read_yaml_tree(path, strict=False)
    saved.pop("output_dir", None)  # where the folder is now (it may have been moved), not where it was
    if recipe is not None and saved.get("recipe") not in (None, recipe.name):
        raise ConfigError(f"--resume: the run in {output_dir} is a '{saved['recipe']}' run ({path}), not "
                          f"'{recipe.name}'. Resume it with its own recipe (unsloth-med train --recipe "
                          f"{saved['recipe']} --resume --output_dir {output_dir}), or train '{recipe.name}' into "
                          "another --output_dir.")
    return path, saved


def _same_model(given: str | None, saved: str | None) -> bool:
    """Whether two model names load the same checkpoint (config.yaml records it resolved: tiny:<family> is its
    folder, a local folder may be named by another path)."""
    if given == saved or given is None or saved is None:
        return given == saved
    if given.startswith("tiny:"):
        from .models import resolve_model_name

        given = resolve_model_name(given, None, "")
    return os.path.realpath(given) == os.path.realpath(saved)


def _check_unchanged_on_resume(sections, saved: dict[str, Any], saved_path: Path, args: list[str],
                               config_file: str | None, from_file: dict[str, Any]) -> None:
    """Refuse a --config or flag value that contradicts what the resumed run's checkpoints are made of."""
    values = {f.name: getattr(section, f.name) for section in sections for f in dataclasses.fields(section)}
    for name in RESUME_FIXED + RESUME_SPLIT:
        if name not in saved:
            continue
        given, was = values[name], saved[name]
        if (_same_model(given, was) if name == "model" else _same_data(given, was) if name == "data_dir"
                else given == was):
            continue
        if name == "data_dir" and was and not Path(str(was)).exists():
            logging.getLogger("unsloth_med").warning(
                "--resume: the run was trained on %s, which is not here; continuing on --data_dir %s. It must be the "
                "same data, or the test split moves and images the run was tested on go into training.", was, given)
            continue
        given, was = _as_flag_value(given) or "''", _as_flag_value(was) or "''"
        flags = {f"--{name}", f"--{name.replace('_', '-')}", f"--no_{name}", f"--no-{name.replace('_', '-')}"}
        by_flag = any(token.split("=", 1)[0] in flags for token in args)
        source = f"--{name} {given}" if by_flag or name not in from_file else f"{config_file} ({name}: {given})"
        why = ("its checkpoints cannot continue with another value" if name in RESUME_FIXED else
               "its train/test split is made with it" + (" where the data has no split column (and the training "
                                                          "data's order)" if name == "seed" else "")
               + ": another value moves the split, and images the run was tested on go into training")
        raise ConfigError(
            f"{source}: the run being resumed was trained with {name} {was} ({saved_path}), and {why}. Drop it to "
            f"continue the run as it was, or train with {name} {given} from the start into another --output_dir."
        )


def _same_data(given: str | None, saved: str | None) -> bool:
    """Whether two --data_dir values name the same data (a folder or listing may be named by another path)."""
    if given == saved or given is None or saved is None:
        return given == saved
    return os.path.realpath(given) == os.path.realpath(saved)


def _as_flag_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _truthy(value: str | None) -> bool:
    return value is not None and str(value).lower() in ("1", "true", "yes", "on")


def save_config(config: Config, path: str | Path) -> None:
    from .secrets import redact

    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    Path(path).write_text(redact(text))


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
