"""A clinical researcher's own data, in the shapes medical VLM work has: VQA-RAD / SLAKE / PathVQA question
listings and saved datasets, LLaVA / OpenAI / LLaMA-Factory conversations, two views of one patient, images in
sub-folders. Real X-rays (the bone-break data), real files, the package's own loaders; no model."""
from __future__ import annotations

import base64
import csv
import json
import logging
import shutil
from pathlib import Path

import pytest

from unsloth_med.data.tables import load_hf_table, load_table
from unsloth_med.errors import DataError


@pytest.fixture
def xrays(bone_break_dir, tmp_path) -> list[Path]:
    """Twelve real X-rays copied into the test's folder (JPEGs of different sizes)."""
    found = sorted(bone_break_dir.rglob("*.jpg"))[:12]
    assert len(found) == 12
    folder = tmp_path / "src"
    folder.mkdir()
    return [Path(shutil.copy(path, folder / f"x{k}.jpg")) for k, path in enumerate(found)]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("UNSLOTH_MED_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _vqa_rad_listing(folder: Path, xrays: list[Path]) -> Path:
    """VQA-RAD's own JSON: image_name, question, answer (a number now and then), answer_type CLOSED/OPEN, three
    questions per image, no split column."""
    rows = []
    for k, xray in enumerate(xrays):
        shutil.copy(xray, folder / f"synpic{100 + k}.jpg")
        for question, answer, kind in (("Is there a fracture?", "yes" if k % 2 else "no", "CLOSED"),
                                       ("How many bones are broken?", k % 3, "OPEN"),
                                       ("Which bone is broken?", "radius", "OPEN")):
            rows.append({"qid": len(rows), "image_name": f"synpic{100 + k}.jpg", "question": question,
                         "answer": answer, "answer_type": kind, "phrase_type": "freeform"})
    path = folder / "VQA_RAD Dataset Public.json"
    path.write_text(json.dumps(rows))
    return path


# ----------------------------------------------------------------------------- held-out splits keep images apart
def test_a_question_listing_without_a_split_holds_out_whole_images(tmp_path, xrays):
    """Three questions per X-ray and no split column: the held-out test questions are about images that no
    training question shows (a row-wise hold-out put every test image in training too)."""
    listing = _vqa_rad_listing(tmp_path, xrays)
    splits = load_table(listing, task="vqa", image_column="image_name", test_fraction=0.25, seed=1)
    train_images, test_images = set(splits["train"]["image"]), set(splits["test"]["image"])
    assert len(test_images) == 3 and len(train_images) == 9  # a quarter of the 12 images, all their questions
    assert not train_images & test_images
    assert len(splits["test"]) == 9 and len(splits["train"]) == 27
    assert sorted(set(splits["test"]["answer_type"])) == ["closed", "open"]
    assert "0" in list(splits["train"]["target"]) + list(splits["test"]["target"])  # a numeric answer 0 is an answer


def test_conversations_about_one_image_stay_in_one_split(tmp_path, xrays):
    """LLaVA-Med style: several conversations per image (and two-view rows sharing an image) are held out
    together."""
    rows = []
    for k, xray in enumerate(xrays):
        for question in ("Describe the image.", "Is there a fracture?"):
            rows.append({"image": xray.name, "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                                                {"from": "gpt", "value": f"answer {k}"}]})
    rows.append({"image": [xrays[0].name, xrays[1].name],  # two views: ties images 0 and 1 together
                 "conversations": [{"from": "human", "value": "<image><image>Compare."},
                                   {"from": "gpt", "value": "same"}]})
    listing = xrays[0].parent / "llava.json"
    listing.write_text(json.dumps(rows))
    for seed in range(4):
        splits = load_table(listing, task="vqa", test_fraction=0.3, seed=seed)
        used = {split: {path for row in splits[split] for path in [row["image"], *json.loads(row["more_images"])]}
                for split in ("train", "test")}
        assert used["test"] and not used["train"] & used["test"], seed
        assert len(splits["train"]) + len(splits["test"]) == 25


def test_a_saved_dataset_without_a_test_split_holds_out_whole_images(tmp_path, xrays):
    """PathVQA saved with save_to_disk, only a train split, each row carrying its own copy of the image (bytes):
    the images are told apart by content, and no image is in both splits."""
    import datasets
    from PIL import Image

    from unsloth_med.data.splits import image_key

    rows = {"image": [], "question": [], "answer": []}
    for k, xray in enumerate(xrays):
        for question, answer in (("is there a fracture?", "yes" if k % 2 else "no"), ("what is shown?", "bone")):
            rows["image"].append(Image.open(xray).convert("L"))
            rows["question"].append(question)
            rows["answer"].append(answer)
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    saved = tmp_path / "pathvqa"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(str(saved))
    splits = load_hf_table(str(saved), task="vqa", test_fraction=0.25, seed=3)
    keys = {split: {image_key(image) for image in splits[split].cast_column("image", datasets.Image(decode=False))
                    ["image"]} for split in ("train", "test")}
    assert len(keys["test"]) == 3 and len(keys["train"]) == 9
    assert not keys["train"] & keys["test"]
    assert len(splits["test"]) == 6 and len(splits["train"]) == 18


# ----------------------------------------------------------------------------- images as chat exports write them
def test_openai_messages_with_base64_data_url_images(tmp_path, xrays, cache):
    """OpenAI-style chats carry images inline (data:image/jpeg;base64,...): each is written once into the cache by
    content and trained on like a file; before, the path check died with 'OSError: File name too long'."""
    from PIL import Image

    from unsloth_med.data.images import load_image

    inline = [f"data:image/jpeg;base64,{base64.b64encode(x.read_bytes()).decode()}" for x in xrays[:4]]
    lines = []
    for k, url in enumerate(inline):
        for question in ("Is there a fracture?", "Which bone?"):
            lines.append({"messages": [
                {"role": "system", "content": "You are a radiologist."},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": question}]},
                {"role": "assistant", "content": f"answer {k}"}], "split": "test" if k == 3 else "train"})
    lines.append({"messages": [{"role": "user", "content": [{"type": "image", "image": xrays[5].name},
                                                           {"type": "text", "text": "And this one?"}]},
                               {"role": "assistant", "content": "no"}], "split": "train"})
    listing = xrays[0].parent / "chats.jsonl"
    listing.write_text("".join(json.dumps(line) + "\n" for line in lines))
    splits = load_table(listing, task="vqa")
    assert len(splits["train"]) == 7 and len(splits["test"]) == 2
    first = splits["train"][0]
    assert Path(first["image"]).parent == cache / "hf-images" and len(first["id"]) < 60
    assert load_image(first["image"]).size == Image.open(xrays[0]).convert("RGB").size
    assert Path(splits["train"][6]["image"]) == xrays[5]  # a plain path beside them resolves as before
    assert len({row["image"] for row in splits["train"]}) == 4  # one cached file per distinct inline image

    broken = [{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;"
                                                                                              "base64,@@not-base64"}}]},
                            {"role": "assistant", "content": "x"}]}]
    (tmp_path / "broken.jsonl").write_text(json.dumps(broken[0]) + "\n")
    with pytest.raises(DataError, match="no valid base64"):
        load_table(tmp_path / "broken.jsonl", task="vqa")


def test_conversations_with_an_empty_or_null_answer_are_skipped_and_counted(xrays, caplog):
    """An empty (or JSON null) assistant answer is not trained on nor scored against: the conversation is skipped
    with a count, as question listings skip rows without an answer. A null answer is never the text 'None'."""
    def chat(k, answer):
        return {"image": xrays[k].name, "conversations": [{"from": "human", "value": "<image>\nFracture?"},
                                                          {"from": "gpt", "value": answer}]}

    rows = [chat(k, "yes") for k in range(6)] + [chat(6, ""), chat(7, None), chat(8, "  ")]
    rows.append({"image": xrays[9].name, "conversations": [  # the first of two answers is empty
        {"from": "human", "value": "<image>\nFracture?"}, {"from": "gpt", "value": None},
        {"from": "human", "value": "Where?"}, {"from": "gpt", "value": "radius"}]})
    listing = xrays[0].parent / "llava.json"
    listing.write_text(json.dumps(rows))
    with caplog.at_level(logging.WARNING):
        splits = load_table(listing, task="vqa", test_fraction=0.34)
    kept = list(splits["train"]) + list(splits["test"])
    assert len(kept) == 6 and {row["target"] for row in kept} == {"yes"}
    assert "4 conversations with an empty assistant answer were skipped" in caplog.text
    assert not any("None" in row["messages"] for row in kept)


# ----------------------------------------------------------------------------- several images per question
@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_question_about_two_views_of_one_patient(tmp_path, xrays, fmt):
    """A question listing whose image cell lists two views (a JSON list, or its text in a CSV cell), the images in
    per-patient sub-folders: both images belong to the row, in order; before, the list's text was taken for one
    path and the listing was refused as 'images do not exist'."""
    records = []
    for p in range(5):
        folder = tmp_path / "images" / f"patient{p}"
        folder.mkdir(parents=True)
        views = [shutil.copy(xrays[2 * p], folder / "ap.jpg"), shutil.copy(xrays[2 * p + 1], folder / "lat.png")]
        records.append({"image": [str(Path(v).relative_to(tmp_path)) for v in views],
                        "question": "Is there a fracture?", "answer": "yes" if p % 2 else "no",
                        "split": "test" if p == 4 else "train"})
    listing = tmp_path / f"qa.{fmt}"
    if fmt == "csv":
        with listing.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows([{**r, "image": json.dumps(r["image"])} for r in records])
    else:
        listing.write_text("".join(json.dumps(r) + "\n" for r in records))
    splits = load_table(listing, task="vqa")
    assert len(splits["train"]) == 4 and len(splits["test"]) == 1
    row = splits["test"][0]
    assert row["image"] == str(tmp_path / "images" / "patient4" / "ap.jpg")
    assert json.loads(row["more_images"]) == [str(tmp_path / "images" / "patient4" / "lat.png")]
    assert row["id"] == "images/patient4/ap.jpg" and row["target"] == "no"


# ----------------------------------------------------------------------------- SLAKE / VQA-RAD layouts
def _slake(root: Path, xrays: list[Path]) -> Path:
    """SLAKE as published: imgs/xmlab<N>/source.jpg, and train.json / validate.json / test.json beside imgs/
    (img_name relative to imgs/, English and Chinese questions, answer_type CLOSED/OPEN)."""
    for name, ks in (("train", range(0, 6)), ("validate", range(6, 8)), ("test", range(8, 10))):
        rows = []
        for k in ks:
            (root / "imgs" / f"xmlab{k}").mkdir(parents=True, exist_ok=True)
            shutil.copy(xrays[k], root / "imgs" / f"xmlab{k}" / "source.jpg")
            for lang, question, answer, kind in (("en", "Is this a fracture?", "Yes", "CLOSED"),
                                                 ("zh", "这是骨折吗?", "是", "CLOSED"),
                                                 ("zh", "这张图片是用什么方式拍摄的?", "X光", "OPEN")):
                rows.append({"img_id": k, "img_name": f"xmlab{k}/source.jpg", "question": question, "answer": answer,
                             "q_lang": lang, "answer_type": kind, "modality": "X-Ray", "qid": len(rows)})
        (root / f"{name}.json").write_text(json.dumps(rows, ensure_ascii=False))
    return root


def test_slake_as_published_gets_errors_that_say_what_to_do(tmp_path, xrays):
    """The SLAKE folder is not taken for class folders; its JSON beside imgs/ says where the images are; moved into
    imgs/, the listing loads with its own column names, Chinese answers and answer types."""
    from unsloth_med.data.tables import load_source

    root = _slake(tmp_path / "Slake1.0", xrays)
    with pytest.raises(DataError, match=r"holds 3 listings \(test.json, train.json, validate.json\).*split column"):
        load_source(None, str(root), task="vqa")
    with pytest.raises(DataError, match=r"'xmlab0/source.jpg' is in the sub-folder 'imgs'.*'imgs/xmlab0/source.jpg'"):
        load_table(root / "train.json", task="vqa")  # img_name is found without --image_column
    shutil.move(root / "train.json", root / "imgs" / "train.json")
    splits = load_table(root / "imgs" / "train.json", task="vqa", vqa={"answer_type": "answer_type"},
                        test_fraction=0.34)
    rows = list(splits["train"]) + list(splits["test"])
    assert len(rows) == 18 and {row["target"] for row in rows} == {"Yes", "是", "X光"}
    assert {(row["target"], row["answer_type"]) for row in rows} == {("Yes", "closed"), ("是", "closed"),
                                                                     ("X光", "open")}
    assert rows[0]["image"] == str(root / "imgs" / rows[0]["image_id"]) and rows[0]["q_lang"] in ("en", "zh")


def test_openai_answers_are_stripped_as_sharegpt_answers_are(xrays):
    """An OpenAI / LLaMA-Factory answer written "\\nRight.\\n" trains and scores as "Right.", as a ShareGPT answer
    does: Gemma 3's own template trims every text, and a leading newline merges with other templates' headers."""
    lines = [{"messages": [{"role": "user", "content": [{"type": "image", "image": x.name},
                                                        {"type": "text", "text": "  Which side?\n"}]},
                           {"role": "assistant", "content": part}], "split": "train"}
             for x, part in zip(xrays[:2], ["\nRight.\n", [{"type": "text", "text": " Left. "}]])]
    lines.append({**lines[0], "split": "test"})
    listing = xrays[0].parent / "chats.jsonl"
    listing.write_text("".join(json.dumps(line) + "\n" for line in lines))
    rows = load_table(listing, task="vqa")["train"]
    assert sorted(row["target"] for row in rows) == ["Left.", "Right."]
    assert "messages" in rows.column_names
    assert all(json.dumps(row["messages"]).count("Which side?\\n") == 0 for row in rows)


# ----------------------------------------------------------------------------- Parquet, as the Hub keeps datasets
def test_parquet_files_and_a_hub_download_folder_load_as_datasets(tmp_path, xrays):
    """VQA-RAD as `huggingface-cli download` leaves it (data/train-*.parquet, data/test-*.parquet, images embedded
    as bytes) and one .parquet file given as --data_dir load with their splits; before, both were refused ('is not
    a listing', 'no class folders')."""
    import datasets

    from unsloth_med.data.tables import detect_format, load_source

    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string")})

    def part(images):
        rows = [({"bytes": x.read_bytes(), "path": None}, q, a) for x in images
                for q, a in (("Is there a fracture?", "yes"), ("Which bone?", "radius"))]
        return datasets.Dataset.from_dict(dict(zip(("image", "question", "answer"), map(list, zip(*rows)))),
                                          features=features)

    hub = tmp_path / "vqa-rad"
    (hub / "data").mkdir(parents=True)
    (hub / "README.md").write_text("---\nlicense: cc0-1.0\n---\n")
    part(xrays[:6]).to_parquet(str(hub / "data" / "train-00000-of-00001.parquet"))
    part(xrays[6:8]).to_parquet(str(hub / "data" / "test-00000-of-00001.parquet"))
    assert detect_format(str(hub)) == "hf"
    splits = load_source(None, str(hub), task="vqa")
    assert len(splits["train"]) == 12 and len(splits["test"]) == 4  # the data's own test split is kept
    assert splits["test"][0]["question"] == "Is there a fracture?"

    single = tmp_path / "train.parquet"
    part(xrays[:10]).to_parquet(str(single))
    splits = load_source(None, str(single), task="vqa", seed=1)
    assert len(splits["train"]) + len(splits["test"]) == 20 and len(splits["test"]) == 2  # one whole image held out


def test_parquet_images_written_as_plain_bytes_structs_load_as_images(tmp_path, xrays):
    """A Parquet file written by pyarrow or pandas keeps {"bytes", "path"} image cells as a plain struct, without
    the Hugging Face Image feature's metadata. Before, each cell's printed text became the image "path" and the
    row id (hundreds of kilobytes of b'\\xff\\xd8...' in every id and log line, and no image could be read)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from unsloth_med.data.images import load_image
    from unsloth_med.data.tables import load_source

    images = [{"bytes": x.read_bytes(), "path": None} for x in xrays[:4] for _ in range(2)]
    table = pa.table({"image": images, "question": ["Is there a fracture?", "Which bone?"] * 4,
                      "answer": ["yes", "radius"] * 4, "split": ["train"] * 6 + ["test"] * 2})
    assert pa.types.is_struct(table.schema.field("image").type)
    pq.write_table(table, tmp_path / "qa.parquet")
    splits = load_source(None, str(tmp_path / "qa.parquet"), task="vqa")
    rows = list(splits["train"]) + list(splits["test"])
    assert len(rows) == 8 and len(splits["test"]) == 2
    assert all(len(str(row["id"])) < 40 for row in rows), rows[0]["id"][:80]
    assert load_image(rows[0]["image"]).size == load_image(str(xrays[0])).size
    # and a bare binary column (the bytes alone) as well
    pq.write_table(table.set_column(0, "image", pa.array([x["bytes"] for x in images], pa.binary())),
                   tmp_path / "qa.parquet")
    rows = list(load_source(None, str(tmp_path / "qa.parquet"), task="vqa")["train"])
    assert len(rows) == 6 and all(len(str(row["id"])) < 40 for row in rows), rows[0]["id"][:80]
    assert load_image(rows[0]["image"]).size == load_image(str(xrays[0])).size


def test_conversation_rows_are_named_by_their_image_as_listed(tmp_path, xrays):
    """Each patient's images in a sub-folder under the same names (patient0/view0.jpg, patient1/view0.jpg): a
    conversation row's id is its image's path as listed, as a question row's is, so ids of two patients never
    read as one image ('view0.jpg#3' was patient1's) and a prediction or a skipped row leads back to its file."""
    rows = []
    for p in range(3):
        (tmp_path / f"patient{p}").mkdir()
        shutil.copy(xrays[p], tmp_path / f"patient{p}" / "view0.jpg")
        for question in ("Fracture?", "Which bone?"):
            rows.append({"image": f"patient{p}/view0.jpg", "split": "test" if p == 2 else "train",
                         "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                           {"from": "gpt", "value": "yes"}]})
    listing = tmp_path / "llava.json"
    listing.write_text(json.dumps(rows))
    splits = load_table(listing, task="vqa")
    assert list(splits["train"]["id"]) == ["patient0/view0.jpg", "patient0/view0.jpg#2", "patient1/view0.jpg",
                                           "patient1/view0.jpg#2"]
    assert list(splits["test"]["id"]) == ["patient2/view0.jpg", "patient2/view0.jpg#2"]
    assert all(Path(row["image"]) == tmp_path / row["id"].split("#")[0] for row in splits["train"])


def test_openai_answers_written_as_numbers_are_answers(xrays):
    """VQA-RAD's counts converted to OpenAI messages as JSON numbers: `"content": 2` and `{"type": "text", "text": 0}`
    are the answers '2' and '0' (before: a TypeError from inside the reader, and an answer 0 read as empty and its
    row skipped); content that is neither text nor parts is a DataError naming the row."""
    def chat(k, answer):
        return {"messages": [{"role": "user", "content": [{"type": "image", "image": xrays[k].name},
                                                          {"type": "text", "text": "How many fractures?"}]},
                             {"role": "assistant", "content": answer}], "split": "test" if k >= 4 else "train"}

    lines = [chat(0, 2), chat(1, 0), chat(2, [{"type": "text", "text": 0}]), chat(3, 1.5), chat(4, "1")]
    listing = xrays[0].parent / "counts.jsonl"
    listing.write_text("".join(json.dumps(line) + "\n" for line in lines))
    splits = load_table(listing, task="vqa")
    assert list(splits["train"]["target"]) == ["2", "0", "0", "1.5"] and list(splits["test"]["target"]) == ["1"]
    listing.write_text(json.dumps(chat(0, {"text": "2"})) + "\n")
    with pytest.raises(DataError, match=r"row 1, 'messages' turn 2: content is a dict"):
        load_table(listing, task="vqa")


def test_a_saved_dataset_with_a_missing_image_file_still_loads_for_the_image_checks(tmp_path, xrays):
    """A caption dataset of image paths, one of them gone, no test split: the whole-image hold-out reads each image
    to group copies; the missing one is left to the image checks (skipped and counted), not a FileNotFoundError
    from inside the hold-out."""
    import datasets

    paths = [str(x) for x in xrays[:9]] + [str(tmp_path / "gone.jpg")]
    datasets.Dataset.from_dict({"image": paths, "caption": [f"finding {k}" for k in range(10)]}).save_to_disk(
        str(tmp_path / "captions"))
    splits = load_hf_table(str(tmp_path / "captions"), task="captioning", test_fraction=0.2)
    assert sorted(list(splits["train"]["image"]) + list(splits["test"]["image"])) == sorted(paths)


@pytest.mark.parametrize("answer, kind", [("yes", "closed"), ("No.", "closed"), ("是", "closed"), ("否。", "closed"),
                                          ("X光", "open"), ("left femur", "open")])
def test_without_an_answer_type_column_chinese_yes_no_answers_are_closed(answer, kind):
    """SLAKE asks in English and Chinese: without its answer_type column, 是 / 否 were open questions (and '是。'
    too), while yes / no were closed."""
    from unsloth_med.data.samples import closed_or_open

    assert closed_or_open(answer) == kind
