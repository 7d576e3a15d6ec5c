"""Evaluation: metric code on hand-made answers, label scoring against naive scoring, generation mode,
caption metrics, and predict() on a run folder and a merged folder, with tiny real-architecture models."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import yaml
from conftest import require
from PIL import Image

from unsloth_med.backends.hf import HFBackend, VisionCollator
from unsloth_med.config import ModelArgs
from unsloth_med.evaluate import agreement, caption_metrics, classification_metrics, evaluate, match_label
from unsloth_med.evaluate.classify import label_token_ids, score_rows
from unsloth_med.models import prompting
from unsloth_med.models.families import family_of
from unsloth_med.predict import format_predictions, predict
from unsloth_med.recipes.bone_fracture import RECIPE
from unsloth_med.recipes.radiology_caption import RECIPE as CAPTION_RECIPE

IMAGE_SIZE = 64
ANSWER = "Oblique fracture"


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    """Noise images of different shapes, so prompts differ in length and batches need padding."""
    rng = np.random.default_rng(seed)
    shapes = [(64, 64), (40, 64), (64, 24), (50, 50), (30, 60), (64, 48)]
    return [Image.fromarray(rng.integers(0, 256, (*shapes[i % len(shapes)], 3), dtype=np.uint8)) for i in range(n)]


def _rows(n: int, seed: int = 0) -> list[dict]:
    return [{"image": im, "target": RECIPE.labels[i % len(RECIPE.labels)], "id": f"img{i}"}
            for i, im in enumerate(_images(n, seed))]


def _load(tiny_path, family):
    model, processor = HFBackend().load(str(tiny_path(family)), ModelArgs())  # fp32 on the CPU
    if family == "mllama":
        # Llama 3.2 Vision's cross-attention gates start at 0 (tanh(0) = 0: the image is ignored); open them
        # so the image, and the cross-attention mask of the scored tokens, matter in these tests.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                    param.fill_(1.0)
    return model.eval(), processor


# ----------------------------------------------------------------------------- metrics on known answers
def test_classification_metrics_known_answers():
    labels = ["a", "b", "c"]
    y_true = ["a", "a", "b", "b", "c", "c"]
    y_pred = ["a", "b", "b", "b", None, "c"]  # None: an unparseable answer
    m = classification_metrics(y_true, y_pred, labels, mode="generate")
    assert m["n"] == 6 and m["labels"] == labels
    assert m["accuracy"] == pytest.approx(4 / 6)
    # a: P=1, R=1/2, F1=2/3; b: P=2/3, R=1, F1=4/5; c: P=1, R=1/2, F1=2/3
    assert m["per_class"]["a"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert m["per_class"]["b"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert m["per_class"]["c"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 2 / 3) / 3)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [0, 0, 1]]  # rows true, labels order
    assert m["unparseable"] == 1 and m["unparseable_by_class"] == {"a": 0, "b": 0, "c": 1}
    json.dumps(m)  # plain JSON types only

    perfect = classification_metrics(["b", "a"], ["b", "a"], labels)
    assert perfect["accuracy"] == 1.0 and "unparseable" not in perfect
    assert perfect["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_match_label_exact_then_case_and_whitespace_insensitive():
    labels = RECIPE.labels
    assert match_label("Spiral Fracture", labels) == "Spiral Fracture"
    assert match_label("  spiral   FRACTURE \n", labels) == "Spiral Fracture"
    assert match_label("Spiral Fracture.", labels) is None
    assert match_label("It is a spiral fracture", labels) is None
    assert match_label("", labels) is None


def test_agreement_by_id_and_by_position():
    a = [{"id": "1", "prediction": "x"}, {"id": "2", "prediction": "y"}, {"id": "3", "prediction": None}]
    b = [{"id": "3", "prediction": None}, {"id": "2", "prediction": "y"}, {"id": "1", "prediction": "z"}]
    assert agreement(a, b) == pytest.approx(1 / 3)  # an unparseable answer never agrees
    assert agreement({"predictions": a},
                     {"predictions": a[:2] + [{"id": "3", "prediction": "w"}]}) == pytest.approx(2 / 3)
    assert agreement(["x", "y"], ["x", "y"]) == 1.0
    with pytest.raises(ValueError):
        agreement(["x"], ["x", "y"])


def test_caption_metrics_on_hand_made_strings():
    refs = ["the cat sat on the mat", "a fracture of the distal radius"]
    same = caption_metrics(refs, refs)
    assert same["bleu"] == pytest.approx(100.0) and same["rougeL"] == pytest.approx(1.0) and same["n"] == 2
    disjoint = caption_metrics(["zebra", "quantum"], refs)
    assert disjoint["bleu"] == pytest.approx(0.0) and disjoint["rougeL"] == pytest.approx(0.0)
    # LCS("the cat on the mat", "the cat sat on the mat") = 5 tokens: P = 5/5, R = 5/6, F = 10/11
    partial = caption_metrics(["the cat on the mat"], refs[:1])
    assert partial["rougeL"] == pytest.approx(10 / 11)
    assert 0 < partial["bleu"] < 100
    assert set(partial) == {"n", "bleu", "rougeL"}  # no metric that is claimed but never computed


# ----------------------------------------------------------------------------- label scoring
def _naive_scores(model, processor, image, labels) -> list[float]:
    """One unpadded full sequence per class, summed log-probs of the answer tokens (the loss's tokens)."""
    family = family_of(model.config)
    out = []
    for label in labels:
        text = prompting.render(processor, RECIPE.to_conversation({"target": label}))
        batch = prompting.encode(processor, [text], [image])
        with torch.no_grad():
            logp = model(**batch).logits[0].double().log_softmax(-1)
        ids = batch["input_ids"][0].tolist()
        start, end = prompting.answer_span(ids, len(ids), prompting.answer_ids(processor, family, label),
                                           prompting.trailing_ids(processor, family, text))
        out.append(sum(float(logp[i - 1, ids[i]]) for i in range(start, end)))
    return out


@pytest.mark.parametrize("family", ["mistral3", "mllama", "qwen2_5_vl"])
def test_label_scoring_equals_naive_full_sequence_scoring(tiny_path, family):
    from unsloth_med.data.images import load_image

    model, processor = _load(tiny_path, family)
    rows = _rows(5)
    batch = prompting.encode(processor, [prompting.render(processor, RECIPE.prompt())] * 5,
                             [load_image(r["image"], IMAGE_SIZE) for r in rows], padding_side="left")
    if family != "mllama":  # mllama has one image token whatever the image: its prompts need no padding
        assert (batch["attention_mask"] == 0).any(), "the test images should give prompts of different lengths"
    cached = score_rows(model, processor, RECIPE, rows, RECIPE.labels, image_size=IMAGE_SIZE)
    full = score_rows(model, processor, RECIPE, rows, RECIPE.labels, image_size=IMAGE_SIZE, strategy="full")
    naive = torch.tensor([_naive_scores(model, processor, load_image(r["image"], IMAGE_SIZE), RECIPE.labels)
                          for r in rows], dtype=torch.float64)
    assert cached.shape == (5, len(RECIPE.labels))
    assert torch.allclose(cached, naive, atol=1e-4, rtol=0), (cached - naive).abs().max()
    assert torch.allclose(full, naive, atol=1e-4, rtol=0), (full - naive).abs().max()
    assert not torch.allclose(naive[0], naive[1], atol=1e-3), "scores should depend on the image"

    result = evaluate(model, processor, RECIPE, rows, mode="score", batch_size=2, image_size=IMAGE_SIZE, progress=False)
    assert [p["id"] for p in result["predictions"]] == [r["id"] for r in rows]
    for p, scores in zip(result["predictions"], naive):
        assert p["prediction"] == RECIPE.labels[int(scores.argmax())]
        assert math.isclose(sum(p["probabilities"].values()), 1.0, abs_tol=1e-4)
    m = result["metrics"]
    assert m["mode"] == "score" and m["n"] == 5 and "unparseable" not in m
    assert len(m["confusion_matrix"]) == len(RECIPE.labels) and sum(map(sum, m["confusion_matrix"])) == 5


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_label_scoring_equals_naive_scoring_in_one_forward(tiny_path, attention):
    """Every class's answer packed after the prompt, masked from the other classes: the same log-likelihoods as one
    full sequence per class, for left-padded prompts of different lengths, with either attention's mask form."""
    from unsloth_med.data.images import load_image
    from unsloth_med.evaluate.packed import can_pack

    model, processor = _load(tiny_path, "mistral3")
    model.set_attn_implementation(attention)
    assert can_pack(model, family_of(model.config))
    rows = _rows(5)
    packed = score_rows(model, processor, RECIPE, rows, RECIPE.labels, image_size=IMAGE_SIZE, strategy="packed")
    naive = torch.tensor([_naive_scores(model, processor, load_image(r["image"], IMAGE_SIZE), RECIPE.labels)
                          for r in rows], dtype=torch.float64)
    assert torch.allclose(packed, naive, atol=1e-4, rtol=0), (packed - naive).abs().max()
    assert max(len(ids) for ids in label_token_ids(processor, family_of(model.config), RECIPE.labels)) > 2, \
        "labels of one or two tokens would leave the class-to-class masking untested"


def test_the_check_cuts_rows_only_where_every_tensor_has_one_entry_per_row():
    from unsloth_med.evaluate.packed import first_rows

    one_image = {"input_ids": torch.ones(3, 5), "pixel_values": torch.ones(3, 3, 8, 8), "image_sizes": torch.ones(3, 2)}
    assert {k: tuple(v.shape) for k, v in first_rows(one_image, 2).items()} == {
        "input_ids": (2, 5), "pixel_values": (2, 3, 8, 8), "image_sizes": (2, 2)}
    two_images = {**one_image, "pixel_values": torch.ones(6, 3, 8, 8), "image_sizes": torch.ones(6, 2)}
    assert first_rows(two_images, 2) is two_images  # which image is whose is not known here: the whole batch


def test_label_scoring_starts_the_next_batch_before_reading_a_batch_s_scores(tiny_path):
    """A pass reads each batch's scores one batch late: when the first predictions come out, the second batch's
    forward is already queued (on a GPU it runs while the CPU builds the predictions and copies in the batch
    after). The predictions and their order are those of scoring one batch at a time."""
    from unsloth_med.evaluate.classify import _iter_scored
    from unsloth_med.evaluate.packed import remember_check

    model, processor = _load(tiny_path, "mistral3")
    rows = _rows(5)
    remember_check(model, family_of(model.config), {"checked_rows": 2, "agreed": True})  # no check's forwards
    forwards = []
    model.register_forward_hook(lambda module, args, output: forwards.append(1))
    with torch.inference_mode():
        scored = _iter_scored(model, processor, RECIPE, rows, RECIPE.labels, batch_size=2, image_size=IMAGE_SIZE,
                              progress=False, strategy="packed", stats=None)
        first = next(scored)
        assert first["id"] == "img0" and len(forwards) == 2  # batch 1 read while batch 2 is already queued
        rest = list(scored)
    assert [p["id"] for p in [first, *rest]] == [f"img{i}" for i in range(5)] and len(forwards) == 3
    one_at_a_time = score_rows(model, processor, RECIPE, rows, RECIPE.labels, image_size=IMAGE_SIZE)
    for prediction, expected in zip([first, *rest], one_at_a_time):
        assert prediction["prediction"] == RECIPE.labels[int(expected.argmax())]
        assert list(prediction["log_likelihoods"].values()) == pytest.approx(expected.tolist(), abs=1e-3)


@pytest.mark.parametrize("family", ["mllama", "qwen2_5_vl", "gemma3"])
def test_families_whose_positions_or_masks_are_derived_score_from_the_cache(tiny_path, family):
    model, processor = _load(tiny_path, family)
    result = evaluate(model, processor, RECIPE, _rows(3), mode="score", batch_size=3, image_size=IMAGE_SIZE,
                      progress=False)
    assert result["input_pipeline"]["label_scoring"] == {"strategy": "cache"}


def test_evaluation_checks_packed_scores_and_falls_back_when_the_mask_is_ignored(tiny_path, monkeypatch, caplog):
    """Evaluation compares the packed strategy with the cached one on its first rows. An attention path that
    ignored the class-to-class masking (simulated: a plain causal mask) is caught, and the cached scores are used."""
    from unsloth_med.evaluate import packed

    model, processor = _load(tiny_path, "mistral3")
    rows = _rows(4)
    cached = score_rows(model, processor, RECIPE, rows, RECIPE.labels, image_size=IMAGE_SIZE)

    good = evaluate(model, processor, RECIPE, rows, mode="score", batch_size=4, image_size=IMAGE_SIZE, progress=False)
    scoring = good["input_pipeline"]["label_scoring"]
    assert scoring["strategy"] == "packed" and scoring["agreed"] and scoring["checked_rows"] == 2
    assert scoring["max_difference_nats"] < 1e-4 < scoring["mask_effect_nats"]
    # Where the pass's time went: the check on its own, and each batch (one here; the check inside it).
    assert 0 < scoring["check_seconds"] <= good["input_pipeline"]["batch_seconds"][0]
    assert len(good["input_pipeline"]["batch_seconds"]) == good["input_pipeline"]["batches"] == 1

    separate_classes = packed.packed_mask

    def causal_only(prompt_mask, owners, dtype, attention):  # every continuation token sees every earlier one
        return separate_classes(prompt_mask, torch.zeros_like(owners), dtype, attention)

    # A check that passed is kept with the model it passed on (see the reuse test below): a fresh model checks again.
    model, processor = _load(tiny_path, "mistral3")
    monkeypatch.setattr(packed, "packed_mask", causal_only)
    with caplog.at_level("WARNING"):
        fallback = evaluate(model, processor, RECIPE, rows, mode="score", batch_size=4, image_size=IMAGE_SIZE,
                            progress=False)
    scoring = fallback["input_pipeline"]["label_scoring"]
    assert scoring["strategy"] == "cache" and not scoring["agreed"] and scoring["mask_effect_nats"] == 0.0
    assert "Scoring with the cached strategy" in caplog.text

    # A packed path that honours the mask but is off by more than the cached strategy's own distance from one
    # full sequence per class (simulated: the last class 1 nat too likely) is caught too.
    monkeypatch.setattr(packed, "packed_mask", separate_classes)
    exact = packed.score_packed

    def off_by_one_nat(*args, **kwargs):
        scores = exact(*args, **kwargs).clone()
        scores[:, -1] += 1.0
        return scores

    monkeypatch.setattr(packed, "score_packed", off_by_one_nat)
    off = evaluate(model, processor, RECIPE, rows, mode="score", batch_size=4, image_size=IMAGE_SIZE, progress=False)
    scoring = off["input_pipeline"]["label_scoring"]
    assert scoring["strategy"] == "cache" and not scoring["agreed"] and scoring["mask_effect_nats"] > 0
    assert scoring["max_difference_nats"] == pytest.approx(1.0, abs=1e-3) and scoring["tolerance_nats"] < 1.0
    assert scoring["cached_difference_nats"] < 1e-4 and scoring["reference"] == "one sequence per class"
    for prediction, scores in zip(fallback["predictions"], cached):
        assert prediction["prediction"] == RECIPE.labels[int(scores.argmax())]
        assert prediction["log_likelihoods"] == {label: round(float(s), 4) for label, s in zip(RECIPE.labels, scores)}


def test_a_later_pass_over_the_same_model_reuses_its_passed_check_until_the_attention_path_changes(tiny_path):
    """The run's two passes: the base model before training, then the same model with LoRA adapters (peft-wrapped,
    folded). The second pass reuses the packed check that passed on the first, with no forward for it, and scores
    exactly what checking again would have allowed; a new attention implementation checks again (a failed check is
    never kept: the fallback test above)."""
    model, processor = _load(tiny_path, "mistral3")
    rows = _rows(4)
    first = evaluate(model, processor, RECIPE, rows, batch_size=4, image_size=IMAGE_SIZE, progress=False)
    check = first["input_pipeline"]["label_scoring"]
    assert check["checked_rows"] == 2 and check["agreed"] and check["check_seconds"] > 0

    tuned = _lora(model)  # the pipeline adds adapters to the model it evaluated before training
    forwards = []
    hook = model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    after = evaluate(tuned, processor, RECIPE, rows, batch_size=4, image_size=IMAGE_SIZE, progress=False)
    hook.remove()
    scoring = after["input_pipeline"]["label_scoring"]
    assert after["folded_adapters"]["layers"] > 0
    assert scoring == {"strategy": "packed", "checked_rows": 0, "agreed": True, "check_seconds": 0.0,
                       "reused_check": {k: v for k, v in check.items() if k != "strategy"}}, scoring
    assert len(forwards) == 1, "the reused check ran forwards: only the batch's own packed forward should run"
    unfolded = evaluate(tuned, processor, RECIPE, rows, batch_size=4, image_size=IMAGE_SIZE, progress=False,
                        fold_adapters=False)
    full = score_rows(tuned, processor, RECIPE, rows, RECIPE.labels, image_size=IMAGE_SIZE, strategy="full")
    for prediction, scores in zip(after["predictions"], full):  # the reused check's verdict holds for the tuned model
        assert prediction["log_likelihoods"] == pytest.approx(
            {label: float(s) for label, s in zip(RECIPE.labels, scores)}, abs=1e-3)
    assert unfolded["input_pipeline"]["label_scoring"]["checked_rows"] == 0

    tuned.set_attn_implementation("eager")  # another attention path: its own check
    eager = evaluate(tuned, processor, RECIPE, rows, batch_size=4, image_size=IMAGE_SIZE, progress=False)
    assert eager["input_pipeline"]["label_scoring"]["checked_rows"] == 2
    assert "reused_check" not in eager["input_pipeline"]["label_scoring"]


def _xray_rows(bone_break_dir, n: int) -> list[dict]:
    """Rows as a prepared test split holds them: real X-ray files, by path."""
    files = sorted(bone_break_dir.rglob("*.jpg"))[:n]
    return [{"image": str(f), "target": RECIPE.labels[i % len(RECIPE.labels)], "id": f"x{i}"}
            for i, f in enumerate(files)]


def test_the_pass_after_training_reads_the_batches_the_pass_before_encoded(tiny_path, bone_break_dir):
    """A run's two passes over one split share an EncodedBatches: the second encodes nothing, reads every batch,
    and scores exactly what encoding again gives; no forward wrote into a kept tensor."""
    from unsloth_med.evaluate import EncodedBatches
    from unsloth_med.evaluate.inputs import encode_rows

    model, processor = _load(tiny_path, "mistral3")
    rows, store = _xray_rows(bone_break_dir, 6), EncodedBatches()
    before = evaluate(model, processor, RECIPE, rows, batch_size=4, image_size=IMAGE_SIZE, progress=False,
                      inputs=store)
    assert before["encoded_batches"]["reused"] == 0 and before["encoded_batches"]["encoded"] == 2
    assert len(store.kept) == 2 and store.kept_bytes > 0
    tuned = _lora(model)
    after = evaluate(tuned, processor, RECIPE, rows, batch_size=4, image_size=IMAGE_SIZE, progress=False,
                     inputs=store)
    assert after["encoded_batches"] == {"reused": 2, "encoded": 0, "kept_mib": before["encoded_batches"]["kept_mib"]}
    fresh = evaluate(tuned, processor, RECIPE, rows, batch_size=4, image_size=IMAGE_SIZE, progress=False)
    assert "encoded_batches" not in fresh
    assert [p["log_likelihoods"] for p in after["predictions"]] == [p["log_likelihoods"] for p in fresh["predictions"]]
    assert after["predictions"] != before["predictions"]  # the adapters changed the scores: a real second pass
    for kept, batch in zip(store.kept.values(), (rows[:4], rows[4:])):
        again = encode_rows(processor, RECIPE, batch, IMAGE_SIZE)
        assert kept.keys() == again.keys()
        assert all(torch.equal(kept[k], again[k]) for k in kept if isinstance(kept[k], torch.Tensor))


def test_generation_passes_share_encoded_batches_too(tiny_path, bone_break_dir):
    from unsloth_med.evaluate import EncodedBatches

    model, processor = _load(tiny_path, "mllama")
    rows = [{**row, "target": "A fracture of the distal radius."} for row in _xray_rows(bone_break_dir, 3)]
    store = EncodedBatches()
    kw = dict(batch_size=2, max_new_tokens=5, image_size=IMAGE_SIZE, progress=False)
    first = evaluate(model, processor, CAPTION_RECIPE, rows, inputs=store, **kw)
    second = evaluate(model, processor, CAPTION_RECIPE, rows, inputs=store, **kw)
    assert first["encoded_batches"]["encoded"] == 2 and second["encoded_batches"]["reused"] == 2
    assert second["encoded_batches"]["encoded"] == 0
    assert [p["prediction"] for p in second["predictions"]] == [p["prediction"] for p in first["predictions"]]


def test_encoded_batches_are_served_only_for_the_same_prompts_images_and_size(tiny_path, bone_break_dir, tmp_path):
    """What a batch is found by: another image size, another instruction, another file, or images held in memory
    (no file to name them by) each encode again; a limit of 0 keeps nothing; a kept batch is served for the same
    rows whichever row objects carry them."""
    from unsloth_med.evaluate import EncodedBatches

    _, processor = _load(tiny_path, "mistral3")
    rows = _xray_rows(bone_break_dir, 3)
    store = EncodedBatches()
    encode = store.encoder(processor, RECIPE, IMAGE_SIZE)
    encode(rows)
    encode([dict(row) for row in rows])
    assert store.stats == {"reused": 1, "encoded": 1}
    store.encoder(processor, RECIPE, 32)(rows)
    store.encoder(processor, dataclasses.replace(RECIPE, instruction=RECIPE.instruction + " Be brief."),
                  IMAGE_SIZE)(rows)
    other = [dict(rows[0], image=str(sorted(bone_break_dir.rglob("*.jpg"))[7])), *rows[1:]]
    encode(other)
    assert store.stats == {"reused": 1, "encoded": 4}
    in_memory = _rows(2)
    encode(in_memory)
    encode(in_memory)
    assert store.stats == {"reused": 1, "encoded": 6} and len(store.kept) == 4
    nothing = EncodedBatches(limit_bytes=0)
    for _ in range(2):
        nothing.encoder(processor, RECIPE, IMAGE_SIZE)(rows)
    assert nothing.stats == {"reused": 0, "encoded": 2} and not nothing.kept and nothing.kept_bytes == 0


def test_rows_without_ids_are_named_by_their_position_in_both_modes(tiny_path):
    """A paired comparison matches passes by id: rows without one get their position, never one shared id."""
    model, processor = _load(tiny_path, "mistral3")
    rows = [{k: v for k, v in row.items() if k != "id"} for row in _rows(3)]
    for mode in ("score", "generate"):
        result = evaluate(model, processor, RECIPE, rows, mode=mode, batch_size=2, max_new_tokens=2,
                          image_size=IMAGE_SIZE, progress=False)
        assert [p["id"] for p in result["predictions"]] == ["0", "1", "2"], mode


@pytest.mark.parametrize("family", ["qwen2_5_vl", "mistral3"])
def test_batches_encoded_in_threads_keep_the_padding_side_they_asked_for(tiny_path, family):
    """A GPU pass prefetches left-padded batches in two threads while its first batch's check encodes full
    sequences right-padded on the main thread; the side is the processor's shared state. Every prefetched batch
    must come back left-padded (a short row starts with padding); before encode took a lock, some did not."""
    from transformers import AutoProcessor

    from unsloth_med.evaluate.inputs import Prefetch
    from unsloth_med.models.families import FAMILIES

    processor = AutoProcessor.from_pretrained(tiny_path(family))
    prompting.prepare_processor(processor, FAMILIES[family])
    image = Image.new("RGB", (64, 64))

    def conversation(question, answer=None):
        turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return turns + ([{"role": "assistant", "content": [{"type": "text", "text": answer}]}] if answer else [])

    prompts = [prompting.render(processor, conversation("hi" if i % 2 else "Is there a bone fracture in this X-ray?"),
                                add_generation_prompt=True) for i in range(8)]
    full = [prompting.render(processor, conversation("Is there a fracture?", label))
            for label in ("yes", "no", "maybe")]
    sides = []
    for _ in range(15):
        feed = Prefetch(range(4), lambda _: prompting.encode(processor, prompts, [image] * 8, padding_side="left"),
                        ahead=2)
        for k, (_, encoded) in enumerate(feed):
            if k == 0:
                right = prompting.encode(processor, full, [image] * 3, padding_side="right")
                assert int(right["attention_mask"][1][-1]) == 0  # "no" is shorter than "maybe": padded at the end
            sides.append("left" if int(encoded["attention_mask"][1][0]) == 0 else "right")
    assert sides == ["left"] * 60


def test_classification_called_directly_runs_without_autograd(tiny_path):
    """evaluate_classification called on its own (as the GPU tests and users do), with autograd on, keeps no graph:
    every forward runs in inference mode, as under evaluate(), and the scores it returns carry no gradient."""
    from unsloth_med.evaluate.classify import evaluate_classification

    model, processor = _load(tiny_path, "mistral3")
    modes = []
    hook = model.register_forward_pre_hook(lambda module, args: modes.append(torch.is_inference_mode_enabled()))
    try:
        assert torch.is_grad_enabled()
        result = evaluate_classification(model, processor, RECIPE, _rows(3), batch_size=3, image_size=IMAGE_SIZE,
                                         progress=False)
    finally:
        hook.remove()
    assert modes and all(modes), modes
    assert len(result["predictions"]) == 3 and len(result["input_pipeline"]["batch_seconds"]) == 1


def test_packed_check_on_rows_of_several_images_compares_the_rows_it_has_references_for(tiny_path):
    """Two images per row: the encoded batch cannot be cut by row, so the check scores the whole batch packed and
    compares its first rows with their full sequences; every score equals the full-sequence definition."""
    model, processor = _load(tiny_path, "mistral3")
    rows = _rows(4)
    for row, extra in zip(rows, _rows(4, seed=1)):
        row["more_images"] = [extra["image"]]
    result = evaluate(model, processor, RECIPE, rows, batch_size=4, image_size=IMAGE_SIZE, progress=False)
    scoring = result["input_pipeline"]["label_scoring"]
    assert scoring["strategy"] == "packed" and scoring["agreed"] and scoring["checked_rows"] == 2, scoring
    full = score_rows(model, processor, RECIPE, rows, RECIPE.labels, image_size=IMAGE_SIZE, strategy="full")
    for prediction, scores in zip(result["predictions"], full):
        assert prediction["log_likelihoods"] == pytest.approx(
            {label: float(s) for label, s in zip(RECIPE.labels, scores)}, abs=2e-4)


def _lora(model, **extra):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)  # init_lora_weights=False: B is not zero, so the adapters change every score
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **extra,
                                            target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"]))


@pytest.mark.parametrize("family", ["mistral3", "mllama"])
def test_folded_adapters_score_as_the_unfolded_ones_in_one_matmul_a_layer(tiny_path, family):
    """A LoRA-tuned model evaluated with every adapter folded into its layer's weight (the default) gives the scores
    of the unfolded adapters; inside the block no adapter matrix runs, and after it every layer is its own again."""
    from peft.tuners.lora import LoraLayer

    from unsloth_med.models.folding import folded_adapters

    model, processor = _load(tiny_path, family)
    model = _lora(model)
    adapted = [m for m in model.modules() if isinstance(m, LoraLayer)]
    calls = []
    hooks = [layer.lora_A["default"].register_forward_hook(lambda *a: calls.append(1)) for layer in adapted]
    rows = _rows(5)
    unfolded = evaluate(model, processor, RECIPE, rows, batch_size=3, image_size=IMAGE_SIZE, progress=False,
                        fold_adapters=False)
    assert calls and unfolded["folded_adapters"] == {"layers": 0, "reason": "disabled"}
    calls.clear()
    folded = evaluate(model, processor, RECIPE, rows, batch_size=3, image_size=IMAGE_SIZE, progress=False)
    assert not calls, "an adapter matrix ran inside the folded evaluation"
    assert folded["folded_adapters"]["layers"] == len(adapted) > 0
    with model.disable_adapter():  # the adapters matter to these scores: folding them is not a no-op
        base = evaluate(model, processor, RECIPE, rows, batch_size=3, image_size=IMAGE_SIZE, progress=False)
    assert base["folded_adapters"]["layers"] == 0
    for got, want, plain in zip(folded["predictions"], unfolded["predictions"], base["predictions"]):
        assert got["prediction"] == want["prediction"]
        assert got["log_likelihoods"] == pytest.approx(want["log_likelihoods"], abs=1e-3)
        tuned, untuned = got["log_likelihoods"], plain["log_likelihoods"]
        assert max(abs(tuned[k] - untuned[k]) for k in untuned) > 0.01
    assert not any("forward" in layer.__dict__ for layer in adapted)  # each layer's own forward is back
    with folded_adapters(model):
        pass
    evaluate(model, processor, RECIPE, rows[:1], batch_size=1, image_size=IMAGE_SIZE, progress=False,
             fold_adapters=False)
    assert calls  # the adapters run again once the block is over
    for hook in hooks:
        hook.remove()


def test_running_out_of_memory_while_folding_scores_unfolded_and_says_so(tiny_path, monkeypatch):
    """The fold's memory estimate can miss (fragmentation, another process on the GPU): running out of memory part
    way through puts back the layers already folded and evaluates unfolded, with the reason in the result."""
    from peft.tuners.lora import LoraLayer

    from unsloth_med.models import folding

    model, processor = _load(tiny_path, "mistral3")
    model = _lora(model)
    rows = _rows(3)
    unfolded = evaluate(model, processor, RECIPE, rows, batch_size=3, image_size=IMAGE_SIZE, progress=False,
                        fold_adapters=False)
    fold_one, done = folding._folded_weight, []

    def fails_on_the_third(layer, names):  # the GPU's allocator raises this when the copy does not fit
        if len(done) == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        done.append(layer)
        return fold_one(layer, names)

    monkeypatch.setattr(folding, "_folded_weight", fails_on_the_third)
    result = evaluate(model, processor, RECIPE, rows, batch_size=3, image_size=IMAGE_SIZE, progress=False)
    adapted = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert result["folded_adapters"] == {"layers": 0,
                                         "reason": f"out of GPU memory after folding 2 of {len(adapted)} layers"}
    assert not any("forward" in m.__dict__ for m in adapted)
    for got, want in zip(result["predictions"], unfolded["predictions"]):
        assert got["log_likelihoods"] == want["log_likelihoods"]


def test_a_folded_layer_asked_for_per_row_adapters_runs_them_unfolded(tiny_path):
    """peft's adapter_names picks an adapter per row (mixed-batch inference): not what was folded, so that call runs
    the layer's own forward; an ordinary call inside the block is the one matmul, with the same output."""
    from peft.tuners.lora import LoraLayer

    from unsloth_med.models.folding import folded_adapters

    model = _lora(_load(tiny_path, "mistral3")[0])
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    x = torch.randn(2, 3, layer.in_features)
    with torch.no_grad():
        want = layer(x)
        with folded_adapters(model) as record:
            assert record["layers"] > 0
            calls = []
            hook = layer.lora_A["default"].register_forward_hook(lambda *a: calls.append(1))
            folded = layer(x)
            assert not calls
            per_row = layer(x, adapter_names=["default", "default"])
            assert calls
            hook.remove()
    assert torch.allclose(folded, want, atol=1e-5) and torch.allclose(per_row, want, atol=1e-6)


def _quantize_language_model(model) -> int:
    """Every linear layer of the language model as a bitsandbytes NF4 layer (as a 4-bit load leaves it; here on the
    CPU, where the hf backend loads float32): returns how many."""
    bnb = require("bitsandbytes")
    replaced = 0
    for parent in list(model.model.language_model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.float32, quant_type="nf4")
                layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
                layer.bias = child.bias
                # On a CPU with AVX512-BF16, bitsandbytes (0.50) packs the weight for its own kernel on the first
                # forward in eval mode and computes in bfloat16 (and peft's dequantize then reads the packed
                # layout wrongly). A GPU's 4-bit layer dequantizes and multiplies in the compute dtype: keep that.
                layer.support_avx512bf16_for_cpu = False
                setattr(parent, name, layer.to("cpu"))  # moving the weight is what quantizes it
                replaced += 1
    # As a 4-bit load marks it: peft then wraps these layers in its own bitsandbytes LoRA class, as on a GPU
    model.is_loaded_in_4bit = True
    return replaced


def test_dequantized_4bit_layers_score_and_generate_as_the_4bit_ones(tiny_path, monkeypatch):
    """evaluate(dequantize=True): every 4-bit layer runs on its weight dequantized once for the pass (for generation,
    where each decoding step would otherwise dequantize every weight again), with the same arithmetic: the same
    scores and answers, no 4-bit matmul inside the pass, the 4-bit layers themselves again after it. With LoRA
    adapters their base layers are folded with them, not dequantized twice."""
    bnb = require("bitsandbytes")  # a test dependency (pyproject's test extra): runs in CI

    model, processor = _load(tiny_path, "mistral3")
    quantized = _quantize_language_model(model)
    assert quantized > 0
    rows = _rows(4)
    kw = dict(batch_size=2, image_size=IMAGE_SIZE, progress=False)
    calls = []
    four_bit = bnb.nn.Linear4bit.forward
    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", lambda self, x: calls.append(1) or four_bit(self, x))
    as_4bit = [evaluate(model, processor, RECIPE, rows, mode=mode, dequantize=False, **kw)
               for mode in ("score", "generate")]
    assert calls
    calls.clear()
    dequantized = [evaluate(model, processor, RECIPE, rows, mode=mode, dequantize=True, **kw)
                   for mode in ("score", "generate")]
    assert not calls, "a 4-bit matmul ran inside the dequantized pass"
    for result in dequantized:
        record = result["folded_adapters"]
        assert record["layers"] == 0 and record["dequantized_layers"] == quantized and "gib" in record, record
    for got, want in zip(dequantized[0]["predictions"], as_4bit[0]["predictions"]):
        assert got["log_likelihoods"] == pytest.approx(want["log_likelihoods"], abs=1e-4)
    assert [p["answer"] for p in dequantized[1]["predictions"]] == [p["answer"] for p in as_4bit[1]["predictions"]]
    assert dequantized[1]["input_pipeline"]["generated_tokens"] == as_4bit[1]["input_pipeline"]["generated_tokens"]
    assert not any("forward" in vars(m) for m in model.modules())  # every layer's own forward is back
    evaluate(model, processor, RECIPE, rows[:1], **kw)
    assert calls  # the 4-bit layers run again after the pass
    calls.clear()
    default = evaluate(model, processor, RECIPE, rows[:2], mode="generate", **kw)  # dequantize=None: generation does
    assert not calls and default["folded_adapters"]["dequantized_layers"] == quantized

    from peft.tuners.lora import LoraLayer

    tuned = _lora(model)
    adapted = [m for m in tuned.modules() if isinstance(m, LoraLayer)]
    adapted_4bit = sum(isinstance(m.get_base_layer(), bnb.nn.Linear4bit) for m in adapted)
    assert any(type(m).__module__ == "peft.tuners.lora.bnb" for m in adapted)  # peft's wrapper of a 4-bit layer
    folded_only = evaluate(tuned, processor, RECIPE, rows[:2], mode="score", **kw)
    both = evaluate(tuned, processor, RECIPE, rows[:2], mode="score", dequantize=True, **kw)
    record = both["folded_adapters"]
    assert 0 < adapted_4bit < quantized
    assert record["layers"] == len(adapted) and record["dequantized_layers"] == quantized - adapted_4bit, record
    for got, want in zip(both["predictions"], folded_only["predictions"]):  # the adapters still count
        assert got["log_likelihoods"] == pytest.approx(want["log_likelihoods"], abs=1e-4)
    unfolded = evaluate(tuned, processor, RECIPE, rows[:2], mode="generate", dequantize=True, fold_adapters=False,
                        **kw)["folded_adapters"]  # the adapters' own 4-bit base layers are dequantized instead
    assert unfolded["layers"] == 0 and unfolded["dequantized_layers"] == quantized, unfolded


def test_only_plain_lora_layers_are_folded(tiny_path):
    """DoRA layers (a magnitude vector rescales W + BA) are not plain sums: evaluation leaves them unfolded; a model
    without adapters has nothing to fold, and says so."""
    from unsloth_med.models.folding import foldable_layers, folded_adapters

    model, processor = _load(tiny_path, "mistral3")
    with folded_adapters(model) as record:
        assert record == {"layers": 0, "reason": "no LoRA adapters to fold"}
    dora = _lora(model, use_dora=True)
    assert foldable_layers(dora) == []


def test_eager_evaluation_runs_compiled_modules_without_tracing_and_scores_the_same(tiny_path):
    """--eval_compiled false: Unsloth's torch.compile'd modules (here the language model, compiled with dynamo's
    eager backend so no compiler is needed) run as plain Python: dynamo traces no frame, and every score is equal."""
    from torch._dynamo.utils import counters

    model, processor = _load(tiny_path, "mistral3")
    rows = _rows(4)
    plain = evaluate(model, processor, RECIPE, rows, batch_size=2, image_size=IMAGE_SIZE, progress=False)
    model.model.language_model.compile(backend="eager", dynamic=True)
    traced = lambda: counters["frames"]["total"]  # noqa: E731
    before = traced()
    eager = evaluate(model, processor, RECIPE, rows, batch_size=2, image_size=IMAGE_SIZE, progress=False, eager=True)
    assert traced() == before and eager["timing"]["compiled"] is False
    compiled = evaluate(model, processor, RECIPE, rows, batch_size=2, image_size=IMAGE_SIZE, progress=False)
    assert traced() > before and compiled["timing"]["compiled"] is True
    for result in (eager, compiled):
        for got, want in zip(result["predictions"], plain["predictions"]):
            assert got["prediction"] == want["prediction"]
            assert got["log_likelihoods"] == pytest.approx(want["log_likelihoods"], abs=2e-4)


def test_eager_evaluation_on_a_torch_without_stances_traces_as_before_and_says_so(tiny_path, monkeypatch):
    """torch < 2.6 (the package allows 2.4) has no torch.compiler.set_stance: evaluation runs, recorded as compiled."""
    model, processor = _load(tiny_path, "mistral3")
    monkeypatch.delattr(torch.compiler, "set_stance")
    result = evaluate(model, processor, RECIPE, _rows(2), batch_size=2, image_size=IMAGE_SIZE, progress=False,
                      eager=True)
    assert len(result["predictions"]) == 2 and result["timing"]["compiled"] is True


# ----------------------------------------------------------------------------- generation
@pytest.fixture(scope="module")
def overfit_model(tiny_path):
    """A tiny Ministral-3-layout model trained (all weights, 25 steps) to answer ANSWER for any X-ray."""
    torch.manual_seed(0)
    model, processor = HFBackend().load(str(tiny_path("mistral3")), ModelArgs())
    rows = [dict(r, target=ANSWER) for r in _rows(4, seed=1)]
    batch = VisionCollator(processor, family_of(model.config), RECIPE, image_size=IMAGE_SIZE, max_seq_length=4096)(rows)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(25):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return model, processor


def test_generation_mode_counts_unparseable_answers(tiny_path, overfit_model):
    rows = _rows(4, seed=2)
    # An untrained model babbles: every answer is unparseable and counted as wrong.
    base, base_processor = _load(tiny_path, "mistral3")
    babble = evaluate(base, base_processor, RECIPE, rows, mode="generate", batch_size=3, image_size=IMAGE_SIZE,
                      progress=False)
    m = babble["metrics"]
    assert m["mode"] == "generate" and m["n"] == 4
    assert m["unparseable"] == sum(not p["parsed"] for p in babble["predictions"])
    assert all(p["prediction"] is None or p["prediction"] in RECIPE.labels for p in babble["predictions"])
    assert m["unparseable"] == 4 and m["accuracy"] == 0.0 and sum(m["unparseable_by_class"].values()) == 4

    # The trained model answers ANSWER: parsed, and label scoring agrees with it.
    model, processor = overfit_model
    generated = evaluate(model, processor, RECIPE, rows, mode="generate", batch_size=3, image_size=IMAGE_SIZE,
                         progress=False)
    assert [p["answer"] for p in generated["predictions"]] == [ANSWER] * 4
    assert generated["metrics"]["unparseable"] == 0
    # Generated tokens are counted on the ids: each row's answer and the end of turn it stopped on.
    stop_and_answer = prompting.answer_ids(processor, family_of(model.config), ANSWER)
    assert generated["input_pipeline"]["generated_tokens"] == 4 * len(stop_and_answer)
    assert generated["metrics"]["accuracy"] == pytest.approx(sum(r["target"] == ANSWER for r in rows) / 4)
    scored = evaluate(model, processor, RECIPE, rows, mode="score", image_size=IMAGE_SIZE, progress=False)
    assert agreement(scored, generated) == 1.0
    assert all(p["probabilities"][ANSWER] > 0.9 for p in scored["predictions"])

    # Against a class list without ANSWER, the same answers name no class; label scoring still picks one.
    others = dataclasses.replace(RECIPE, labels=tuple(label for label in RECIPE.labels if label != ANSWER))
    unmatched = evaluate(model, processor, others, rows, mode="generate", max_new_tokens=5, image_size=IMAGE_SIZE,
                         progress=False)
    assert [p["answer"] for p in unmatched["predictions"]] == [ANSWER] * 4
    assert unmatched["metrics"]["unparseable"] == 4 and unmatched["metrics"]["max_new_tokens"] == 5
    assert unmatched["metrics"]["accuracy"] == 0.0
    rescored = evaluate(model, processor, others, rows, mode="score", image_size=IMAGE_SIZE, progress=False)
    assert all(p["prediction"] in others.labels for p in rescored["predictions"])


def test_generated_tokens_are_counted_up_to_each_rows_first_stop():
    from unsloth_med.evaluate.caption import generated_token_counts

    pad, stop, other_stop = 0, 2, 7
    new = torch.tensor([[5, 6, stop, pad, pad],   # stopped at its third token, padded after
                        [5, 6, 8, 9, 4],          # never stopped: all five
                        [other_stop, pad, pad, pad, pad],
                        [stop, 5, stop, 0, 0]])    # the first stop counts
    assert generated_token_counts(new, [stop, other_stop]) == [3, 5, 1, 1]
    assert generated_token_counts(new[:, :0], [stop]) == [0, 0, 0, 0]


def test_captioning_evaluation_runs_end_to_end(tiny_path):
    model, processor = _load(tiny_path, "mllama")
    rows = [{"image": im, "target": "The radiograph shows a fracture of the distal radius.", "id": f"c{i}"}
            for i, im in enumerate(_images(3))]
    result = evaluate(model, processor, CAPTION_RECIPE, rows, batch_size=2, max_new_tokens=6, image_size=IMAGE_SIZE,
                      progress=False)
    m = result["metrics"]
    assert m["n"] == 3 and m["mode"] == "generate" and m["max_new_tokens"] == 6
    assert 0 <= m["bleu"] <= 100 and 0 <= m["rougeL"] <= 1
    assert [p["id"] for p in result["predictions"]] == ["c0", "c1", "c2"]
    pipeline = result["input_pipeline"]
    assert 3 <= pipeline["generated_tokens"] <= 3 * 6 and pipeline["generated_tokens_per_second"] > 0


# ----------------------------------------------------------------------------- predict
def _image_files(tmp_path, n=2):
    paths = []
    for i, im in enumerate(_images(n, seed=3)):
        path = tmp_path / f"xray{i}.png"
        im.save(path)
        paths.append(str(path))
    return paths


def test_predict_on_a_run_folder_gives_a_class_and_probabilities_summing_to_one(tiny_path, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = str(tiny_path("mistral3"))
    model, processor = HFBackend().load(base, ModelArgs())
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             init_lora_weights=False))
    run = tmp_path / "run"
    model.save_pretrained(run / "adapter")
    processor.save_pretrained(run / "adapter")
    (run / "adapter" / "unsloth_med.json").write_text(json.dumps({"recipe": "bone_fracture", "base_model": base,
                                                                  "image_size": IMAGE_SIZE}))
    (run / "config.yaml").write_text(yaml.safe_dump({"run": {"recipe": "bone_fracture"}, "model": {"model": base},
                                                     "data": {"image_size": IMAGE_SIZE}}))
    images = _image_files(tmp_path)
    results = predict(run, images, top_k=3)
    assert [r["image"] for r in results] == images
    unreadable = tmp_path / "unreadable.png"
    unreadable.write_bytes(b"not a png")
    mixed = predict(run, [images[0], str(unreadable), images[1]], top_k=3)  # reported in the order given
    assert [r["image"] for r in mixed] == [images[0], str(unreadable), images[1]] and "error" in mixed[1]
    together = predict(run, images, together=True)  # one answer about both images names both
    assert len(together) == 1 and together[0]["image"] == " + ".join(images)
    for r in results:
        assert r["label"] in RECIPE.labels
        assert math.isclose(sum(r["probabilities"].values()), 1.0, abs_tol=1e-6)
        assert len(r["top"]) == 3 and r["top"][0]["label"] == r["label"]
        assert [t["probability"] for t in r["top"]] == sorted((t["probability"] for t in r["top"]), reverse=True)
    # The adapter is applied: its scores differ from the base model's.
    base_model, _ = _load(tiny_path, "mistral3")
    base_scores = score_rows(base_model, processor, RECIPE, [{"image": images[0]}], RECIPE.labels,
                             image_size=IMAGE_SIZE).softmax(-1)[0]
    assert not np.allclose(list(results[0]["probabilities"].values()), base_scores.tolist(), atol=1e-6)
    text = format_predictions(results)
    assert results[0]["label"] in text and "%" in text


def test_predict_on_a_merged_folder_reads_its_recipe(tiny_path, tmp_path, overfit_model):
    model, processor = overfit_model
    merged = tmp_path / "merged"
    model.save_pretrained(merged)
    processor.save_pretrained(merged)
    (merged / "unsloth_med.json").write_text(json.dumps({"recipe": "bone_fracture", "image_size": IMAGE_SIZE}))
    results = predict(merged, _image_files(tmp_path, 1), top_k=2)
    assert results[0]["label"] == ANSWER and results[0]["probability"] > 0.9 and len(results[0]["top"]) == 2
    (merged / "unsloth_med.json").unlink()
    from unsloth_med.errors import ConfigError

    with pytest.raises(ConfigError, match="recipe"):
        predict(merged, _image_files(tmp_path, 1))
    captions = predict(merged, _image_files(tmp_path, 1), recipe="radiology_caption", max_new_tokens=4)
    assert isinstance(captions[0]["caption"], str)
