"""The unsloth backend on a CUDA GPU, on tiny real-architecture models of each family.

Run on a GPU machine with unsloth installed:   python -m pytest tests/test_gpu.py -m gpu -v
Everything here is skipped where CUDA or unsloth is missing (CI, laptops).

Tiny models come from `unsloth_med.models.tiny.tiny_model_path(family)` for every listed family; a
factory error fails the test (it is never turned into a skip). Images are generated (two visually
distinct classes), so no dataset is needed.
"""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
HAS_UNSLOTH = importlib.util.find_spec("unsloth") is not None

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU"),
    pytest.mark.skipif(not HAS_UNSLOTH, reason="needs unsloth (pip install 'unsloth-med[gpu]')"),
]

if CUDA and HAS_UNSLOTH:  # unsloth patches transformers/trl/peft: import it before they are used
    if os.environ.get("PYTEST_XDIST_WORKER"):  # parallel workers must not share unsloth's compiled-module folder
        base = os.environ.get("UNSLOTH_COMPILE_LOCATION", "unsloth_compiled_cache")
        os.environ["UNSLOTH_COMPILE_LOCATION"] = f"{base}-{os.environ['PYTEST_XDIST_WORKER']}"
    from unsloth_med.backends.unsloth import import_unsloth

    import_unsloth()

from unsloth_med.config import LoraArgs, ModelArgs  # noqa: E402
from unsloth_med.data.prepare import prepare_images  # noqa: E402
from unsloth_med.models import prompting  # noqa: E402
from unsloth_med.models.families import family_of, image_fit, module_kind  # noqa: E402
from unsloth_med.recipes.base import DataSource, Recipe  # noqa: E402


def _grouped(*families):
    """Family parameters grouped by family, so `pytest -n 4 --dist loadgroup` trains each family once (pytest < 9.2:
    under 9.2, xdist 3.8 no longer sees the marks; then use --dist loadfile)."""
    return [pytest.param(f, marks=pytest.mark.xdist_group(f)) for f in families]


FAMILIES = _grouped("mistral3", "mllama", "qwen2_5_vl", "gemma3")
TINY_FAMILIES = FAMILIES  # every listed family has a tiny builder (models/tiny.py)
LABELS = ("fractured", "not fractured")
RECIPE = Recipe(
    name="gpu_test",
    task="classification",
    instruction="Is there a bone fracture in this X-ray? Answer fractured or not fractured.",
    source=DataSource(kind="class_folders"),
    default_model="",
    labels=LABELS,
    image_size=64,
)
IMAGE_SIZE = 64
STEPS = 20

# (vision, language, attention, mlp): each flag off in turn (all on: the trained model, below)
FLAG_CASES = {
    "no_vision": (False, True, True, True),
    "no_language": (True, False, True, True),
    "no_attention": (True, True, False, True),
    "no_mlp": (True, True, True, False),
}


# ----------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="session")
def tiny_model():
    """family -> the tiny model's folder. A factory error is a test failure, never a skip."""
    from unsloth_med.models.tiny import tiny_model_path

    return lambda family: Path(tiny_model_path(family))


def _backend():
    from unsloth_med.backends.unsloth import UnslothBackend

    return UnslothBackend()


def _lora(vision=True, language=True, attention=True, mlp=True, r=16) -> LoraArgs:
    return LoraArgs(lora_r=r, lora_alpha=r, finetune_vision_layers=vision, finetune_language_layers=language,
                    finetune_attention_modules=attention, finetune_mlp_modules=mlp)


def _strip(name: str) -> str:
    return re.sub(r"^(base_model\.model\.)", "", name)


def _lora_module_names(model) -> set[str]:
    return {_strip(name) for name, module in model.named_modules()
            if hasattr(module, "lora_A") and len(getattr(module, "lora_A", {})) > 0}


# Every linear layer of each tiny model, listed by hand from the architectures (N: a layer number), with the
# LoRA flags that select it: written down independently of the package's rule (families.module_kind and
# is_vision_module), which the tests below check against this list. lm_head is never adapted.
_LAYER = r"\.\d+\."
LINEARS = {
    "mistral3": {
        ("vision", "attention"): [r"model\.vision_tower\.transformer\.layers" + _LAYER + r"attention\.[qkvo]_proj"],
        ("vision", "mlp"): [r"model\.vision_tower\.transformer\.layers" + _LAYER + r"feed_forward\.(gate|up|down)_proj",
                            r"model\.multi_modal_projector\.(linear_1|linear_2|patch_merger\.merging_layer)"],
        ("language", "attention"): [r"model\.language_model\.layers" + _LAYER + r"self_attn\.[qkvo]_proj"],
        ("language", "mlp"): [r"model\.language_model\.layers" + _LAYER + r"mlp\.(gate|up|down)_proj"],
    },
    "mllama": {
        ("vision", "attention"): [r"model\.vision_model\.(global_)?transformer\.layers" + _LAYER
                                  + r"self_attn\.[qkvo]_proj"],
        ("vision", "mlp"): [r"model\.vision_model\.(global_)?transformer\.layers" + _LAYER + r"mlp\.fc[12]",
                            r"model\.multi_modal_projector"],
        ("language", "attention"): [r"model\.language_model\.layers" + _LAYER + r"(self|cross)_attn\.[qkvo]_proj"],
        ("language", "mlp"): [r"model\.language_model\.layers" + _LAYER + r"mlp\.(gate|up|down)_proj"],
    },
    "qwen2_5_vl": {
        ("vision", "attention"): [r"model\.visual\.blocks" + _LAYER + r"attn\.(qkv|proj)"],
        ("vision", "mlp"): [r"model\.visual\.blocks" + _LAYER + r"mlp\.(gate|up|down)_proj",
                            r"model\.visual\.merger\.mlp\.[02]"],
        ("language", "attention"): [r"model\.language_model\.layers" + _LAYER + r"self_attn\.[qkvo]_proj"],
        ("language", "mlp"): [r"model\.language_model\.layers" + _LAYER + r"mlp\.(gate|up|down)_proj"],
    },
    "gemma3": {
        ("vision", "attention"): [r"model\.vision_tower\.encoder\.layers" + _LAYER
                                  + r"self_attn\.([qkv]_proj|out_proj)"],
        ("vision", "mlp"): [r"model\.vision_tower\.encoder\.layers" + _LAYER + r"mlp\.fc[12]"],
        ("language", "attention"): [r"model\.language_model\.layers" + _LAYER + r"self_attn\.[qkvo]_proj"],
        ("language", "mlp"): [r"model\.language_model\.layers" + _LAYER + r"mlp\.(gate|up|down)_proj"],
    },
}


def _linear_names(model) -> set[str]:
    names = set()
    for name, module in model.named_modules():
        name = _strip(name)
        if isinstance(module, torch.nn.Linear) and ".lora_" not in name and not name.endswith("lm_head"):
            names.add(name[: -len(".base_layer")] if name.endswith(".base_layer") else name)
    return names


def _listed(family: str, side: str, kind: str, names: set[str]) -> set[str]:
    return {n for n in names if any(re.fullmatch(p, n) for p in LINEARS[family][(side, kind)])}


def _expected_targets(model, family: str, lora) -> set[str]:
    """The linear layers the flags select, from the hand-written list (which must cover every linear layer)."""
    names = _linear_names(model)
    groups = {(side, kind): _listed(family, side, kind, names)
              for side in ("vision", "language") for kind in ("attention", "mlp")}
    unlisted = names - set().union(*groups.values())
    assert not unlisted, f"linear layers missing from LINEARS[{family!r}]: {sorted(unlisted)[:5]}"
    wanted = {"vision": lora.finetune_vision_layers, "language": lora.finetune_language_layers,
              "attention": lora.finetune_attention_modules, "mlp": lora.finetune_mlp_modules}
    return set().union(*(group for (side, kind), group in groups.items() if wanted[side] and wanted[kind]))


def _make_rows(tmp: Path, n: int = 8) -> list[dict]:
    """Two classes a model can tell apart: a bright diagonal band ('fractured') or a plain dark gradient."""
    import numpy as np
    from PIL import Image

    tmp.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        label = LABELS[i % 2]
        y, x = np.mgrid[0:96, 0:128]
        arr = (40 + 60 * x / 128 + 10 * (i % 3)).astype(np.float32)
        if label == "fractured":
            arr[np.abs(y - 0.75 * x) < 6] = 250
        img = Image.fromarray(np.clip(arr, 0, 255).astype("uint8"), "L").convert("RGB")
        path = tmp / f"img{i}.png"
        img.save(path)
        rows.append({"image": str(path), "target": label, "id": f"row{i}"})
    return rows


def _training_args(out: Path, steps: int = STEPS):
    """The package's training defaults (config.TRAINING_DEFAULTS + device defaults) with a short, fast run.

    Built directly (unsloth's own SFTConfig, as patched in at import) with a short, fast run's settings; the
    command-line parser after that import is tested below (test_the_command_line_parses_after_unsloth_patched_trl).
    """
    from trl import SFTConfig

    from unsloth_med.config import TRAINING_DEFAULTS, device_defaults

    return SFTConfig(**{**TRAINING_DEFAULTS, **device_defaults(), "output_dir": str(out), "max_steps": steps,
                        "learning_rate": 1e-2, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
                        "warmup_steps": 0, "save_strategy": "no", "logging_steps": 1, "lr_scheduler_type": "constant",
                        "weight_decay": 0.0})


def _prompt_batch(processor, rows, *, with_answer: bool):
    from unsloth_med.data.images import load_image

    images = [load_image(r["image"], IMAGE_SIZE) for r in rows]
    if with_answer:
        texts = [prompting.render(processor, RECIPE.to_conversation(r)) for r in rows]
    else:
        texts = [prompting.render(processor, RECIPE.prompt(), add_generation_prompt=True) for _ in rows]
    batch = prompting.encode(processor, texts, images, padding_side="left" if not with_answer else "right")
    return {k: (v.to("cuda", torch.bfloat16) if v.is_floating_point() else v.to("cuda")) for k, v in batch.items()}


def _generate(model, processor, rows):
    batch = _prompt_batch(processor, rows, with_answer=False)
    tokenizer = processor.tokenizer
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = out[:, batch["input_ids"].shape[1]:]
    return new, [tokenizer.decode(t, skip_special_tokens=True).strip() for t in new]


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits.float()


# ----------------------------------------------------------------------------- train, generate, save
@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """family -> {backend, model, processor, rows, losses, work, base}: 20 SFT steps through the package's trainer."""
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family in cache:
            return cache[family]
        import datasets

        from unsloth_med.train import build_trainer

        work = tmp_path_factory.mktemp(f"trained-{family}")
        rows = _make_rows(work / "images")
        backend = _backend()
        model, processor = backend.load(str(tiny_model(family)), ModelArgs(load_in_4bit=True))
        model = backend.add_adapters(model, _lora(), ModelArgs(), seed=0)
        backend.for_training(model)
        # As the pipeline does: images prepared (sized once, with lengths for the GPU default of length
        # grouping), collated by dataloader worker processes.
        fit = image_fit(model.config, IMAGE_SIZE, buckets=True)
        train_set, _ = prepare_images(datasets.Dataset.from_list(rows), fit, work / "prepared")
        collator = backend.collator(model, processor, RECIPE, image_size=fit, max_seq_length=4096)
        args = _training_args(work / "run")
        assert args.dataloader_num_workers == 2 and args.train_sampling_strategy == "group_by_length"
        # Random order as in the loss thresholds' reference runs (lr 1e-2 on 8 images is order-sensitive);
        # length grouping runs in the memory-cap test below and in every pipeline run on the GPU.
        args.train_sampling_strategy = "random"
        trainer = build_trainer(model, processor, train_set, collator, args, work)
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        cache[family] = dict(backend=backend, model=trainer.model, processor=processor, rows=rows,
                             losses=losses, work=work, base=str(tiny_model(family)))
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_falls_over_20_steps(trained, family):
    losses = trained(family)["losses"]
    print(f"\n{family} losses: {[round(x, 3) for x in losses]}")
    assert len(losses) == STEPS and all(x == x and abs(x) < 1e4 for x in losses)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    # A tiny random model cannot get far below ~4.5 nats: its lm_head (not adapted) has rows of norm ~0.2,
    # which bounds the logit margin. The fall from ~7 (uniform over 1024 tokens) is what shows learning.
    assert last < 0.8 * first, (first, last)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_all_flags_on_adapt_every_attention_and_mlp_layer(trained, family):
    t = trained(family)
    model = t["model"]
    fam = family_of(model.config)
    got = _lora_module_names(model)
    expected = _expected_targets(model, family, _lora())
    counts = {}
    for name in got:
        key = ("vision" if fam.is_vision_module(name) else "language") + "-" + module_kind(name)
        counts[key] = counts.get(key, 0) + 1
    print(f"\n{family}/all: {len(got)} LoRA modules; {counts}")
    assert set(counts) == {"vision-attention", "vision-mlp", "language-attention", "language-mlp"}
    assert got == expected, (sorted(expected - got)[:5], sorted(got - expected)[:5])


def _first_answer_token(processor, row) -> int:
    """The token that starts the trained answer right after the prompt (prompt and full text share a prefix)."""
    prompt = prompting.render(processor, RECIPE.prompt(), add_generation_prompt=True)
    full = prompting.render(processor, RECIPE.to_conversation(row))
    assert full.startswith(prompt)
    tokenizer = processor.tokenizer
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids
    return full_ids[len(prompt_ids)]


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_after_training(trained, family):
    """Unsloth's inference path generates what the model's own forward pass ranks first, and training moved
    that next token toward the trained answers (compared with the same model with its adapter off)."""
    t = trained(family)
    model, processor, rows = t["model"], t["processor"], t["rows"][:2]
    t["backend"].for_inference(model)
    new, texts = _generate(model, processor, rows)
    raw = [processor.tokenizer.decode(ids) for ids in new]
    print(f"\n{family} generations: {texts} (with special tokens: {raw})")
    assert new.shape[0] == 2 and new.shape[1] >= 1
    prompt = _prompt_batch(processor, rows, with_answer=False)  # left-padded: the last position ends each prompt
    next_logits = _logits(model, prompt)[:, -1]
    top = next_logits.topk(2, dim=-1)
    for i in range(len(rows)):
        margin = (top.values[i, 0] - top.values[i, 1]).item()
        if margin > 0.05 * max(1.0, top.values[i, 0].abs().item()):  # a near-tie may flip in bf16 either way
            assert new[i, 0].item() == top.indices[i, 0].item(), (family, i, margin)
    with model.disable_adapter():
        base_logits = _logits(model, prompt)[:, -1]
    for i, row in enumerate(rows):
        answer = _first_answer_token(processor, row)
        tuned_lp = next_logits[i].log_softmax(-1)[answer].item()
        base_lp = base_logits[i].log_softmax(-1)[answer].item()
        print(f"{family} row {i}: log p(first answer token) base {base_lp:.3f} -> tuned {tuned_lp:.3f}")
        assert tuned_lp > base_lp + 0.5, (family, i, base_lp, tuned_lp)


@pytest.mark.parametrize("family", FAMILIES)
def test_default_label_scoring_on_the_inference_path_is_checked_and_ranks_as_the_cache_does(trained, family):
    """Evaluation's default label scoring on Unsloth's inference path. Mistral 3 packs every class's answer after
    the prompt (one forward, evaluate/packed.py) and must pass its check against full sequences: Unsloth's
    attention must honour the 4-D mask. The other families keep the cache. Both rank the classes alike."""
    from unsloth_med.evaluate.classify import evaluate_classification
    from unsloth_med.evaluate.packed import forget_check

    t = trained(family)
    model, processor, rows = t["backend"].for_inference(t["model"]), t["processor"], t["rows"]
    forget_check(model)  # the shared trained model may carry a check another test's pass made: check here
    default = evaluate_classification(model, processor, RECIPE, rows, batch_size=4, image_size=IMAGE_SIZE,
                                      progress=False)
    cached = evaluate_classification(model, processor, RECIPE, rows, batch_size=4, image_size=IMAGE_SIZE,
                                     progress=False, strategy="cache")
    scoring = default["input_pipeline"]["label_scoring"]
    print(f"\n{family} label scoring: {scoring}")
    assert scoring["strategy"] == ("packed" if family == "mistral3" else "cache"), scoring
    if family == "mistral3":
        assert scoring["agreed"] and scoring["mask_effect_nats"] > 0, scoring
    # Packed within `tolerance` of full sequences, the cache within `cached_difference`: so within both of each other.
    allowed = scoring.get("tolerance_nats", 0.0) + scoring.get("cached_difference_nats", 1e-6)
    for a, b in zip(default["predictions"], cached["predictions"]):
        ours, theirs = a["log_likelihoods"], b["log_likelihoods"]
        assert max(abs(ours[k] - theirs[k]) for k in ours) <= allowed, (a, b)


@pytest.mark.parametrize("family", FAMILIES)
def test_folded_adapters_score_and_generate_as_the_unfolded_ones_on_the_inference_path(trained, family):
    """evaluate()'s default on a trained 4-bit model: each LoRA adapter folded into its layer's dequantized weight
    (models/folding.py). On Unsloth's inference path the label scores match the unfolded adapters' within bf16
    rounding, generation (compiled) answers alike, and every layer runs its adapters again after."""
    from peft.tuners.lora import LoraLayer

    from unsloth_med.evaluate import evaluate

    t = trained(family)
    model, processor, rows = t["backend"].for_inference(t["model"]), t["processor"], t["rows"]
    adapted = [m for m in model.modules() if isinstance(m, LoraLayer)]
    kw = dict(batch_size=4, image_size=IMAGE_SIZE, progress=False)
    unfolded = evaluate(model, processor, RECIPE, rows, fold_adapters=False, eager=True, **kw)
    folded = evaluate(model, processor, RECIPE, rows, eager=True, **kw)
    print(f"\n{family} folded: {folded['folded_adapters']}, unfolded {unfolded['timing']}, folded {folded['timing']}")
    assert folded["folded_adapters"]["layers"] == len(adapted) > 0, folded["folded_adapters"]
    worst = max(abs(a["log_likelihoods"][k] - b["log_likelihoods"][k])
                for a, b in zip(folded["predictions"], unfolded["predictions"]) for k in a["log_likelihoods"])
    largest = max(abs(v) for p in unfolded["predictions"] for v in p["log_likelihoods"].values())
    print(f"{family}: folded vs unfolded label scores at most {worst:.4f} nats apart (largest score {largest:.2f})")
    assert worst <= 0.05 + 0.01 * largest, (worst, largest)
    generated = [evaluate(model, processor, RECIPE, rows, mode="generate", fold_adapters=fold, **kw)
                 for fold in (False, True)]
    answers = [[p["answer"] for p in g["predictions"]] for g in generated]
    print(f"{family} generated unfolded / folded: {answers}")
    assert generated[1]["folded_adapters"]["layers"] == len(adapted)
    assert sum(a == b for a, b in zip(*answers)) >= len(rows) - 1, answers  # a bf16 near-tie may flip one
    assert not any("forward" in layer.__dict__ for layer in adapted)


@pytest.mark.parametrize("family", FAMILIES)
def test_dequantized_generation_answers_as_the_4bit_model_on_the_inference_path(trained, family):
    """evaluate(dequantize=True) on a trained 4-bit model: the adapters folded and every other 4-bit layer (the
    vision tower's, the frozen ones) dequantized once for the pass. Generation (compiled) answers as with the 4-bit
    weights, the generated tokens are counted alike, and every layer's own forward is back after."""
    from unsloth_med.evaluate import evaluate

    t = trained(family)
    model, processor, rows = t["backend"].for_inference(t["model"]), t["processor"], t["rows"]
    kw = dict(mode="generate", batch_size=4, image_size=IMAGE_SIZE, progress=False)
    as_4bit = evaluate(model, processor, RECIPE, rows, dequantize=False, **kw)
    dequantized = evaluate(model, processor, RECIPE, rows, dequantize=True, **kw)
    record = dequantized["folded_adapters"]
    print(f"\n{family} dequantized: {record}; generated tokens/s 4-bit "
          f"{as_4bit['input_pipeline'].get('generated_tokens_per_second')}, dequantized "
          f"{dequantized['input_pipeline'].get('generated_tokens_per_second')}")
    from peft.tuners.lora import LoraLayer

    adapted = {id(m.get_base_layer()) for m in model.modules() if isinstance(m, LoraLayer)}
    plain_4bit = [m for m in model.modules()  # bitsandbytes' own layers: peft's LoRA wrapper shares the name
                  if type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("bitsandbytes")
                  and id(m) not in adapted]
    assert record["layers"] == len(adapted) > 0 and record["dequantized_layers"] == len(plain_4bit), record
    answers = [[p["answer"] for p in r["predictions"]] for r in (as_4bit, dequantized)]
    assert sum(a == b for a, b in zip(*answers)) >= len(rows) - 1, answers  # a bf16 near-tie may flip one
    assert not any("forward" in vars(m) for m in model.modules() if type(m).__name__ == "Linear4bit")


def test_packed_scoring_of_rows_with_two_images_agrees_with_full_sequences(trained):
    """Mistral 3 rows of two images each on Unsloth's inference path. Such a batch cannot be cut by row, so the packed
    check scores it whole and compares the rows its full-sequence reference covers (a shape error here stopped
    evaluation until 7e5884d; found and tested on CPU). Every packed score lies within the check's tolerance of the
    full-sequence definition."""
    from unsloth_med.evaluate.classify import evaluate_classification, score_rows
    from unsloth_med.evaluate.packed import forget_check

    t = trained("mistral3")
    model, processor = t["backend"].for_inference(t["model"]), t["processor"]
    forget_check(model)  # check these two-image rows, not reuse a check made on one-image rows
    rows = [dict(row, more_images=[other["image"]]) for row, other in zip(t["rows"][:4], t["rows"][4:8])]
    result = evaluate_classification(model, processor, RECIPE, rows, batch_size=4, image_size=IMAGE_SIZE,
                                     progress=False)
    scoring = result["input_pipeline"]["label_scoring"]
    print(f"\nmistral3, two images a row: {scoring}")
    assert scoring["strategy"] == "packed" and scoring["agreed"] and scoring["checked_rows"] == 2, scoring
    full = score_rows(model, processor, RECIPE, rows, LABELS, image_size=IMAGE_SIZE, strategy="full")
    for prediction, scores in zip(result["predictions"], full):
        for label, score in zip(LABELS, scores.tolist()):
            assert abs(prediction["log_likelihoods"][label] - score) <= scoring["tolerance_nats"], (prediction, score)


def test_the_command_line_parses_after_unsloth_patched_trl(tmp_path):
    """`unsloth-med train` imports unsloth before parsing (cli/train.py). After the real import, whose SFTConfig has
    its own max_seq_length, the parser still takes TRL's class, and --max_seq_length belongs to the model section."""
    import trl

    from unsloth_med.config import parse_config, trl_sft_config
    from unsloth_med.recipes import get_recipe

    assert "unsloth" in __import__("sys").modules and trl.SFTConfig is not trl_sft_config()
    config = parse_config(["--output_dir", str(tmp_path), "--max_seq_length", "1024"], get_recipe("bone_fracture"))
    assert config.model.max_seq_length == 1024 and type(config.training) is trl_sft_config()


@pytest.mark.parametrize("family", FAMILIES)
def test_unsloth_collator_labels_only_the_answer(tiny_model, family, tmp_path):
    """Real labels from UnslothVisionDataCollator (through the backend's collator): everything up to and
    including the family's response marker is masked, image tokens are masked, and what is left is the
    answer (then the end-of-turn tokens), equal to the input ids there."""
    backend = _backend()
    model, processor = backend.load(str(tiny_model(family)), ModelArgs(load_in_4bit=True))
    model = backend.add_adapters(model, _lora(), ModelArgs(), seed=0)
    fam = family_of(model.config)
    rows = _make_rows(tmp_path / "images", n=2)
    collator = backend.collator(model, processor, RECIPE, image_size=image_fit(model.config, IMAGE_SIZE, buckets=True),
                                max_seq_length=4096)
    batch = collator(rows)
    tokenizer = processor.tokenizer
    marker = tokenizer(fam.response_part, add_special_tokens=False)["input_ids"]
    image_ids = {getattr(model.config, key, None) for key in ("image_token_index", "image_token_id")} - {None}
    for i, row in enumerate(rows):
        ids, labels, mask = batch["input_ids"][i], batch["labels"][i], batch["attention_mask"][i].bool()
        kept = (labels != -100).nonzero().flatten()
        assert len(kept) > 0, f"{family} row {i}: every label is masked"
        assert torch.equal(labels[kept], ids[kept]) and bool(mask[kept].all())
        ends = [j + len(marker) for j in range(len(ids) - len(marker) + 1)
                if ids[j: j + len(marker)].tolist() == marker]
        assert ends, f"{family}: the response marker {fam.response_part!r} is not in the input ids"
        assert kept.min().item() >= ends[0], (family, i, kept.min().item(), ends[0])
        assert not any(ids[j].item() in image_ids for j in kept.tolist())
        answer = tokenizer.decode(labels[kept], skip_special_tokens=True).strip()
        print(f"\n{family} row {i}: {len(kept)} of {int(mask.sum())} tokens labelled: {answer!r}")
        assert answer == row["target"]


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_saves_and_reloads(trained, family):
    t = trained(family)
    backend, model, processor, rows, work = t["backend"], t["model"], t["processor"], t["rows"], t["work"]
    backend.for_inference(model)
    adapter = work / "adapter"
    model.save_pretrained(adapter)
    processor.save_pretrained(adapter)
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    batch = _prompt_batch(processor, rows[:2], with_answer=True)
    before = _logits(model, batch)
    reloaded, _ = backend.load_adapter(t["base"], adapter, ModelArgs(load_in_4bit=True))
    after = _logits(reloaded, batch)
    diff = (before - after).abs().max().item()
    tolerance = 0.05 * max(1.0, before.abs().max().item())
    # A random tiny model has positions whose two best tokens are nearly tied; 4-bit noise may swap those, and
    # only those. Every position decided by more than twice the tolerance must keep its argmax.
    top2 = before.topk(2, dim=-1).values
    decided = (top2[..., 0] - top2[..., 1]) > 2 * tolerance
    same = (before.argmax(-1) == after.argmax(-1))[decided]
    print(f"\n{family} adapter reload: max |logit diff| = {diff:.4g}, argmax kept at {int(same.sum())} of "
          f"{int(decided.sum())} decided positions ({decided.numel()} in all)")
    assert decided.any() and bool(same.all()) and diff < tolerance
    del reloaded
    torch.cuda.empty_cache()


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_16bit_export_reloads_with_plain_transformers(trained, family):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    t = trained(family)
    backend, model, processor, rows, work = t["backend"], t["model"], t["processor"], t["rows"], t["work"]
    backend.for_inference(model)
    batch = _prompt_batch(processor, rows[:2], with_answer=True)
    in_memory = _logits(model, batch)
    tokens_in_memory, _ = _generate(model, processor, rows[:2])
    merged = backend.save_merged_16bit(model, processor, work / "merged")
    plain = AutoModelForImageTextToText.from_pretrained(merged, dtype=torch.bfloat16).to("cuda").eval()
    assert not [n for n, m in plain.named_modules() if "4bit" in type(m).__name__]
    reprocessor = AutoProcessor.from_pretrained(merged)
    rebatch = _prompt_batch(prompting.prepare_processor(reprocessor, family_of(plain.config)), rows[:2],
                            with_answer=True)
    assert torch.equal(rebatch["input_ids"], batch["input_ids"])
    reloaded = _logits(plain, batch)
    mask = batch["attention_mask"].bool()
    diff = (in_memory - reloaded).abs()[mask].max().item()
    scale = in_memory[mask].abs().max().item()
    agree = (in_memory.argmax(-1) == reloaded.argmax(-1))[mask].float().mean().item()
    tokens_plain, _ = _generate(plain, reprocessor, rows[:2])
    same_greedy = torch.equal(tokens_in_memory, tokens_plain)
    print(f"\n{family} merged 16-bit: max |logit diff| = {diff:.4g} (max |logit| {scale:.3g}), "
          f"argmax agreement = {agree:.3f}, same greedy generation = {same_greedy}")
    # The merged weights are dequantized NF4 + LoRA rounded once to bf16, the in-memory model adds the
    # LoRA path in higher precision: logits differ by a few tenths on these tiny random models
    # (seen: 0.12-0.43 with max |logit| ~2.7), while the greedy predictions agree.
    assert agree >= 0.95 and diff < 0.25 * max(1.0, scale)
    assert same_greedy, (tokens_in_memory.tolist(), tokens_plain.tolist())
    del plain
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- load
@pytest.mark.parametrize("family", FAMILIES)
def test_4bit_load_quantizes_the_language_model(tiny_model, family):
    model, processor = _backend().load(str(tiny_model(family)), ModelArgs(load_in_4bit=True))
    fam = family_of(model.config)
    assert fam.name == family
    four_bit = {n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"}
    language_linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                        and module_kind(n) is not None and not fam.is_vision_module(n) and "lm_head" not in n}
    print(f"\n{family}: {len(four_bit)} Linear4bit modules; language attention/MLP linears: {len(language_linears)}")
    assert len(four_bit) > 0
    assert language_linears <= four_bit, sorted(language_linears - four_bit)[:5]
    assert not any("lm_head" in n for n in four_bit)
    assert processor.chat_template == fam.chat_template or fam.use_own_template


def test_16bit_load_has_no_4bit_layers(tiny_model):
    model, _ = _backend().load(str(tiny_model("mistral3")), ModelArgs(load_in_4bit=False))
    assert not [n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"]
    assert next(model.parameters()).dtype in (torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------- LoRA placement
@pytest.mark.parametrize("case", list(FLAG_CASES))
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_finetune_flags_put_lora_exactly_where_they_say(tiny_model, family, case):
    vision, language, attention, mlp = FLAG_CASES[case]
    backend = _backend()
    model, _ = backend.load(str(tiny_model(family)), ModelArgs(load_in_4bit=True))
    fam = family_of(model.config)
    lora = _lora(vision, language, attention, mlp)
    expected = _expected_targets(model, family, lora)
    model = backend.add_adapters(model, lora, ModelArgs(), seed=0)
    got = _lora_module_names(model)
    counts = {(side, kind): 0 for side in ("vision", "language") for kind in ("attention", "mlp")}
    for name in got:
        counts[("vision" if fam.is_vision_module(name) else "language", module_kind(name))] += 1
    print(f"\n{family}/{case}: {len(got)} LoRA modules; " + ", ".join(f"{s}-{k}={c}" for (s, k), c in counts.items()))
    assert got == expected, (sorted(got - expected)[:5], sorted(expected - got)[:5])
    for (side, kind), count in counts.items():
        wanted = (vision if side == "vision" else language) and (attention if kind == "attention" else mlp)
        assert (count > 0) == wanted, (side, kind, count)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable), [n for n in trainable if "lora_" not in n][:5]


def test_no_layer_selected_is_a_clear_error(tiny_model):
    from unsloth_med.errors import BackendError

    backend = _backend()
    model, _ = backend.load(str(tiny_model("mistral3")), ModelArgs(load_in_4bit=True))
    with pytest.raises(BackendError, match="finetune"):
        backend.add_adapters(model, _lora(attention=False, mlp=False), ModelArgs(), seed=0)


def test_memory_cap_keeps_the_effective_batch_and_refuses_an_impossible_cap(tiny_model, tmp_path):
    """--max_memory_gib: the largest micro-batch dividing the effective batch; the rest is accumulation."""
    import datasets

    from unsloth_med.errors import BackendError
    from unsloth_med.train import build_trainer, fit_micro_batch

    backend = _backend()
    model, processor = backend.load(str(tiny_model("mistral3")), ModelArgs(load_in_4bit=True))
    model = backend.add_adapters(model, _lora(), ModelArgs(), seed=0)
    backend.for_training(model)
    fit = image_fit(model.config, IMAGE_SIZE, buckets=True)
    rows = _make_rows(tmp_path / "images", n=128)
    train_set, _ = prepare_images(datasets.Dataset.from_list(rows), fit, tmp_path / "prep")
    collator = backend.collator(model, processor, RECIPE, image_size=fit, max_seq_length=4096)
    effective = 128  # large enough that the full batch's activations are well above allocator granularity
    args = _training_args(tmp_path / "run", steps=2)
    args.per_device_train_batch_size, args.gradient_accumulation_steps = effective, 1
    trainer = build_trainer(model, processor, train_set, collator, args, tmp_path)
    try:
        roomy = fit_micro_batch(trainer, train_set, max_memory_gib=40)
        assert roomy["micro_batch"] == effective and roomy["gradient_accumulation_steps"] == 1
        # probe steps train nothing: TRL's token count and token metrics do not count them
        assert trainer._total_train_tokens == 0 and not any(trainer._metrics["train"].values())
        # A cap half way from what is in use now to the full batch's peak: the full micro-batch cannot fit,
        # so the accumulation path must run (smaller micro-batch, same effective batch).
        in_use = torch.cuda.memory_allocated() / 2**30
        cap = in_use + (roomy["probe_peak_allocated_gib"] - in_use) / 2
        args.per_device_train_batch_size, args.gradient_accumulation_steps = effective, 1
        capped = fit_micro_batch(trainer, train_set, max_memory_gib=cap)
        print(f"\nmemory fit: roomy {roomy}\ncapped at {cap:.4f} GiB: {capped}")
        assert capped["micro_batch"] < effective and capped["gradient_accumulation_steps"] > 1
        assert capped["micro_batch"] * capped["gradient_accumulation_steps"] == effective
        assert args.per_device_train_batch_size == capped["micro_batch"]
        assert args.gradient_accumulation_steps == capped["gradient_accumulation_steps"]
        assert capped["probe_peak_allocated_gib"] <= cap
        trainer.train()  # trains under the cap with what was chosen: micro-batches plus accumulation
        assert trainer.state.global_step == 2
        used = torch.cuda.memory_allocated() / 2**30
        with pytest.raises(BackendError, match="max_memory_gib"):
            fit_micro_batch(trainer, train_set, max_memory_gib=max(0.01, used * 0.5))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


def test_training_without_gradient_checkpointing_runs(tiny_model, tmp_path):
    """--use_gradient_checkpointing false: Unsloth's for_training must not switch checkpointing back on in layers
    that have no checkpoint function (it did: AttributeError '_gradient_checkpointing_func' at the first step)."""
    import datasets

    from unsloth_med.train import build_trainer

    backend = _backend()
    model, processor = backend.load(str(tiny_model("mistral3")),
                                    ModelArgs(load_in_4bit=True, use_gradient_checkpointing="false"))
    model = backend.add_adapters(model, _lora(), ModelArgs(use_gradient_checkpointing="false"), seed=0)
    backend.for_training(model)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    fit = image_fit(model.config, IMAGE_SIZE, buckets=True)
    train_set, _ = prepare_images(datasets.Dataset.from_list(_make_rows(tmp_path / "images")), fit, tmp_path / "p")
    collator = backend.collator(model, processor, RECIPE, image_size=fit, max_seq_length=4096)
    trainer = build_trainer(model, processor, train_set, collator, _training_args(tmp_path / "run", steps=2), tmp_path)
    trainer.train()
    assert trainer.state.global_step == 2


def test_warm_up_at_train_start_runs_every_batch_kind_and_leaves_training_unchanged(tiny_model, tmp_path):
    """The pipeline's shape warm-up runs inside Trainer.train, after Unsloth's reset of graphs compiled before
    train(): one forward + backward per kind of micro-batch, no optimizer step. Losses match a run without it."""
    import datasets

    from unsloth_med.train import build_trainer, warm_up_when_training_starts

    losses, warmed = {}, None
    rows = _make_rows(tmp_path / "images", n=10)
    for warm in (False, True):
        backend = _backend()
        model, processor = backend.load(str(tiny_model("mistral3")), ModelArgs(load_in_4bit=True))
        model = backend.add_adapters(model, _lora(), ModelArgs(), seed=0)
        backend.for_training(model)
        fit = image_fit(model.config, IMAGE_SIZE, buckets=True)
        train_set, _ = prepare_images(datasets.Dataset.from_list(rows), fit, tmp_path / f"prep-{warm}")
        collator = backend.collator(model, processor, RECIPE, image_size=fit, max_seq_length=4096)
        args = _training_args(tmp_path / f"run-{warm}", steps=5)
        args.learning_rate = 1e-3
        trainer = build_trainer(model, processor, train_set, collator, args, tmp_path / f"run-{warm}")
        backend.for_training(trainer.model)
        if warm:
            warmed = warm_up_when_training_starts(trainer, train_set)
        trainer.train()
        losses[warm] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"\nlosses without warm-up {losses[False]}\nlosses with warm-up    {losses[True]}\nwarm-up {warmed.result}")
    assert warmed.result["batch_kinds"] == 2 and warmed.result["last_batch"] == 2  # 10 images: 4, 4, then 2
    assert all(torch.isfinite(torch.tensor(losses[True])))
    assert losses[True] == pytest.approx(losses[False], rel=2e-2)
