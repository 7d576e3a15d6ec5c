"""Command-line options without importing the trainer: the names `train` accepts, the short `--help`, and
the early check that turns a typo into `error: unknown option --max_stesp (did you mean --max_steps?)`.

Importing TRL for its `SFTConfig` takes seconds (torch, transformers); a typo should fail at once. So the
trainer's option names are listed here (TRL 1.15's SFTConfig, the version pyproject pins), and
tests/test_cli.py checks that the list still equals `dataclasses.fields(SFTConfig)`. `--help-all` builds
the real parser and prints every option with TRL's and Transformers' own help.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Iterable

from .errors import ConfigError

# TRL's SFTConfig fields (TrainingArguments + SFT options); regenerate with
# `sorted(f.name for f in dataclasses.fields(unsloth_med.config.trl_sft_config()))` after a TRL upgrade.
TRAINER_OPTIONS = frozenset((
    'accelerator_config', 'activation_offloading', 'adam_beta1', 'adam_beta2', 'adam_epsilon',
    'assistant_only_loss', 'auto_find_batch_size', 'average_tokens_across_devices', 'batch_eval_metrics', 'bf16',
    'bf16_full_eval', 'chat_template_path', 'completion_only_loss', 'data_seed', 'dataloader_drop_last',
    'dataloader_in_order', 'dataloader_multiprocessing_context', 'dataloader_num_workers',
    'dataloader_persistent_workers', 'dataloader_pin_memory', 'dataloader_prefetch_factor', 'dataset_kwargs',
    'dataset_num_proc', 'dataset_text_field', 'ddp_backend', 'ddp_broadcast_buffers', 'ddp_bucket_cap_mb',
    'ddp_find_unused_parameters', 'ddp_static_graph', 'ddp_timeout', 'debug', 'deepspeed', 'disable_tqdm',
    'do_eval', 'do_predict', 'do_train', 'enable_jit_checkpoint', 'eos_token', 'eval_accumulation_steps',
    'eval_delay', 'eval_do_concat_batches', 'eval_on_start', 'eval_packing', 'eval_steps', 'eval_strategy',
    'eval_use_gather_object', 'fp16', 'fp16_full_eval', 'fsdp', 'fsdp_config', 'full_determinism',
    'gradient_accumulation_steps', 'gradient_checkpointing', 'gradient_checkpointing_kwargs', 'greater_is_better',
    'hub_always_push', 'hub_model_id', 'hub_private_repo', 'hub_revision', 'hub_strategy', 'hub_token',
    'ignore_data_skip', 'include_for_metrics', 'include_num_input_tokens_seen', 'label_names',
    'label_smoothing_factor', 'learning_rate', 'length_column_name', 'liger_kernel_config',
    'load_best_model_at_end', 'local_rank', 'log_level', 'log_level_replica', 'log_on_each_node',
    'logging_first_step', 'logging_nan_inf_filter', 'logging_steps', 'logging_strategy', 'loss_type',
    'lr_scheduler_kwargs', 'lr_scheduler_type', 'max_grad_norm', 'max_length', 'max_steps', 'metric_for_best_model',
    'model_init_kwargs', 'neftune_noise_alpha', 'num_train_epochs', 'optim', 'optim_args', 'optim_target_modules',
    'output_dir', 'packing', 'packing_strategy', 'pad_to_multiple_of', 'pad_token', 'padding_free',
    'parallelism_config', 'per_device_eval_batch_size', 'per_device_train_batch_size', 'prediction_loss_only',
    'project', 'push_to_hub', 'remove_unused_columns', 'report_to', 'restore_callback_states_from_checkpoint',
    'resume_from_checkpoint', 'router_aux_loss_coef', 'run_name', 'save_on_each_node', 'save_only_model',
    'save_steps', 'save_strategy', 'save_total_limit', 'seed', 'shuffle_dataset', 'skip_memory_metrics', 'tf32',
    'torch_compile', 'torch_compile_backend', 'torch_compile_mode', 'torch_empty_cache_steps', 'trackio_bucket_id',
    'trackio_space_id', 'trackio_static_space_id', 'train_sampling_strategy', 'truncation_mode',
    'trust_remote_code', 'use_cache', 'use_cpu', 'use_liger_kernel', 'warmup_steps', 'weight_decay'
))

# The training options most runs touch, with the help the short `--help` shows (the rest: --help-all).
ESSENTIAL_TRAINING = {  # name: (metavar, help)
    "output_dir": ("DIR", "Run folder (default: runs/<recipe>-<date>-<time>)."),
    "max_steps": ("N", "Stop after this many optimizer steps; -1 trains num_train_epochs (--quick: 30)."),
    "num_train_epochs": ("X", "Passes over the training split (default 1)."),
    "per_device_train_batch_size": ("N", "Images per micro-batch (default 2; on a GPU the memory plan raises it "
                                         "up to the effective batch when it fits)."),
    "gradient_accumulation_steps": ("N", "Micro-batches per optimizer step (default 4; effective batch = both, "
                                         "kept exact by the memory plan)."),
    "learning_rate": ("X", "Peak learning rate (default 2e-4)."),
    "lr_scheduler_type": ("NAME", "linear (default), cosine, constant, ..."),
    "warmup_steps": ("X", "Steps of linear warm-up (default 5; a value < 1 is a fraction of the steps)."),
    "optim": ("NAME", "Optimizer (default: adamw_8bit on a GPU, adamw_torch on CPU); --help-all lists all."),
    "seed": ("N", "Seed for data order and the held-out split (default 3407; adapters: --lora_random_state)."),
    "logging_steps": ("N", "Log the loss every N steps (default 1)."),
    "save_steps": ("N", "Checkpoint every N steps (default 100; keeps the last 2). --resume continues from one."),
    "report_to": ("NAME", "none (default), tensorboard or wandb."),
}

SHORT_USAGE = "[--config FILE] [--demo | --quick] [options]"


def _run_sections():
    from . import config  # light: yaml and the package's own dataclasses

    return config.SECTIONS


def option_names() -> set[str]:
    """Every flag name `train` accepts (underscore form, without dashes)."""
    names = set(TRAINER_OPTIONS) | {"config", "help", "help_all"}
    for cls in _run_sections().values():
        names |= {f.name for f in dataclasses.fields(cls)}
    return names | {f"no_{name}" for name in names}  # HfArgumentParser's --no_X for booleans


def check_known_options(argv: Iterable[str]) -> None:
    """Raise ConfigError for the first `--flag` no section knows, naming the closest known one."""
    known = option_names()
    for token in argv:
        if not token.startswith("--") or token == "--":
            continue
        flag = token[2:].split("=", 1)[0]
        name = flag.replace("-", "_")
        if name in known:
            continue
        close = difflib.get_close_matches(name, sorted(n for n in known if not n.startswith("no_") or
                                                       name.startswith("no_")), n=1, cutoff=0.75)
        suggestion = close[0].replace("_", "-") if close and "-" in flag else (close[0] if close else "")
        hint = f" (did you mean --{suggestion}?)" if close else " (--help lists the options, --help-all every one)"
        raise ConfigError(f"unknown option --{flag}{hint}")


def _metavar(field: dataclasses.Field) -> str:
    text = str(field.type)
    if "Literal" in text:
        choices = text[text.index("[") + 1:text.rindex("]")].replace("'", "").replace('"', "").replace(" ", "")
        return "{" + choices + "}"
    for word, metavar in (("bool", "[BOOL]"), ("list", "A [B ...]"), ("int", "N"), ("float", "X")):
        if word in text:
            return metavar
    return "TEXT"


def _summary(text: str, room: int) -> str:
    """The help's first sentence, cut at its last clause boundary that fits on the line (full text: --help-all)."""
    text = " ".join(str(text).split()).replace("%%", "%").replace("e.g. ", "e.g.~")  # %%: argparse's escape
    end = text.find(". ")
    text = (text if end < 0 else text[:end + 1]).replace("e.g.~", "e.g. ")
    if len(text) <= room:
        return text
    cuts = [text.rfind(mark, 0, room) for mark in ("; ", ": ", " (", ", ")]
    cut = max(cuts)
    if cut > room // 3:
        return text[:cut].removesuffix(" e.g.").rstrip(",")
    return text[:room - 3].rsplit(" ", 1)[0] + " ..."


COLUMN = 40  # where the help text starts


def option_line(name: str, metavar: str, help_: str, width: int) -> str:
    left = f"  --{name} {metavar}" if metavar else f"  --{name}"
    if len(left) >= COLUMN - 1 and " {" in left:
        left = left.split(" {")[0] + " {...}"  # long choice lists: the help names them
    return left.ljust(COLUMN) + _summary(help_, width - COLUMN)


def short_help(prog: str, *, recipe_given: bool = False, width: int = 120) -> str:
    """The grouped `--help`: run, model, lora, data, the essential training options, eval, export."""
    usage = f"usage: {prog}" + ("" if recipe_given else " --recipe NAME") + f" {SHORT_USAGE}"
    lines = [usage, "",
             "Run a recipe: data checks, evaluate before, train, evaluate after, export. Later values win:",
             "defaults < the recipe < --demo/--quick < --config FILE (YAML, sections as below) < flags.",
             "Flags take _ or - (--max_steps, --max-steps); booleans take true/false or --no_<name>."]
    for section, cls in _run_sections().items():
        if section == "eval":
            lines += ["", "training (TRL's SFTConfig; --help-all lists all of its options):"]
            lines += [option_line(name, metavar, help_, width)
                      for name, (metavar, help_) in ESSENTIAL_TRAINING.items()]
        skip = ("recipe",) if recipe_given else ()
        lines += ["", f"{section}:"] + section_lines(cls, width, skip=skip)
        if section == "run":
            lines.append(option_line("config", "FILE", "A YAML file of these sections (examples: recipes/*/*.yaml).",
                                      width))
    lines += ["", "  -h, --help".ljust(COLUMN) + "this help",
              option_line("help-all", "", "Every option, with the trainer's own help (slower: imports TRL).", width)]
    return "\n".join(lines)


def section_lines(cls, width: int = 120, *, skip: Iterable[str] = ()) -> list[str]:
    """One section's options: name, metavar and the first sentence of its help."""
    return [option_line(field.name, _metavar(field), field.metadata.get("help", ""), width)
            for field in dataclasses.fields(cls) if field.name not in skip]
