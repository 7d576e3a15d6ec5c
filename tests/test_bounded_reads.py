"""Images embedded as bytes (a Parquet file, a Hub download: an Image feature) are read a chunk of rows at a time on
the way from loading to training: the whole-image hold-out, --split_by image, validation, the lazy header scan, the
leakage check and --pack_questions hold one or two chunks' image bytes in Python, never a whole split's (an 850 MB
dataset peaked at 1.86 GB before). The splits, ids, hashes and orders stay those of the whole-split reads.

How many images are held at once is measured with tracemalloc: every image is a real X-ray written as a BMP of one
size, so the peak of Python's allocations during a call, over that size, is the number of image payloads alive at
once. Arrow's own buffers (the memory-mapped data) are not Python allocations, and do not count.
"""
from __future__ import annotations

import gc
import io
import json
import random
import tracemalloc
from pathlib import Path

import pytest
from PIL import Image

from unsloth_med.data import images as images_module

SIDE = 320  # a 320x320 grayscale BMP: 103,478 bytes, every image the same size
IMAGES, QUESTIONS = 12, 4  # 48 rows: four questions about each image, as VQA-RAD asks them
CHUNK = 4


def _bmp(path: Path) -> bytes:
    buffer = io.BytesIO()
    with Image.open(path) as image:
        image.convert("L").resize((SIDE, SIDE)).save(buffer, format="BMP")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def xray_bytes(bone_break_dir) -> list[bytes]:
    found = sorted(bone_break_dir.rglob("*.jpg"))[:IMAGES]
    assert len(found) == IMAGES
    payloads = [_bmp(path) for path in found]
    assert len({len(p) for p in payloads}) == 1 and len(set(payloads)) == IMAGES
    return payloads


def _vqa_parquet(path: Path, payloads: list[bytes], *, broken: int | None = None) -> Path:
    import datasets

    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    rows = [({"bytes": b"not an image" if k == broken else payload, "path": None}, f"Question {q}?",
             "yes" if q % 2 else f"bone {k}") for k, payload in enumerate(payloads) for q in range(QUESTIONS)]
    datasets.Dataset.from_dict(dict(zip(("image", "question", "answer"), map(list, zip(*rows)))),
                               features=features).to_parquet(str(path))
    return path


@pytest.fixture(scope="module")
def vqa(tmp_path_factory, xray_bytes):
    """(the parquet file, its 48 rows as loaded: the hold-out's train and test again as one split)."""
    import datasets

    from unsloth_med.data.tables.hf import load_hf_table

    path = _vqa_parquet(tmp_path_factory.mktemp("bounded") / "vqa.parquet", xray_bytes)
    loaded = load_hf_table(str(path), task="vqa", seed=1)
    pooled = datasets.concatenate_datasets([loaded["train"], loaded["test"]])
    assert len(pooled) == IMAGES * QUESTIONS and isinstance(pooled.features["image"], datasets.Image)
    return path, pooled


@pytest.fixture
def chunk(monkeypatch):
    """Small chunks, so that a chunk is a small share of the 48 rows (raising=False: the same test, run against the
    code before chunks existed, fails on its measurement instead of here)."""
    monkeypatch.setattr(images_module, "IMAGE_CHUNK_ROWS", CHUNK, raising=False)
    return CHUNK


def payloads_at_once(call, payload_size: int) -> float:
    """The most image payloads alive at once during call(): the peak of Python's allocations over one image's size.
    A first call runs unmeasured, so that imports and first-use caches are not counted as images."""
    call()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        call()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return (peak - before) / payload_size


def _bounded(name: str, held: float, rows: int) -> None:
    # Two chunks at most (the one being read while the last is still referenced), with room for a few more
    # (decoders' reads, threads); the whole split is 48 rows, and a whole read holds at least that many.
    assert held <= 4 * CHUNK < rows, f"{name}: {held:.1f} images held at once (chunks of {CHUNK}, {rows} rows)"


# ----------------------------------------------------------------------------- one test per place that reads images
def test_whole_image_holdout_hashes_embedded_images_a_chunk_at_a_time(vqa, xray_bytes, chunk):
    """A VQA/caption dataset without a test split holds out whole images, keyed by the SHA-256 of each image's bytes
    (tables/hf.py -> splits.image_groups): every row's bytes were read into one list first (48.7 payloads here)."""
    from unsloth_med.data.splits import image_groups
    from unsloth_med.data.tables.hf import load_hf_table

    path, pooled = vqa
    size = len(xray_bytes[0])
    _bounded("image_groups", payloads_at_once(lambda: image_groups(pooled), size), len(pooled))
    _bounded("load_hf_table hold-out",
             payloads_at_once(lambda: load_hf_table(str(path), task="vqa", seed=1), size), len(pooled))


def test_split_by_image_hashes_embedded_images_a_chunk_at_a_time(vqa, xray_bytes, chunk):
    import datasets

    from unsloth_med.data.splits import split_by_image

    _, pooled = vqa
    splits = datasets.DatasetDict({"train": pooled.select(range(40)), "test": pooled.select(range(40, 48))})
    held = payloads_at_once(lambda: split_by_image(splits, test_fraction=0.25, seed=2), len(xray_bytes[0]))
    _bounded("split_by_image", held, len(pooled))


def test_classification_holdout_of_embedded_images_lists_no_rows(tmp_path, xray_bytes, chunk):
    """A classification dataset with an Image feature and no test split is split by train_test_split; every row,
    with its bytes, was first copied into a list that was then thrown away (25.2 payloads for 24 rows)."""
    import datasets

    from unsloth_med.data.tables.hf import load_hf_table

    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")})
    rows = {"image": [{"bytes": p, "path": None} for p in xray_bytes for _ in range(2)],
            "label": [f"class {k % 3}" for k in range(2 * IMAGES)]}
    path = tmp_path / "classes.parquet"
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    held = payloads_at_once(lambda: load_hf_table(str(path), task="classification", seed=1), len(xray_bytes[0]))
    _bounded("classification hold-out", held, 2 * IMAGES)


def test_validation_reads_embedded_images_a_chunk_at_a_time(vqa, xray_bytes, chunk):
    from unsloth_med.data.validate import validate_split

    _, pooled = vqa
    held = payloads_at_once(lambda: validate_split(pooled, "train", image_size=None, max_bad_fraction=0.1,
                                                   workers=2), len(xray_bytes[0]))
    _bounded("validate_split", held, len(pooled))


def test_lazy_header_scan_reads_embedded_images_a_chunk_at_a_time(vqa, xray_bytes, chunk):
    from unsloth_med.data.lazy import scan_split

    _, pooled = vqa
    held = payloads_at_once(lambda: scan_split(pooled, "train", max_bad_fraction=0.1, workers=2), len(xray_bytes[0]))
    _bounded("scan_split", held, len(pooled))


@pytest.mark.parametrize("check", ["leaked_test_images", "leak_counts", "drop_leaked"])
def test_leakage_checks_read_embedded_images_a_chunk_at_a_time(vqa, xray_bytes, chunk, check):
    from unsloth_med.data import checks

    _, pooled = vqa
    test = pooled.select(range(0, len(pooled), 2))  # 24 rows; every image's questions are in both splits
    leaks = checks.leaked_test_images({"train": pooled, "test": test}, workers=2)
    assert len(leaks) == len(test)
    call = {"leaked_test_images": lambda: checks.leaked_test_images({"train": pooled, "test": test}, workers=2),
            "leak_counts": lambda: checks.leak_counts(test, leaks),
            "drop_leaked": lambda: checks.drop_leaked(test, leaks[:3])}[check]
    held = payloads_at_once(call, len(xray_bytes[0]))
    if check == "leaked_test_images":
        _bounded(check, held, len(pooled))
    else:  # these read the 24 test rows only
        assert held <= 3 * CHUNK < len(test), f"{check}: {held:.1f} images held at once (chunks of {CHUNK})"


def test_packing_questions_reads_embedded_images_a_chunk_at_a_time(vqa, xray_bytes, chunk):
    """--pack_questions read every row, bytes included, with to_list(), and Dataset.from_dict then pickled the packed
    table's bytes for its fingerprint (164 payloads at once here)."""
    from unsloth_med.data.samples import pack_questions

    _, pooled = vqa
    held = payloads_at_once(lambda: pack_questions(pooled, "{question}"), len(xray_bytes[0]))
    _bounded("pack_questions", held, len(pooled))


# ----------------------------------------------------------------------------- the same results as whole-split reads
def _reference_pack_questions(dataset, instruction: str):
    """pack_questions as committed before chunked reads (every row read whole with to_list)."""
    import datasets

    from unsloth_med.data.samples import fill, image_refs

    columns = dataset.column_names
    rows = dataset.to_list()
    groups: dict[str, list[dict]] = {}
    for row in rows:
        key = "\0".join(str(ref) for ref in image_refs(row)) if not row.get("messages") else f"own:{id(row)}"
        groups.setdefault(key, []).append(row)
    packed = []
    for members in groups.values():
        if len(members) == 1:
            packed.append(members[0])
            continue
        first = members[0]
        n_images = len(image_refs(first))
        messages = []
        for k, row in enumerate(members):
            parts = [{"type": "image"} for _ in range(n_images)] if k == 0 else []
            messages.append({"role": "user", "content": parts + [{"type": "text", "text": fill(instruction, row)}]})
            messages.append({"role": "assistant", "content": [{"type": "text", "text": str(row["target"])}]})
        packed.append({**{c: first.get(c) for c in columns}, "messages": json.dumps(messages),
                       "target": str(members[-1]["target"]), "question": members[-1].get("question", ""),
                       "id": f"{first['id']}+{len(members) - 1}"})
    names = list(dict.fromkeys([*columns, "messages"]))
    table = {name: [row.get(name) if row.get(name) is not None else "" for row in packed] for name in names}
    features = datasets.Features({name: dataset.features.get(name, datasets.Value("string")) for name in names})
    return datasets.Dataset.from_dict(table, features=features)


def test_chunked_reads_give_the_whole_split_results(tmp_path, xray_bytes, monkeypatch):
    """On a small Parquet file of embedded X-rays (one broken, rows with an image group, rows with a second image
    as a file), read 3 rows at a time (so chunks cut through an image's questions): the hold-out, --split_by image,
    validation, the header scan, the leakage check and packing give what the whole-split reads give, computed here
    by reference implementations of the committed code."""
    import datasets

    from unsloth_med.data import checks, lazy, validate
    from unsloth_med.data.images import header_size, raw_image_lists
    from unsloth_med.data.samples import pack_questions
    from unsloth_med.data.splits import held_out_groups, image_groups, image_key, joined_groups, split_by_image
    from unsloth_med.data.tables.hf import load_hf_table

    monkeypatch.setattr(images_module, "IMAGE_CHUNK_ROWS", 3, raising=False)
    path = _vqa_parquet(tmp_path / "vqa.parquet", xray_bytes[:8], broken=5)
    second = tmp_path / "second.bmp"
    second.write_bytes(xray_bytes[9])

    def reference_groups(dataset) -> list[str]:  # splits.image_groups as committed: the whole column at once
        groups = list(dataset["image_group"][:]) if "image_group" in dataset.column_names else [""] * len(dataset)

        def key(source):
            try:
                return image_key(source)
            except OSError:
                return f"unreadable:{source.get('path')}"
        return joined_groups([f"group:{g}"] if g else [key(s) for s in images]
                             for g, images in zip(groups, raw_image_lists(dataset)))

    loaded = load_hf_table(str(path), task="vqa", seed=4, test_fraction=0.25)
    whole = datasets.load_dataset("parquet", data_files={"train": str(path)})["train"]
    whole = whole.cast_column("image", datasets.Image(decode=False))
    keys = reference_groups(whole)
    held = held_out_groups(keys, test_fraction=0.25, seed=4)
    assert loaded["test"]["id"][:] == [f"train/{k}" for k, key in enumerate(keys) if key in held]
    assert loaded["train"]["id"][:] == [f"train/{k}" for k, key in enumerate(keys) if key not in held]
    assert len(loaded["test"]) and len(loaded["test"]) % QUESTIONS == 0  # whole images, with all their questions

    # Rows with an image group and rows with a second image (a file): groups joined across chunks.
    pooled = datasets.concatenate_datasets([loaded["train"], loaded["test"]]).remove_columns("image_group")
    n = len(pooled)
    pooled = pooled.add_column("image_group", ["shared" if k % 7 == 0 else "" for k in range(n)])
    pooled = pooled.add_column("more_images", [json.dumps([str(second)]) if k % 5 == 2 else "[]" for k in range(n)])
    assert image_groups(pooled) == reference_groups(pooled)
    splits = datasets.DatasetDict({"train": pooled.select(range(n - 8)), "test": pooled.select(range(n - 8, n))})
    resplit = split_by_image(splits, test_fraction=0.3, seed=2)
    pooled_again = datasets.concatenate_datasets([splits["train"], splits["test"]])
    ref_keys = reference_groups(pooled_again)
    distinct = sorted(set(ref_keys))
    random.Random(2).shuffle(distinct)
    ref_held = set(distinct[:min(max(1, round(len(distinct) * 0.3)), len(distinct) - 1)])
    ids = pooled_again["id"][:]
    assert resplit["test"]["id"][:] == [i for i, k in zip(ids, ref_keys) if k in ref_held]
    assert resplit["train"]["id"][:] == [i for i, k in zip(ids, ref_keys) if k not in ref_held]

    # Validation: the broken image's rows skipped, in order; the second image's file checked once in all chunks.
    calls: list = []
    real_problem = validate._problem

    def counted(source, image_size):
        calls.append(source if isinstance(source, str) else None)
        return real_problem(source, image_size)

    monkeypatch.setattr(validate, "_problem", counted)
    clean, skipped = validate.validate_split(pooled, "train", image_size=None, max_bad_fraction=0.5, workers=2)
    rows = raw_image_lists(pooled)
    bad = [k for k, images in enumerate(rows) if images[0]["bytes"] == b"not an image"]
    assert [s["id"] for s in skipped] == [pooled["id"][k] for k in bad] and len(bad) == QUESTIONS
    assert clean["id"][:] == [i for k, i in enumerate(pooled["id"][:]) if k not in bad]
    assert calls.count(str(second)) == 1 and calls.count(None) == n  # every row's bytes once, the file once

    # The header scan: the same sizes, skipped rows and kept rows as one whole read.
    scanned, scan_skipped = lazy.scan_split(pooled, "train", max_bad_fraction=0.5, workers=2)
    assert [s["id"] for s in scan_skipped] == [pooled["id"][k] for k in bad]
    good = [k for k in range(n) if k not in bad]
    assert scanned["id"][:] == [pooled["id"][k] for k in good]
    assert scanned["source_size"][:] == [list(header_size(rows[k][0])) for k in good]
    assert scanned["more_source_sizes"][:] == [[list(header_size(s)) for s in rows[k][1:]] for k in good]

    # Leakage: the same entries, in the same order, as the whole lists give find_leaked_test_images.
    test_rows = range(0, len(clean), 5)  # an image's other questions are in train: leaked
    train, test = clean.select([k for k in range(len(clean)) if k % 5]), clean.select(test_rows)
    leaks = checks.leaked_test_images({"train": train, "test": test}, workers=2)
    flat = {}
    for name, part in (("train", train), ("test", test)):
        images, owners = [], []
        for k, row_images in enumerate(raw_image_lists(part)):
            images += row_images
            owners += [k] * len(row_images)
        flat[name] = images, [part["id"][k] for k in owners]
    reference = checks.find_leaked_test_images(flat["train"][0], flat["test"][0], train_ids=flat["train"][1],
                                               test_ids=flat["test"][1], workers=2)
    assert leaks and [{k: v for k, v in e.items() if not k.endswith("_label")} for e in leaks] == reference
    assert checks.drop_leaked(test, leaks[:2])["id"][:] == [
        i for i in test["id"][:] if i not in {e["test_id"] for e in leaks[:2]}]
    counted_images = checks.leak_counts(test, leaks)
    test_keys = [str(g) if g else f"sha256:{image_key(images[0])}" for g, images in
                 zip(test["image_group"][:], raw_image_lists(test))]
    assert counted_images["test_images"] == len(set(test_keys)) and counted_images["test_rows"] == len(test)

    # Packing: the same rows, features and Arrow table as the whole-split packing.
    for data in (clean.remove_columns(["image_group"]), loaded["train"]):
        packed, counts = pack_questions(data, "Q: {question}")
        expected = _reference_pack_questions(data, "Q: {question}")
        assert packed.features == expected.features and packed.column_names == expected.column_names
        assert packed.to_list() == expected.to_list() and packed.data.table.equals(expected.data.table)
        assert counts == {"rows": len(data), "samples": len(expected)} and len(expected) < len(data)


def test_unnamed_unreadable_images_stay_apart_across_chunks():
    """An embedded image cell with neither bytes nor a path is unreadable; with unreadable_ok each such row is its own
    group, whichever chunk it is read in. Keyed by id() of the cell, rows of later chunks reused the addresses of
    earlier chunks' freed cells and were joined (640 rows: 131 groups read in chunks against 640 read whole); an
    empty (None) cell raised TypeError."""
    import datasets

    from unsloth_med.data.splits import image_groups

    features = datasets.Features({"image": datasets.Image(decode=False), "id": datasets.Value("string")})
    rows = {"image": [{"bytes": None, "path": ""}] * 640 + [None] * 3, "id": [str(k) for k in range(643)]}
    keys = image_groups(datasets.Dataset.from_dict(rows, features=features), unreadable_ok=True)
    assert len(set(keys)) == 643


def test_a_jsonl_chat_export_with_inline_images_is_read_a_line_at_a_time(tmp_path, xray_bytes, monkeypatch):
    """A JSONL listing whose images are base64 data URLs (an OpenAI-style export) is mostly image text. It was read
    as one string, split into lines and parsed: three copies of the file at once (3.0x its size). Read a line at a
    time, the peak is one copy (the parsed rows) and a little. A report holding U+2028, which JSON allows unescaped,
    is one line, not two (str.splitlines split it and the row was refused as invalid JSON)."""
    import base64

    from unsloth_med.data.tables.listings import load_table

    monkeypatch.setenv("UNSLOTH_MED_CACHE", str(tmp_path / "cache"))
    listing = tmp_path / "export.jsonl"
    with listing.open("w", encoding="utf-8") as out:
        for k, payload in enumerate(xray_bytes * 3):
            url = "data:image/bmp;base64," + base64.b64encode(payload).decode()
            report = f"Study {k}:\u2028no fracture" if k == 5 else f"study {k}"
            out.write(json.dumps({"image": url, "text": report, "split": "test" if k % 4 == 0 else "train"},
                                 ensure_ascii=False) + "\n")
    size = listing.stat().st_size
    assert "\u2028" in listing.read_text(encoding="utf-8")
    load_table(listing, task="captioning")  # imports and the image cache first: the measured call reads the listing
    gc.collect()
    tracemalloc.start()
    try:
        splits = load_table(listing, task="captioning")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"peak {peak / size:.2f}x the file's size")
    assert peak < 1.5 * size, (peak, size)  # 3.0x before
    assert len(splits["train"]) + len(splits["test"]) == 3 * IMAGES
    assert "Study 5:\u2028no fracture" in list(splits["train"]["target"]) + list(splits["test"]["target"])
