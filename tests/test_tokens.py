"""From a conversation to the tokens and labels the model trains on, for every tiny family, on real X-rays.

Checked by decoding the tokens whose label is not -100: only the assistant answers are trained (every assistant
turn, each with its end-of-turn token), image tokens sit in the turn of their image, padding is on the right and
never trained, and the prompt that evaluation renders is the training conversation cut before its last answer.
"""
from __future__ import annotations

import glob
import json
import os
import shutil

import pytest
import torch

from unsloth_med.backends.hf import HFBackend
from unsloth_med.config import ModelArgs
from unsloth_med.data.images import load_image
from unsloth_med.errors import DataError
from unsloth_med.models import prompting
from unsloth_med.models.families import family_of, image_fit
from unsloth_med.recipes.bone_fracture import RECIPE

FAMILIES = ("mistral3", "mllama", "qwen2_5_vl", "gemma3")
IMAGE_SIZE = 128

# google/gemma-3-*-it's own chat template (as transformers' Gemma3 processor tests carry it). The gemma3 family keeps
# a checkpoint's own template (use_own_template): it merges the system prompt into the first user turn, trims every
# text part and refuses turns that do not alternate.
GEMMA3_HUB_TEMPLATE = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""


def _text(text):
    return {"type": "text", "text": text}


IMAGE = {"type": "image"}


@pytest.fixture(scope="module")
def xrays(bone_break_dir):
    pattern = str(bone_break_dir / "Bone Break Classification" / "Bone Break Classification" / "{}" / "Train" / "*.jpg")
    return [sorted(glob.glob(pattern.format(label)))[0]
            for label in ("Avulsion fracture", "Spiral Fracture", "Oblique fracture")]


def _rows(xrays, family: str) -> list[dict]:
    """Rows as the loaders write them: the recipe's single turn, a system prompt and two answered turns, an image
    that comes only in the second user turn, an empty instruction, and (families that take several images) a
    Chinese conversation whose second image is a user turn of its own."""
    rows = [
        {"image": xrays[0], "target": "Avulsion fracture", "id": "single"},
        {"image": xrays[1], "target": "Yes.", "id": "system", "messages": json.dumps([
            {"role": "system", "content": [_text("You are a radiologist.")]},
            {"role": "user", "content": [IMAGE, _text("Which bone?")]},
            {"role": "assistant", "content": [_text("The wrist.")]},
            {"role": "user", "content": [_text("Fractured?")]},
            {"role": "assistant", "content": [_text("Yes.")]}])},
        {"image": xrays[2], "target": "Spiral.", "id": "late-image", "messages": json.dumps([
            {"role": "user", "content": [_text("I will send an X-ray.")]},
            {"role": "assistant", "content": [_text("Please send it.")]},
            {"role": "user", "content": [IMAGE, _text("Type?")]},
            {"role": "assistant", "content": [_text("Spiral.")]}])},
        {"image": xrays[2], "target": "Oblique fracture", "id": "empty", "messages": json.dumps([
            {"role": "user", "content": [IMAGE, _text("")]},
            {"role": "assistant", "content": [_text("Oblique fracture")]}])},
    ]
    if family != "mllama":  # one image per conversation
        rows.append({"image": xrays[0], "more_images": json.dumps([xrays[1]]), "target": "右侧", "id": "chinese",
                     "messages": json.dumps([
                         {"role": "user", "content": [IMAGE, _text("第一张图是什么？")]},
                         {"role": "assistant", "content": [_text("骨折")]},
                         {"role": "user", "content": [IMAGE]},
                         {"role": "assistant", "content": [_text("右侧")]}])})
    return rows


def _load(path):
    model, processor = HFBackend().load(str(path), ModelArgs())
    return model, processor, family_of(model.config), image_fit(model.config, IMAGE_SIZE)


def _trained_runs(labels) -> list[tuple[int, int]]:
    """[start, end) of each run of consecutive labelled positions."""
    runs, start = [], None
    for k, trained in enumerate((labels != -100).tolist() + [False]):
        if trained and start is None:
            start = k
        elif not trained and start is not None:
            runs.append((start, k))
            start = None
    return runs


def _image_token_id(model) -> int:
    config = model.config
    return getattr(config, "image_token_id", None) or config.image_token_index


@pytest.mark.parametrize("family", FAMILIES)
def test_only_every_answer_and_its_end_of_turn_is_trained_and_images_sit_in_their_turn(tiny_path, xrays, family):
    model, processor, fam, fit = _load(tiny_path(family))
    rows = _rows(xrays, family)
    batch = HFBackend().collator(model, processor, RECIPE, image_size=fit, max_seq_length=4096)(rows)
    tokenizer, image_id = processor.tokenizer, _image_token_id(model)
    for i, row in enumerate(rows):
        ids, labels, mask = batch["input_ids"][i], batch["labels"][i], batch["attention_mask"][i]
        length = int(mask.sum())
        assert mask[:length].all() and not mask[length:].any(), row["id"]  # right padding
        assert (labels[length:] == -100).all(), row["id"]  # padding never trained
        conversation = RECIPE.to_conversation(row, images=[None] * 2)
        answers = [m["content"][0]["text"] for m in conversation if m["role"] == "assistant"]
        runs = _trained_runs(labels)
        assert [tokenizer.decode(ids[a:b]) for a, b in runs] == [a + fam.response_end for a in answers], row["id"]
        assert torch.equal(labels[labels != -100], ids[labels != -100])
        assert runs[-1][1] <= length
        # The image tokens before each answer: exactly those of the images of the user turn(s) since the last one.
        refs = [row["image"], *json.loads(row.get("more_images") or "[]")]
        per_image = []
        for ref in refs:
            alone = prompting.encode(processor, [prompting.render(processor, [{"role": "user", "content": [IMAGE]}])],
                                     [[load_image(ref, fit)]])
            per_image.append(int((alone["input_ids"] == image_id).sum()))
        pending, expected, count = iter(per_image), [], 0
        for turn in conversation:
            if turn["role"] == "assistant":
                expected.append(count)
                count = 0
            elif isinstance(turn["content"], list):
                count += sum(next(pending) for part in turn["content"] if part["type"] == "image")
        found, seen, previous_end = [], 0, 0
        for start, end in runs:
            found.append(int((ids[previous_end:start] == image_id).sum()))
            previous_end = end
            seen += found[-1]
        assert found == expected, (row["id"], found, expected)
        assert seen == int((ids == image_id).sum())  # no image token after the last answer


@pytest.mark.parametrize("family", FAMILIES)
def test_the_evaluation_prompt_is_the_training_conversation_cut_before_its_last_answer(tiny_path, xrays, family):
    from unsloth_med.evaluate.inputs import prompt_text

    model, processor, fam, fit = _load(tiny_path(family))
    collator = HFBackend().collator(model, processor, RECIPE, image_size=fit, max_seq_length=4096)
    for row in _rows(xrays, family):
        prompt = prompt_text(processor, RECIPE, row)
        # what generation (export checks, GGUF) renders with the template's generation prompt is the same text
        assert prompt == prompting.render(processor, RECIPE.prompt(example=row), add_generation_prompt=True)
        full = prompting.render(processor, RECIPE.to_conversation(row, images=[None] * 2))
        assert full.startswith(prompt) and full[len(prompt):].rstrip("\n") == row["target"] + fam.response_end
        # and as tokens: the prompt, encoded with the row's images as evaluation does, is the training sequence up to
        # the last trained answer
        images = [load_image(ref, fit) for ref in [row["image"], *json.loads(row.get("more_images") or "[]")]]
        prompt_ids = prompting.encode(processor, [prompt], [images], padding_side="left")["input_ids"][0]
        trained = collator([row])
        start = _trained_runs(trained["labels"][0])[-1][0]
        assert trained["input_ids"][0, :start].tolist() == prompt_ids.tolist(), row["id"]


@pytest.fixture
def gemma3_hub(tiny_path, tmp_path):
    """The tiny gemma3 model with the real Gemma 3 checkpoints' own chat template."""
    path = tmp_path / "gemma3-hub-template"
    shutil.copytree(tiny_path("gemma3"), path)
    (path / "chat_template.jinja").write_text(GEMMA3_HUB_TEMPLATE)
    return path


def test_gemma3_own_template_trims_answers_and_training_trains_the_trimmed_answer(gemma3_hub, xrays, tmp_path):
    """An answer with spaces or a newline around it (an OpenAI `messages` export keeps them) is rendered trimmed
    by Gemma 3's template; the trained tokens are the trimmed answer's. Without looking for the answer as rendered,
    the first batch holding it stopped training with "the answer tokens were not found ... check families.py"."""
    import datasets

    from unsloth_med.config import LoraArgs, parse_config
    from unsloth_med.evaluate.inputs import prompt_text
    from unsloth_med.train import build_trainer

    backend = HFBackend()
    model, processor, fam, fit = _load(gemma3_hub)
    assert "first_user_prefix" in processor.chat_template  # the checkpoint's own template is the one in use
    rows = [{"image": xrays[i], "target": answer, "id": f"report-{i}", "more_images": "[]", "messages": json.dumps([
        {"role": "system", "content": [_text("You are a radiologist.")]},
        {"role": "user", "content": [IMAGE, _text("Describe the image.")]},
        {"role": "assistant", "content": [_text(" A fracture.\n")]},
        {"role": "user", "content": [_text("Which side?")]},
        {"role": "assistant", "content": [_text(answer)]}])} for i, answer in enumerate(["Left. ", "\nRight.\n"])]
    collator = backend.collator(model, processor, RECIPE, image_size=fit, max_seq_length=4096)
    batch = collator(rows)
    for i, answer in enumerate(["Left.", "Right."]):
        spans = [processor.tokenizer.decode(batch["input_ids"][i, a:b]) for a, b in _trained_runs(batch["labels"][i])]
        assert spans == ["A fracture.<end_of_turn>", f"{answer}<end_of_turn>"]
        assert prompt_text(processor, RECIPE, rows[i]).endswith("Which side?<end_of_turn>\n<start_of_turn>model\n")
    # and a real trainer takes those batches (two steps on the hf backend)
    model = backend.add_adapters(model, LoraArgs(), ModelArgs(), seed=0)
    config = parse_config(["--output_dir", str(tmp_path / "run"), "--max_steps", "2", "--per_device_train_batch_size",
                           "2", "--gradient_accumulation_steps", "1", "--warmup_steps", "0", "--save_strategy", "no"],
                          RECIPE)
    trainer = build_trainer(model, processor, datasets.Dataset.from_list(rows), collator, config.training,
                            tmp_path / "run")
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(0 < loss < 100 for loss in losses)


def _not_alternating(xrays):
    return {"image": xrays[1], "target": "Yes.", "id": "sharegpt-4", "messages": json.dumps([
        {"role": "user", "content": [IMAGE]},
        {"role": "user", "content": [_text("Is there a fracture?")]},
        {"role": "assistant", "content": [_text("Yes.")]}])}


def test_a_conversation_the_template_refuses_is_a_data_error_naming_the_sample(gemma3_hub, xrays):
    from unsloth_med.evaluate.inputs import prompt_text

    model, processor, _, fit = _load(gemma3_hub)
    collator = HFBackend().collator(model, processor, RECIPE, image_size=fit, max_seq_length=4096)
    row = _not_alternating(xrays)
    with pytest.raises(DataError, match=r"Sample sharegpt-4: .*roles user -> user -> assistant.*must alternate"):
        collator([{"image": xrays[0], "target": "Avulsion fracture", "id": "fine"}, row])
    with pytest.raises(DataError, match="must alternate"):
        prompt_text(processor, RECIPE, {**row, "messages": json.dumps(json.loads(row["messages"]) * 2)})


def _unsloth_collator_class():
    """Unsloth's own UnslothVisionDataCollator where unsloth_zoo is installed (the GPU extra). It needs no GPU to
    collate: off a GPU, unsloth_zoo's own switch skips its GPU set-up."""
    if not torch.cuda.is_available():
        os.environ.setdefault("UNSLOTH_ZOO_DISABLE_GPU_INIT", "1")
    vision_utils = pytest.importorskip("unsloth_zoo.vision_utils")
    return vision_utils.UnslothVisionDataCollator


@pytest.mark.parametrize("family", FAMILIES)
def test_unsloths_collator_trains_the_same_tokens_as_the_hf_collator(tiny_path, xrays, family):
    collator_cls = _unsloth_collator_class()
    from unsloth_med.backends.unsloth import UnslothCollator

    model, processor, _, fit = _load(tiny_path(family))
    rows = _rows(xrays, family)
    hf = HFBackend().collator(model, processor, RECIPE, image_size=fit, max_seq_length=4096)(rows)
    unsloth = UnslothCollator(model, processor, RECIPE, image_size=fit, max_seq_length=4096,
                              collator_cls=collator_cls)(rows)
    assert torch.equal(hf["input_ids"], unsloth["input_ids"])
    assert torch.equal(hf["labels"], unsloth["labels"])


def test_unsloths_collator_names_the_sample_its_template_refuses(gemma3_hub, xrays):
    collator_cls = _unsloth_collator_class()
    from unsloth_med.backends.unsloth import UnslothCollator

    model, processor, _, fit = _load(gemma3_hub)
    collator = UnslothCollator(model, processor, RECIPE, image_size=fit, max_seq_length=4096, collator_cls=collator_cls)
    with pytest.raises(DataError, match=r"Sample sharegpt-4: .*must alternate"):
        collator([_not_alternating(xrays)])


@pytest.mark.parametrize("family", FAMILIES)
def test_samples_too_long_for_max_seq_length_are_found_before_training(tiny_path, xrays, family):
    """A long report in a caption or conversation dataset used to stop training at the first batch holding it (maybe
    hours in; a --resume met it again). The check before training counts each row as the collator does (text
    tokens, plus each image's expansion at its prepared size) and names exactly the rows the collator refuses."""
    import datasets

    from unsloth_med.backends.hf import VisionCollator
    from unsloth_med.errors import SampleTooLongError
    from unsloth_med.recipes.radiology_caption import RECIPE as CAPTION

    model, processor, fam, fit = _load(tiny_path(family))
    report = "Transverse fracture of the distal radius with dorsal angulation. " * 12
    rows = [{"image": x, "target": text, "id": f"{k}-{len(text)}",
             "image_shape": "{}x{}".format(*load_image(x, fit).size)}  # as image preparation writes it
            for k, (x, text) in enumerate(zip(xrays, ["No fracture.", report, report[: len(report) // 3]]))]
    collator = VisionCollator(processor, fam, CAPTION, image_size=fit, max_seq_length=100_000)
    exact = {row["id"]: int(collator([row])["attention_mask"].sum()) for row in rows}
    limit = sorted(exact.values())[1] + 1  # the long report is over it; the short ones fit
    dataset = datasets.Dataset.from_list(rows)
    over = prompting.samples_over_length(processor, CAPTION, dataset, limit)
    assert [sample_id for sample_id, _ in over] == [rows[1]["id"]]
    assert over[0][1] == exact[rows[1]["id"]]  # the collator's own count
    with pytest.raises(SampleTooLongError, match=rf"1 of 3 training samples need more than max_seq_length={limit}"):
        prompting.check_sample_lengths(processor, CAPTION, dataset, limit, IMAGE_SIZE)
    prompting.check_sample_lengths(processor, CAPTION, dataset, exact[rows[1]["id"]], IMAGE_SIZE)  # it fits
    with pytest.raises(SampleTooLongError):  # what the collator says at the same limit, mid-training
        VisionCollator(processor, fam, CAPTION, image_size=fit, max_seq_length=limit)([rows[1]])
