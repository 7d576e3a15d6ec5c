"""Medical VQA and conversations: the sample model, data formats, labels, splits by image, metrics, the demo."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from unsloth_med.errors import ConfigError, DataError


def _image(path: Path, colour: str, mark: int = 0) -> str:
    img = Image.new("RGB", (64, 48), colour)
    ImageDraw.Draw(img).rectangle([mark, mark, mark + 8, mark + 8], fill="white")
    img.save(path)
    return str(path)


def _conversation(tmp_path: Path) -> dict:
    """A 3-turn, 2-image sample (system prompt, an image per question, a last text-only question)."""
    first, second = _image(tmp_path / "a.png", "red"), _image(tmp_path / "b.png", "blue")
    turns = [{"role": "system", "content": "Answer in one word."},
             {"role": "user", "content": [{"type": "image", "image": first}, {"type": "text", "text": "Colour?"}]},
             {"role": "assistant", "content": "red"},
             {"role": "user", "content": [{"type": "image", "image": second}, {"type": "text", "text": "This one?"}]},
             {"role": "assistant", "content": "blue"},
             {"role": "user", "content": "Same colour?"},
             {"role": "assistant", "content": "no"}]
    listing = tmp_path / "chats.jsonl"
    listing.write_text(json.dumps({"messages": turns, "split": "train"}) + "\n"
                       + json.dumps({"messages": turns, "split": "test"}) + "\n")
    from unsloth_med.data.tables import load_table

    return load_table(listing, task="vqa")["train"][0]


def _spans_after_marker(ids: list[int], marker: list[int], answers: list[list[int]]) -> list[int]:
    """Positions of each answer, found independently: right after each occurrence of the response marker."""
    positions, k, i = [], 0, 0
    while i <= len(ids) - len(marker) and k < len(answers):
        if ids[i:i + len(marker)] == marker:
            start = i + len(marker)
            assert ids[start:start + len(answers[k])] == answers[k]
            positions += range(start, start + len(answers[k]))
            k, i = k + 1, start
        i += 1
    assert k == len(answers)
    return positions


@pytest.mark.parametrize("family", ["mistral3", "qwen2_5_vl"])
def test_collator_labels_every_assistant_turn_and_nothing_else(tmp_path, tiny_path, family):
    from unsloth_med.backends.hf import HFBackend
    from unsloth_med.config import ModelArgs
    from unsloth_med.models import prompting
    from unsloth_med.models.families import family_of
    from unsloth_med.recipes import get_recipe

    row = _conversation(tmp_path)
    assert json.loads(row["more_images"]) == [str(tmp_path / "b.png")] and row["target"] == "no"
    model, processor = HFBackend().load(str(tiny_path(family)), ModelArgs())
    fam = family_of(model.config)
    batch = HFBackend().collator(model, processor, get_recipe("vqa"), image_size=64, max_seq_length=1024)([row])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    tokenizer = processor.tokenizer
    marker = tokenizer(fam.response_part, add_special_tokens=False)["input_ids"]
    answers = [prompting.answer_ids(processor, fam, text) for text in ("red", "blue", "no")]
    expected = _spans_after_marker(ids, marker, answers)
    assert [i for i, label in enumerate(labels) if label != -100] == expected
    assert all(labels[i] == ids[i] for i in expected)
    labelled_text = "".join(f"{a}{fam.response_end}" for a in ("red", "blue", "no"))
    assert tokenizer.decode([ids[i] for i in expected]) == labelled_text
    image_token = tokenizer.convert_tokens_to_ids("[IMG]" if family == "mistral3" else "<|image_pad|>")
    assert ids.count(image_token) > 0 and all(labels[i] == -100 for i, t in enumerate(ids) if t == image_token)


def test_mllama_refuses_a_sample_with_two_images(tmp_path, tiny_path):
    from unsloth_med.backends.hf import HFBackend
    from unsloth_med.config import ModelArgs
    from unsloth_med.recipes import get_recipe

    row = _conversation(tmp_path)
    model, processor = HFBackend().load(str(tiny_path("mllama")), ModelArgs())
    collator = HFBackend().collator(model, processor, get_recipe("vqa"), image_size=64, max_seq_length=1024)
    with pytest.raises(DataError, match="2 images.*mllama.*one image per conversation"):
        collator([row])


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["mistral3", "qwen2_5_vl"])
def test_unsloth_collator_labels_every_assistant_turn(tmp_path, tiny_path, family):
    """The same 3-turn, 2-image sample through the real UnslothVisionDataCollator (train on responses)."""
    from unsloth_med.backends.unsloth import UnslothBackend, import_unsloth

    import_unsloth()
    from unsloth_med.config import ModelArgs
    from unsloth_med.models import prompting
    from unsloth_med.models.families import family_of
    from unsloth_med.recipes import get_recipe

    row = _conversation(tmp_path)
    backend = UnslothBackend()
    model, processor = backend.load(str(tiny_path(family)), ModelArgs(load_in_4bit=False))
    fam = family_of(model.config)
    batch = backend.collator(model, processor, get_recipe("vqa"), image_size=64, max_seq_length=1024)([row])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    tokenizer = getattr(processor, "tokenizer", processor)
    marker = tokenizer(fam.response_part, add_special_tokens=False)["input_ids"]
    answers = [prompting.answer_ids(processor, fam, text) for text in ("red", "blue", "no")]
    expected = _spans_after_marker(ids, marker, answers)
    labelled = [i for i, label in enumerate(labels) if label != -100]
    # Unsloth also trains on what the template puts after the end-of-turn token (Qwen's newline).
    assert set(expected) <= set(labelled)
    assert all(ids[i] in tokenizer("\n", add_special_tokens=False)["input_ids"] for i in set(labelled) - set(expected))


# ----------------------------------------------------------------------------- formats and placeholders
def test_question_answer_listing_fills_the_instruction_per_row(tmp_path):
    from unsloth_med.data.sources import load_recipe_data
    from unsloth_med.recipes import get_recipe
    from unsloth_med.recipes.resolve import resolve_recipe

    img = _image(tmp_path / "x.png", "gray")
    listing = tmp_path / "qa.csv"
    listing.write_text("file,q,a,kind,split\n" + f"{img},Is it gray?,Yes,,train\n{img},What shape?,square,,train\n"
                       + f"{img},Any mark?,no,closed,test\n")
    recipe = resolve_recipe(get_recipe("vqa"), {"question_column": "q", "answer_column": "a",
                                                "answer_type_column": "kind", "image_column": "file",
                                                "instruction": "Q: {q} ({kind})"})
    splits = load_recipe_data(recipe, str(listing))
    train = splits["train"]
    assert list(train["question"]) == ["Is it gray?", "What shape?"]
    assert list(train["answer_type"]) == ["closed", "open"]
    texts = [recipe.prompt(example=row)[0]["content"][-1]["text"] for row in train]
    assert texts == ["Q: Is it gray? ()", "Q: What shape? ()"]
    assert splits["test"][0]["answer_type"] == "closed"


def test_an_unknown_placeholder_fails_before_the_model_loads(tmp_path):
    from unsloth_med.cli import train_command
    from unsloth_med.recipes import get_recipe

    img = _image(tmp_path / "x.png", "gray")
    listing = tmp_path / "qa.csv"
    listing.write_text("image,question,answer\n" + "".join(f"{img},q{i}?,yes\n" for i in range(6)))
    argv = ["--data_dir", str(listing), "--instruction", "{question} {modality}", "--model", "/no/such/model",
            "--output_dir", str(tmp_path / "run")]
    columns = "image, target, id, answer, answer_type, image_id, question"
    with pytest.raises(ConfigError, match=r"\{modality\}.*columns: " + columns):
        train_command(argv, get_recipe("vqa"))


def test_sharegpt_conversations_with_image_marks(tmp_path):
    from unsloth_med.data.tables import load_table

    a, b = _image(tmp_path / "a.png", "red"), _image(tmp_path / "b.png", "blue")
    record = {"images": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nWhich is newer?"}, {"from": "gpt", "value": "The second."},
        {"from": "human", "value": "Any change?"}, {"from": "gpt", "value": "No change."}]}
    listing = tmp_path / "llava.jsonl"
    listing.write_text("\n".join(json.dumps(dict(record, split=s)) for s in ("train", "test")))
    row = load_table(listing, task="vqa")["train"][0]
    assert row["image"] == a and json.loads(row["more_images"]) == [b] and row["target"] == "No change."
    messages = json.loads(row["messages"])
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert [p["type"] for p in messages[0]["content"]] == ["image", "image", "text"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "a.png", "conversations": [{"from": "doctor", "value": "hi"}]}))
    with pytest.raises(DataError, match="unknown speaker 'doctor'"):
        load_table(bad, task="vqa")


# ----------------------------------------------------------------------------- splits and leakage by image
def test_split_by_image_keeps_every_image_on_one_side(tmp_path):
    from unsloth_med.data.checks import leak_counts, leak_message, leaked_test_images
    from unsloth_med.data.splits import image_key, split_by_image
    from unsloth_med.data.tables import load_table

    rows = []
    for i in range(12):
        path = _image(tmp_path / f"img{i}.png", "black", mark=4 * i)
        copy = tmp_path / f"copy{i}.png"  # the same image under another name: the same content hash
        copy.write_bytes(Path(path).read_bytes())
        for k, name in enumerate((path, copy.name, path)):
            rows.append({"image": name, "question": f"q{k}", "answer": "yes", "split": "test" if k == 1 else "train"})
    listing = tmp_path / "qa.csv"
    with listing.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    own = load_table(listing, task="vqa")
    counts = leak_counts(own["test"], leaked_test_images(own))
    assert counts == {"test_images": 12, "leaked_images": 12, "test_rows": 12, "leaked_rows": 12}
    assert "12 of 12 test images" in leak_message(counts)
    split = split_by_image(own, test_fraction=0.25, seed=0)
    train_keys = {image_key(p) for p in split["train"]["image"]}
    test_keys = {image_key(p) for p in split["test"]["image"]}
    assert len(test_keys) == 3 and len(train_keys) == 9 and not train_keys & test_keys
    assert len(split["test"]) == 9 and len(split["train"]) == 27
    assert leaked_test_images(split) == []


def test_split_by_image_keeps_rows_that_share_any_image_together(tmp_path):
    """Two-image rows (current + prior study) chain: a-b, b-c and d-e, e-f are two groups, whatever image comes
    first; no image of any row ends up on both sides."""
    from unsloth_med.data.images import raw_image_lists
    from unsloth_med.data.splits import image_groups, image_key, split_by_image
    from unsloth_med.data.tables import load_table

    for i, name in enumerate("abcdefgh"):
        _image(tmp_path / f"{name}.png", "gray", mark=3 * i)
    pairs = ["ab", "bc", "de", "ef", "gh", "hg", "ca"]
    listing = tmp_path / "pairs.jsonl"
    listing.write_text("\n".join(json.dumps({"images": [f"{x}.png", f"{y}.png"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nChange?"}, {"from": "gpt", "value": "No."}],
        "split": "train" if k % 2 else "test"}) for k, (x, y) in enumerate(pairs)))
    data = load_table(listing, task="vqa")
    pooled = __import__("datasets").concatenate_datasets([data["train"], data["test"]])
    assert len(set(image_groups(pooled))) == 3  # {a, b, c}, {d, e, f}, {g, h}
    split = split_by_image(data, test_fraction=0.34, seed=1)
    sides = [{image_key(p) for row in raw_image_lists(split[part]) for p in row} for part in ("train", "test")]
    assert sides[0] and sides[1] and not sides[0] & sides[1]
    assert len(split["train"]) + len(split["test"]) == len(pairs)


def test_every_image_of_a_two_image_sample_is_validated_prepared_and_leak_checked(tmp_path):
    """A prior study and a current one per sample: the second image gets the same checks as the first
    (old main validated, prepared and leak-checked only the first)."""
    from unsloth_med.data.checks import drop_leaked, leaked_test_images
    from unsloth_med.data.images import ImageFit
    from unsloth_med.data.prepare import prepare_images
    from unsloth_med.data.tables import load_table
    from unsloth_med.data.validate import validate_splits

    for i in range(6):
        _image(tmp_path / f"prior{i}.png", "black", mark=6 * i)
        _image(tmp_path / f"now{i}.png", "gray", mark=6 * i)
    (tmp_path / "now5.png").write_bytes(b"not a png")  # a train sample whose second image is broken
    (tmp_path / "copy.png").write_bytes((tmp_path / "now1.png").read_bytes())  # a test image seen in training
    chat = [{"from": "human", "value": "<image>\n<image>\nAny change?"}, {"from": "gpt", "value": "no"}]
    records = [{"id": f"s{i}", "images": [f"prior{i}.png", f"now{i}.png"], "conversations": chat, "split": "train"}
               for i in range(1, 6)]
    records += [{"id": "t0", "images": ["prior0.png", "now0.png"], "conversations": chat, "split": "test"},
                {"id": "t1", "images": ["prior0.png", "copy.png"], "conversations": chat, "split": "test"}]
    listing = tmp_path / "studies.jsonl"
    listing.write_text("\n".join(json.dumps(r) for r in records))
    splits = load_table(listing, task="vqa")

    clean, skipped = validate_splits(dict(splits), image_size=64, max_bad_fraction=0.5)
    assert [(s["id"], Path(s["image"]).name) for s in skipped] == [("s5", "now5.png")]
    assert skipped[0]["reason"].startswith("image 2 of 2:") and len(clean["train"]) == 4

    leaks = leaked_test_images(clean)
    assert [(e["test_id"], Path(e["test"]).name, Path(e["train"]).name) for e in leaks] == [("t1", "copy.png",
                                                                                            "now1.png")]
    assert list(drop_leaked(clean["test"], leaks)["id"]) == ["t0"]

    fit = ImageFit(max_side=32, factor=8)
    prepared, stats = prepare_images(clean["train"], fit, tmp_path / "cache", workers=8)
    for row in prepared:
        more = json.loads(row["more_images"])
        assert len(more) == 1 and Path(more[0]).is_relative_to(tmp_path / "cache")
        assert Image.open(more[0]).size == Image.open(row["image"]).size == (32, 24)
        assert row["image_shape"] == "32x24+32x24" and row["image_tokens"] == 2 * (32 // 8) * (24 // 8)
    assert len(list((tmp_path / "cache").rglob("*.png"))) == 8  # 4 samples x 2 images, each prepared once


# ----------------------------------------------------------------------------- metrics
def test_vqa_metrics_equal_hand_computed_values():
    from unsloth_med.evaluate.vqa import blind_ceilings, normalize, paired_vqa_change, vqa_metrics

    rows = [  # closed: 2 right (one only after normalising), 2 wrong (one empty): all 4 in the denominator
        {"answer_type": "closed", "target": "yes", "prediction": "Yes.", "scored": "yes"},
        {"answer_type": "closed", "target": "no", "prediction": "yes", "scored": "no"},
        {"answer_type": "closed", "target": "no", "prediction": "", "scored": "yes"},
        {"answer_type": "closed", "target": "yes", "prediction": "yes", "scored": "yes"},
        # open: exact after removing the article; half the tokens; nothing
        {"answer_type": "open", "target": "the left lung", "prediction": "Left lung", "scored": None},
        {"answer_type": "open", "target": "right kidney", "prediction": "kidney stone large", "scored": None},
        {"answer_type": "open", "target": "axial", "prediction": "coronal", "scored": None},
    ]
    assert normalize("The  Left-lung!") == "left lung"
    m = vqa_metrics(rows)
    assert m["closed_accuracy"] == pytest.approx(2 / 4) and m["closed_accuracy_scored"] == pytest.approx(3 / 4)
    assert m["open_exact_match"] == pytest.approx(1 / 3)
    assert m["open_recall"] == pytest.approx((1 + 0.5 + 0) / 3)
    # row 2: precision 1/3, recall 1/2 -> F1 0.4
    assert m["open_token_f1"] == pytest.approx((1 + 0.4 + 0) / 3)
    # BLEU-1 over open rows: 3 matched unigrams of 6 predicted; 6 predicted >= 5 reference tokens: no penalty
    assert m["open_bleu1"] == pytest.approx(3 / 6)
    assert m["overall_accuracy"] == pytest.approx(3 / 7) and m["per_type"]["closed"]["n"] == 4
    for key in ("overall_accuracy", "closed_accuracy", "closed_accuracy_scored", "open_exact_match"):
        low, high = m[f"{key}_ci95"]  # 95%, resampling images (here each row is an image of its own)
        assert 0 <= low <= m[key] <= high <= 1, key
    rows = [{**row, "id": f"q{k}"} for k, row in enumerate(rows)]
    change = paired_vqa_change([{**row, "prediction": row["target"], "scored": None} for row in rows], rows)
    assert change["n"] == 7 and change["images"] == 7  # each row its own image here
    assert (change["right_only_before"], change["right_only_after"]) == (4, 0)  # before: every answer right
    assert change["overall_accuracy"]["difference"] == pytest.approx(3 / 7 - 1)
    assert "closed_accuracy_scored" not in change  # the pass before scored nothing: no difference to take
    assert paired_vqa_change(rows, [{**rows[0], "id": "elsewhere"}]) is None
    ceilings = blind_ceilings([{"image_id": "a", "question": "q1", "target": "yes"},
                               {"image_id": "a", "question": "q2", "target": "no"},
                               {"image_id": "b", "question": "q1", "target": "no"},
                               {"image_id": "b", "question": "q2", "target": "no"}])
    assert ceilings == {"question_blind": 3 / 4, "image_blind": 3 / 4}


def test_closed_answers_are_scored_as_the_data_mostly_writes_them():
    """Label scoring ranks the closed answers' exact texts. Before, each was written as first met: a split opening
    with "Yes" and "No" scored those, though its answers (and so its training) mostly wrote "yes" and "no"."""
    import datasets

    from unsloth_med.evaluate.vqa import closed_answer_set

    split = datasets.Dataset.from_dict({
        "answer_type": ["closed", "closed", "open", "closed", "closed", "closed", "closed", "closed"],
        "target": ["Yes", "No", "Yes", "yes", "no", "yes.", "no", "yes"]})
    assert closed_answer_set(split) == ["no", "yes"]
    # a tie keeps the first spelling met
    assert closed_answer_set(split.select([0, 1, 3, 4])) == ["No", "Yes"]


# ----------------------------------------------------------------------------- real data and the demo
@pytest.mark.slow
def test_three_questions_per_real_bone_break_image_train_a_tiny_model(bone_break_dir, tiny_path, tmp_path):
    from unsloth_med.cli import train_command
    from unsloth_med.recipes import get_recipe

    tiny_path("mistral3")
    rows = list(csv.DictReader((bone_break_dir / "labels.csv").open()))
    picked = [r for r in rows if r["split"] == "train"][:8] + [r for r in rows if r["split"] == "test"][:4]
    listing = tmp_path / "qa.csv"
    with listing.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "question", "answer", "split"])
        for r in picked:
            path = bone_break_dir / r["path"]
            writer.writerow([path, "Is there a fracture?", "yes", r["split"]])
            writer.writerow([path, "What kind of fracture is this?", r["label"], r["split"]])
            writer.writerow([path, f"Is this a {r['label']}?", "yes", r["split"]])
    out = tmp_path / "run"
    argv = ["--data_dir", str(listing), "--model", "tiny:mistral3", "--max_steps", "3", "--image_size", "64",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--eval_batch_size", "6",
            "--save_strategy", "no", "--preprocess_images", "false", "--max_new_tokens", "5", "--output_dir", str(out)]
    train_command(argv, get_recipe("vqa"))
    # the run's generation budget is recorded with its adapter (an export evaluates as the run did)
    assert json.loads((out / "adapter" / "unsloth_med.json").read_text())["max_new_tokens"] == 5
    after = json.loads((out / "eval_after.json").read_text())
    assert len(after["predictions"]) == 12 and {p["answer_type"] for p in after["predictions"]} == {"closed", "open"}
    assert after["timing"]["compiled"] is True  # generation keeps Unsloth's compiled functions by default
    # and runs 4-bit layers dequantized once a pass (--eval_dequantize; none here: the CPU model is not 4-bit)
    before = json.loads((out / "eval_before.json").read_text())
    assert before["folded_adapters"]["reason"] == "no LoRA adapters to fold and no 4-bit layers"
    assert after["folded_adapters"]["layers"] > 0 and after["folded_adapters"]["dequantized_layers"] == 0
    assert after["encoded_batches"]["reused"] == 2 and after["encoded_batches"]["encoded"] == 0  # the pass before's
    assert {"image_id", "question", "answer_type", "target", "prediction"} <= set(after["predictions"][0])
    assert sum("loss" in json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()) == 3


def test_pack_questions_makes_one_conversation_per_image_with_every_answer_trained(tmp_path, tiny_path):
    """--pack_questions: the three questions of an image become one 3-turn conversation (the image once, in the
    first turn); the collator puts the loss on all three answers, and the packed rows keep the row order."""
    import datasets

    from unsloth_med.backends.hf import HFBackend
    from unsloth_med.config import ModelArgs
    from unsloth_med.data.samples import pack_questions
    from unsloth_med.models import prompting
    from unsloth_med.models.families import family_of
    from unsloth_med.recipes import get_recipe

    a, b = _image(tmp_path / "a.png", "red"), _image(tmp_path / "b.png", "blue")
    qa = [(a, "Colour?", "red"), (b, "Colour?", "blue"), (a, "Square?", "yes"), (a, "Round?", "no")]
    rows = [{"image": img, "target": answer, "id": f"r{i}", "question": q} for i, (img, q, answer) in enumerate(qa)]
    recipe = get_recipe("vqa")
    packed, counts = pack_questions(datasets.Dataset.from_list(rows), recipe.instruction)
    assert counts == {"rows": 4, "samples": 2} and [r["image"] for r in packed] == [a, b]
    row = packed[0]
    messages = json.loads(row["messages"])
    assert [m["role"] for m in messages] == ["user", "assistant"] * 3 and row["target"] == "no"
    assert [p["type"] for p in messages[0]["content"]] == ["image", "text"]
    assert all(p["type"] == "text" for m in messages[1:] for p in m["content"])  # the image once
    assert packed[1]["messages"] == "" and packed[1]["target"] == "blue"  # alone: unchanged

    model, processor = HFBackend().load(str(tiny_path("mistral3")), ModelArgs())
    fam = family_of(model.config)
    batch = HFBackend().collator(model, processor, recipe, image_size=64, max_seq_length=1024)([row])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    marker = processor.tokenizer(fam.response_part, add_special_tokens=False)["input_ids"]
    expected = _spans_after_marker(ids, marker, [prompting.answer_ids(processor, fam, t) for t in ("red", "yes", "no")])
    assert [i for i, label in enumerate(labels) if label != -100] == expected


def test_the_demo_questions_need_both_the_image_and_the_question(tmp_path):
    """The demo listing: every image asked its class (open) and one yes and one no question, every class name asked
    as often with yes as with no, so neither input alone gets far (the ceilings the demo must beat clearly)."""
    from collections import Counter

    from unsloth_med.data.synthetic import write_fracture_vqa, write_synthetic_fractures
    from unsloth_med.evaluate.vqa import blind_ceilings
    from unsloth_med.pipeline import DEMO_VQA

    classes = DEMO_VQA["classes"]
    root = write_synthetic_fractures(tmp_path / "xrays", train_per_class=0, test_per_class=6, size=32, pose_jitter=0)
    rows = list(csv.DictReader(write_fracture_vqa(root, tmp_path / "vqa.csv", **DEMO_VQA).open()))
    assert len(rows) == 3 * 6 * len(classes) and {r["split"] for r in rows} == {"test"}
    per_image = Counter(r["image"] for r in rows)
    assert set(per_image.values()) == {3} and len(per_image) == 6 * len(classes)
    closed = [r for r in rows if r["answer_type"] == "closed"]
    assert Counter(r["answer"] for r in closed) == {"yes": 6 * len(classes), "no": 6 * len(classes)}
    for name in classes:
        asked = Counter(r["answer"] for r in closed if r["question"] == f"Is this a {name}?")
        assert asked["yes"] == asked["no"] == 6
    ceilings = blind_ceilings({"image_id": r["image"], "question": r["question"], "target": r["answer"]} for r in rows)
    assert ceilings == {"question_blind": pytest.approx(1 / 3), "image_blind": pytest.approx(1 / 2)}


@pytest.mark.slow
def test_vqa_demo_beats_both_blind_ceilings(tmp_path):
    out = tmp_path / "run"
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "unsloth_med.recipes.radiology_vqa", "--demo", "--output_dir",
                           str(out)], env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    after = json.loads((out / "metrics.json").read_text())["after"]
    print(f"vqa demo: {after['overall_accuracy']:.3f} vs ceilings {after['question_blind_ceiling']:.3f} (image only) "
          f"/ {after['image_blind_ceiling']:.3f} (question only) in {time.time() - started:.0f} s")
    assert after["overall_accuracy"] >= max(after["question_blind_ceiling"], after["image_blind_ceiling"]) + 0.1
    # the closed questions too (0.5 from the question alone): the old demo answered "yes" to all of them
    assert after["closed_accuracy"] >= 0.6 and after["closed_accuracy_scored"] >= 0.6
    assert "Ceiling: image only" in done.stdout and "Closed accuracy" in done.stdout
    low, high = after["closed_accuracy_ci95"]  # resampled by image: the demo asks several questions per image
    assert low <= after["closed_accuracy"] <= high and "95% interval" in done.stdout
    change = json.loads((out / "metrics.json").read_text())["after_vs_before"]
    assert change["n"] == after["n"] and change["images"] < change["n"]  # several questions per image
    assert change["overall_accuracy"]["ci95"][0] > 0  # training surely helped, whatever images were drawn
    assert f"{change['right_only_after']} right only after" in done.stdout
    assert (out / "per_answer_type.png").is_file()


def test_predict_answers_a_question_and_goes_on_past_an_unreadable_file(tmp_path, tiny_path, capsys):
    from unsloth_med.cli.predict import predict_command

    tiny_path("mistral3")
    good = [_image(tmp_path / "a.png", "gray"), _image(tmp_path / "b.png", "black")]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    argv = ["--model", "tiny:mistral3", "--recipe", "vqa", "--question", "Is there a fracture?", good[0], str(broken),
            good[1]]
    assert predict_command(argv) == 1
    out = capsys.readouterr()
    assert out.out.count("Q: Is there a fracture?") == 2 and "NOT READ" in out.out and "broken.png" in out.err
    assert predict_command([*argv[:6], "--together", *good]) == 0
    assert capsys.readouterr().out.count("Q: Is there a fracture?") == 1


def test_a_saved_hf_dataset_shaped_like_vqa_rad(tmp_path):
    """image (an Image feature), question, answer: the shape of flaviagiammarino/vqa-rad, saved to disk."""
    import datasets

    from unsloth_med.data.sources import load_recipe_data
    from unsloth_med.recipes import get_recipe

    paths = [_image(tmp_path / f"{i}.png", "gray", mark=5 * i) for i in range(4)]
    part = {"image": paths + paths, "question": [f"q{i}?" for i in range(8)],
            "answer": ["yes", "no", "left lung", "Yes", "no", "axial", "yes", "no"]}
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    saved = tmp_path / "vqa-rad"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(part, features=features),
                          "test": datasets.Dataset.from_dict(part, features=features).select(range(3))}
                         ).save_to_disk(str(saved))
    splits = load_recipe_data(get_recipe("radiology_vqa"), str(saved))
    assert list(splits["train"]["answer_type"]) == ["closed", "closed", "open", "closed", "closed", "open", "closed",
                                                    "closed"]
    assert splits["test"][2]["question"] == "q2?" and splits["test"][2]["target"] == "left lung"


def test_saved_hf_datasets_in_messages_and_llava_form_with_image_lists(tmp_path, monkeypatch):
    """OpenAI `messages` with an `images` list feature (two per row), and LLaVA `conversations` with one Image
    feature, saved to disk: the images (stored as bytes) are written to the cache once by content and the rows
    take the same shape as a listing's (image, more_images, messages, target)."""
    import datasets

    from unsloth_med.data.sources import load_recipe_data
    from unsloth_med.recipes import get_recipe

    monkeypatch.setenv("UNSLOTH_MED_CACHE", str(tmp_path / "cache"))
    prior, current = _image(tmp_path / "prior.png", "gray", 2), _image(tmp_path / "current.png", "gray", 20)
    turns = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                          {"type": "text", "text": "Compare with the prior study."}]},
             {"role": "assistant", "content": [{"type": "text", "text": "The opacity is new."}]}]
    chat = datasets.Features({"images": datasets.List(datasets.Image()),
                              "messages": [{"role": datasets.Value("string"),
                                            "content": [{"type": datasets.Value("string"),
                                                         "text": datasets.Value("string")}]}]})
    rows = {"images": [[prior, current]] * 3, "messages": [turns] * 3}
    saved = tmp_path / "reports"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=chat),
                          "test": datasets.Dataset.from_dict(rows, features=chat).select(range(1))}
                         ).save_to_disk(str(saved))
    splits = load_recipe_data(get_recipe("vqa"), str(saved))
    row = splits["train"][0]
    first, more = Path(row["image"]), [Path(p) for p in json.loads(row["more_images"])]
    assert first.parent == tmp_path / "cache" / "hf-images" and len(more) == 1 and more[0].is_file()
    assert first.read_bytes() == Path(prior).read_bytes() and more[0].read_bytes() == Path(current).read_bytes()
    assert row["target"] == "The opacity is new." and len(splits["train"]) == 3 and len(splits["test"]) == 1
    assert [p["type"] for p in json.loads(row["messages"])[0]["content"]] == ["image", "image", "text"]
    assert len(list((tmp_path / "cache" / "hf-images").iterdir())) == 2  # each image once, by content

    llava = datasets.Features({"image": datasets.Image(), "conversations": [{"from": datasets.Value("string"),
                                                                             "value": datasets.Value("string")}]})
    record = {"image": [prior] * 4, "conversations": [[{"from": "human", "value": "<image>\nAny effusion?"},
                                                       {"from": "gpt", "value": "No."}]] * 4}
    one = tmp_path / "llava"
    datasets.Dataset.from_dict(record, features=llava).save_to_disk(str(one))  # no test split: one is held out
    held = load_recipe_data(get_recipe("vqa"), str(one))
    assert len(held["train"]) + len(held["test"]) == 4 and len(held["test"]) >= 1
    assert held["train"][0]["target"] == "No." and json.loads(held["train"][0]["more_images"]) == []
