"""The unsloth backend: FastVisionModel (4-bit or 16-bit), selective LoRA, UnslothVisionDataCollator.

This is the only module of the package that imports unsloth, and only inside functions: `import
unsloth` refuses to run on a machine without a GPU, and it patches transformers, trl and peft when it
is imported, so it must come before they are used on this path. Call `import_unsloth_first()` at the
very start of a command that may use this backend (it does nothing when the backend cannot run).

What it shares with the hf backend (so results are comparable):
- the family's chat template (`prompting.prepare_processor`);
- the LoRA placement: `target_modules` is the same regex as the hf backend's (`lora_target_regex`),
  built from the four `finetune_*` flags with the package's own vision/language and attention/MLP
  classification. Unsloth's name-tag heuristic would otherwise skip the Mistral3 and Mllama projectors;
- the training rows {image, target, id}: the collator below turns each into the conversation of the
  recipe, with the image decoded by `data.images.load_image` at the recipe's `image_size`;
- evaluation and export, which only need `for_inference` (model.eval, caches on) and left padding.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from ..distributed import device_map, launched_world_size
from ..errors import BackendError
from ..models import prompting
from ..models.families import family_of, image_fit

log = logging.getLogger(__name__)

#: Libraries that unsloth patches at import; importing them first costs speed and memory.
PATCHED_BY_UNSLOTH = ("transformers", "trl", "peft")


def _set_env_defaults() -> None:
    """Unsloth's compiled modules, its compile bundles and Triton's kernels in the package's cache folder (unless set),
    not in the user's working directory or /tmp."""
    from ..data.sources import cache_dir

    for variable, name in (("UNSLOTH_COMPILE_LOCATION", "unsloth_compiled_cache"),
                           ("UNSLOTH_MEGA_CACHE_DIR", "unsloth_mega_cache"), ("TRITON_CACHE_DIR", "triton")):
        if variable not in os.environ:
            location = cache_dir() / name
            location.mkdir(parents=True, exist_ok=True)
            os.environ[variable] = str(location)


def _keep_inductor_cache(chosen: str | None) -> None:
    """torch.compile's FX-graph and autograd caches in the package's cache folder (or where the user chose).

    `import unsloth` removes TORCHINDUCTOR_CACHE_DIR (it must not be Unsloth's source folder), which sends torch's
    caches to /tmp/torchinductor_<user>; set after the import, a second run of the same shapes finds the kernels the
    first compiled under the package's cache (tests/test_gpu_speed.py)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from ..data.sources import cache_dir

    if chosen and os.path.abspath(chosen) == os.path.abspath(default_cache_dir()):
        chosen = None  # written by `import torch._dynamo` itself, not chosen by the user
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = chosen or str(cache_dir() / "torchinductor")


def import_unsloth():
    """`import unsloth` with the package's errors: BackendError says what to do instead."""
    if "unsloth" in sys.modules:
        return sys.modules["unsloth"]
    late = [name for name in PATCHED_BY_UNSLOTH if name in sys.modules]
    if late:
        log.info("unsloth imported after %s; call import_unsloth_first() earlier for all optimizations", late)
    _set_env_defaults()
    chosen_inductor_cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    try:
        import unsloth  # noqa: F401  (patches transformers / trl / peft on import)
    except ImportError as exc:
        raise BackendError(
            f"--backend unsloth needs the unsloth package ({exc}). Install it with pip install 'unsloth-med[gpu]', "
            "or use --backend hf."
        ) from exc
    except (NotImplementedError, RuntimeError) as exc:  # unsloth raises these without a usable GPU
        raise BackendError(
            f"unsloth could not start on this machine ({str(exc)[:300]}). It needs an NVIDIA GPU with CUDA; "
            "use --backend hf instead."
        ) from exc
    _keep_inductor_cache(chosen_inductor_cache)
    return sys.modules["unsloth"]


def requested_backend(argv: list[str]) -> str:
    """The backend a command's arguments ask for, read before they are parsed: `--backend`, else the `--config`
    file's `model: {backend: ...}`, else auto. An unreadable file counts as auto (the parser reports it)."""
    backend, config = None, None
    for i, arg in enumerate(argv):
        value = argv[i + 1] if i + 1 < len(argv) else None
        if arg == "--backend":
            backend = value
        elif arg.startswith("--backend="):
            backend = arg.split("=", 1)[1]
        elif arg == "--config":
            config = value
        elif arg.startswith("--config="):
            config = arg.split("=", 1)[1]
    if backend is None and config:
        import yaml

        try:
            backend = (yaml.safe_load(Path(config).read_text()) or {}).get("model", {}).get("backend")
        except (OSError, ValueError, AttributeError, yaml.YAMLError):
            backend = None
    return str(backend or "auto")


def import_unsloth_first(argv: list[str] | None = None) -> bool:
    """Import unsloth before transformers/trl/peft when this run may use the unsloth backend.

    For the CLI: call it first thing with the command's arguments. It imports unsloth only when the
    backend asked for is `unsloth` or `auto`, a CUDA GPU is visible and unsloth is installed; it never
    raises (a run that cannot use unsloth gets its clear error later, from `pick_backend`).

    Importing unsloth replaces trl's SFTConfig with a subclass that has its own `max_seq_length` field,
    which would collide with ModelArgs.max_seq_length in the flat parser of config.py; the parser therefore
    takes TRL's own class (`config.trl_sft_config`), so `unsloth-med train` calls this before parsing.
    """
    if requested_backend(list(sys.argv[1:] if argv is None else argv)) not in ("auto", "unsloth"):
        return False
    from . import cuda_available, unsloth_installed

    if not (unsloth_installed() and cuda_available()):
        return False
    try:
        import_unsloth()
    except BackendError as exc:
        log.warning("%s", exc)
        return False
    return True


def gradient_checkpointing_value(setting: Any) -> Any:
    """ModelArgs.use_gradient_checkpointing ('auto' | 'unsloth' | 'true' | 'false') as unsloth takes it."""
    if isinstance(setting, bool) or setting is None:
        return bool(setting)
    text = str(setting).strip().lower()
    if text in ("unsloth", "auto"):  # 'auto' is resolved against the memory budget first (memory_plan.py)
        return "unsloth"
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", "none"):
        return False
    raise BackendError(f"--use_gradient_checkpointing must be 'unsloth', 'true' or 'false', not '{setting}'.")


class UnslothCollator:
    """Rows (images + conversation) -> UnslothVisionDataCollator batches, trained on the assistant turns only.

    Each row becomes {"messages": recipe.to_conversation(row, images=<decoded images>)}; the wrapped
    collator renders the family's chat template, resizes, tokenizes and (train_on_responses_only) masks
    everything outside the spans that run from the family's response marker to its next instruction
    marker: every assistant turn is trained on, every user and system turn is not. Nothing is truncated:
    a sample longer than max_seq_length is an error naming it, as in the hf backend.
    """

    def __init__(self, model, processor, recipe, *, image_size: int | None, max_seq_length: int,
                 collator_cls=None):
        if collator_cls is None:
            import_unsloth()
            from unsloth.trainer import UnslothVisionDataCollator as collator_cls
        self.family = family_of(model.config)
        # An int image_size gets the model's patch-grid snapping; the pipeline passes its ImageFit.
        self.image_size = image_fit(model.config, image_size)
        self.recipe, self.max_seq_length, self.processor = recipe, max_seq_length, processor
        self.inner = collator_cls(
            model,
            processor,
            max_seq_length=max_seq_length,
            # Fitted images are never larger than this, so Unsloth leaves them as they are.
            resize=self.image_size.max_side if self.image_size.max_side else "max",
            resize_dimension="max",  # image_size bounds the longest side, as load_image does
            train_on_responses_only=True,
            instruction_part=self.family.instruction_part,
            response_part=self.family.response_part,
        )
        # We never truncate (cutting inside the image tokens breaks the image/token alignment):
        # lengths are checked below instead.
        self.inner.truncation = False
        self.inner.max_seq_length = None

    def example(self, row: dict) -> dict:
        """{"messages"}: the row's whole conversation, each image part holding its decoded image (the wrapped
        collator takes the images from the content parts, in order, and trains on every assistant turn)."""
        from ..data import samples
        from ..data.images import load_image

        refs = samples.image_refs(row)
        samples.check_image_count(self.family.name, len(refs), row.get("id", "?"))
        images = [load_image(ref, self.image_size) for ref in refs]
        return {"messages": self.recipe.to_conversation(row, images=images)}

    def __call__(self, rows: list[dict]) -> dict:
        from jinja2.exceptions import TemplateError

        examples = [self.example(row) for row in rows]
        try:
            batch = self.inner(examples)
        except TemplateError:
            # The wrapped collator renders the template itself: name the sample whose conversation the template
            # refuses (prompting.render raises that DataError), instead of a jinja traceback.
            for i, (row, example) in enumerate(zip(rows, examples)):
                prompting.render(self.processor, example["messages"], sample_id=row.get("id", str(i)))
            raise
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        for i, row in enumerate(rows):
            prompting.check_length(int(lengths[i]), self.max_seq_length, row.get("id", str(i)), self.image_size)
        return batch


class UnslothBackend:
    name = "unsloth"

    def load(self, model_name: str, model_args) -> tuple[Any, Any]:
        import_unsloth()
        from transformers import AutoConfig
        from unsloth import FastVisionModel

        try:
            config = AutoConfig.from_pretrained(model_name)
        except OSError:
            config = None  # let unsloth resolve it (e.g. a pre-quantized hub name it maps)
        if config is not None:
            family_of(config, model_name)  # unsupported family: a clear error before loading weights
        four_bit = True if model_args.load_in_4bit is None else bool(model_args.load_in_4bit)
        gc = gradient_checkpointing_value(model_args.use_gradient_checkpointing)
        kwargs: dict[str, Any] = dict(
            load_in_4bit=four_bit,
            use_gradient_checkpointing=gc,
            max_seq_length=model_args.max_seq_length,
        )
        if launched_world_size() > 1:  # under DDP each rank loads the whole model on its own GPU
            kwargs["device_map"] = device_map()
        if model_args.full_finetune:
            kwargs.update(load_in_4bit=False, full_finetuning=True)
        elif not four_bit:
            kwargs["load_in_16bit"] = True
        try:
            model, processor = FastVisionModel.from_pretrained(model_name, **kwargs)
        except Exception as exc:
            if type(exc).__name__ == "OutOfMemoryError":
                raise BackendError(
                    f"Out of GPU memory loading {model_name}. Load it in 4-bit (--load_in_4bit true), or use a "
                    "smaller model."
                ) from exc
            raise
        family = family_of(model.config, model_name)
        prompting.prepare_processor(processor, family)
        model._unsloth_med_gc = gc
        return model, processor

    def add_adapters(self, model, lora, model_args, seed: int):
        if model_args.full_finetune:
            for p in model.parameters():
                p.requires_grad_(True)
            return model
        from unsloth import FastVisionModel

        from .hf import lora_target_regex

        family = family_of(model.config)
        targets = lora_target_regex(model, family, lora)  # BackendError when the flags select nothing
        gc = getattr(model, "_unsloth_med_gc", gradient_checkpointing_value(model_args.use_gradient_checkpointing))
        return FastVisionModel.get_peft_model(
            model,
            finetune_vision_layers=lora.finetune_vision_layers,
            finetune_language_layers=lora.finetune_language_layers,
            finetune_attention_modules=lora.finetune_attention_modules,
            finetune_mlp_modules=lora.finetune_mlp_modules,
            target_modules=targets,
            r=lora.lora_r,
            lora_alpha=lora.lora_alpha,
            lora_dropout=lora.lora_dropout,
            bias=lora.lora_bias,
            use_rslora=lora.use_rslora,
            random_state=lora.lora_random_state,
            use_gradient_checkpointing=gc,
        )

    def collator(self, model, processor, recipe, *, image_size, max_seq_length):
        return UnslothCollator(model, processor, recipe, image_size=image_size, max_seq_length=max_seq_length)

    def for_training(self, model):
        from unsloth import FastVisionModel

        # With the run's checkpointing setting: for_training's default (True) sets `gradient_checkpointing` on every
        # layer, and a model loaded with --use_gradient_checkpointing false has no checkpoint function for them to
        # call (AttributeError '_gradient_checkpointing_func' at the first training forward).
        FastVisionModel.for_training(model, use_gradient_checkpointing=getattr(model, "_unsloth_med_gc", True))
        return model

    def for_inference(self, model):
        from unsloth import FastVisionModel

        FastVisionModel.for_inference(model)
        return model

    def load_adapter(self, base_name: str, adapter_dir: str | Path, model_args):
        from peft import PeftModel

        model, processor = self.load(base_name, model_args)
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
        return self.for_inference(model), processor

    def save_merged_16bit(self, model, processor, out_dir: str | Path) -> Path:
        """Unsloth's merged 16-bit export (LoRA folded into dequantized weights); plain transformers reloads it."""
        out_dir = Path(out_dir)
        model.save_pretrained_merged(str(out_dir), processor, save_method="merged_16bit")
        return out_dir
