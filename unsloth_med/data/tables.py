"""Your own data, without writing Python: listings, class folders and Hugging Face datasets.

Every loader here ends where every source in `sources.py` ends: a `datasets.DatasetDict` with
"train" and "test" splits and the columns `image` (a file path, or an undecoded HF image), `target`
(the answer text) and `id` (a stable name for messages and reports).

- **Listings** (`load_table`): a CSV/TSV, JSONL or JSON file with one row per image. The image column
  (`path`, `image`, `file`, `imageurl`, ... or `--image_column`) holds a path, resolved against the
  listing's own folder when relative, or an http(s) URL (downloaded once into the cache; offline, a
  clear NetworkError). The answer is one column (`label`/`class` for classification, `text`/`caption`
  for captioning, or `--target_column`) or a template over several columns
  (`"Product: {title}, Category: {category}, Full Price: {price}"`). An optional `split` column
  (train/test; val/validation/dev become the test split when there is no test) picks the splits;
  without one, a seeded split holds out `test_fraction` of every class (stratified).
- **Class folders** (`load_folders`): `<class>/*.png`, `<class>/{train,test}/*.png` or
  `{train,test}/<class>/*.png` (split names in any case; val/valid/validation accepted); the same
  stratified hold-out when there are no split folders. Single sub-folders on the way down (Kaggle's
  `X/X/`) are skipped.
- **Hugging Face datasets** (`load_hf_table`): a hub name or a `save_to_disk` folder, with the same
  column names or template; an image column of URLs is downloaded like a listing's.

`load_source(source, data_dir, ...)` picks the loader from what `data_dir` (or the source's default
`id`) is: a listing file; a folder holding exactly one listing (that listing); a `save_to_disk` folder;
another folder (class folders); anything else is a HF dataset name. `sources.load_recipe_data` calls it
for sources of kind "table" and "auto".
"""
from __future__ import annotations

import csv
import difflib
import hashlib
import json
import logging
import os
import random
import string
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from ..errors import ConfigError, DataError, NetworkError
from .conversations import conversation_column, conversation_row, vqa_fields
from .images import IMAGE_EXTENSIONS

if TYPE_CHECKING:
    from datasets import DatasetDict

log = logging.getLogger(__name__)

LISTING_EXTENSIONS = (".csv", ".tsv", ".jsonl", ".ndjson", ".json")
IMAGE_COLUMNS = ("path", "image", "image_path", "filepath", "file_path", "file", "filename", "file_name",
                 "imageurl", "image_url", "url")
LABEL_COLUMNS = ("label", "class", "class_name", "category", "diagnosis", "target")
TEXT_COLUMNS = ("text", "caption", "report", "findings", "description", "answer", "target")
SPLIT_COLUMNS = ("split", "subset", "fold")
TRAIN_NAMES = ("train", "training")
TEST_NAMES = ("test", "testing")
VAL_NAMES = ("val", "valid", "validation", "dev", "eval")
OFFLINE_ENV = "UNSLOTH_MED_OFFLINE"  # "1": never try to download image URLs
URL_TIMEOUT_S = 20
MIN_CLASS_SIZE_FOR_TEST = 3  # classes smaller than this stay entirely in train when a split is held out


# ----------------------------------------------------------------------------- small helpers
def is_url(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower().startswith(("http://", "https://"))


def is_listing(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(LISTING_EXTENSIONS)


def _split_of(value: str, train_names: Sequence[str], test_names: Sequence[str]) -> str | None:
    """'train', 'test', 'val' or None for a split value / folder name (any case)."""
    v = str(value).strip().casefold()
    if v in {n.casefold() for n in (*TRAIN_NAMES, *train_names)}:
        return "train"
    if v in {n.casefold() for n in (*TEST_NAMES, *test_names)}:
        return "test"
    if v in VAL_NAMES:
        return "val"
    return None


def _pick_column(columns: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str, where: str,
                 flag: str) -> str:
    """The column named `wanted` (exact, then ignoring case), or the first candidate present."""
    if wanted:
        if wanted in columns:
            return wanted
        folded = {c.casefold(): c for c in columns}
        if wanted.casefold() in folded:
            return folded[wanted.casefold()]
        close = difflib.get_close_matches(wanted, list(columns), n=1)
        raise DataError(f"{where} has no {what} column '{wanted}' (columns: {', '.join(columns)})."
                        + (f" Did you mean '{close[0]}'?" if close else "") + f" Set {flag} to one of its columns.")
    folded = {c.casefold(): c for c in columns}
    for candidate in candidates:
        if candidate in folded:
            return folded[candidate]
    raise DataError(f"{where}: no {what} column found (looked for {', '.join(candidates)}; columns: "
                    f"{', '.join(columns)}). Set {flag} to the column that holds it.")


def template_fields(template: str) -> list[str]:
    """Field names used by a str.format template ("{title} {price}" -> ["title", "price"])."""
    try:
        return [field for _, field, _, _ in string.Formatter().parse(template) if field]
    except ValueError as exc:
        raise ConfigError(f"Target template {template!r} is not a valid format string ({exc}). "
                          "Use {column} placeholders; write {{ and }} for literal braces.") from exc


def _apply_aliases(row: Mapping[str, Any], aliases: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """Row values, with each aliased name taken from the first of its columns (in the given order) that the
    row fills; a name not among its own aliases is tried last. Column names match ignoring case."""
    out = dict(row)
    folded = {str(k).casefold(): k for k in row}
    for name, options in aliases.items():
        order = list(options) + ([name] if name not in options else [])
        for option in order:
            key = folded.get(option.casefold())
            if key is not None and row[key] not in (None, ""):
                out[name] = row[key]
                break
    return out


def _format_target(template: str, row: Mapping[str, Any]) -> str:
    values = {k: ("" if v is None else str(v).strip()) for k, v in row.items()}
    return template.format_map(values).strip()


def _check_template(template: str, columns: Sequence[str], aliases: Mapping[str, Sequence[str]], where: str) -> None:
    have = {c.casefold() for c in columns}
    missing = []
    for field in template_fields(template):
        options = (field, *aliases.get(field, ()))
        if not any(o.casefold() in have for o in options):
            missing.append(field if len(options) == 1 else f"{field} (or {', '.join(options[1:])})")
    if missing:
        raise DataError(f"{where}: the target template {template!r} needs columns that are missing: "
                        f"{', '.join(missing)} (columns: {', '.join(columns)}). "
                        "Rename the columns or change the template.")


# ----------------------------------------------------------------------------- reading listings
def read_listing(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a CSV/TSV (header line), JSONL (one object per line) or JSON (a list of objects) file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Listing not found: {path}. Pass the CSV/JSONL file (or its folder) with --data_dir.")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc}). Save the listing as UTF-8.") from exc
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {number}: not valid JSON ({exc.msg}). "
                                "Each line must be one JSON object.") from exc
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {number}: a JSON {type(row).__name__}, not an object with named fields.")
            rows.append(row)
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc}).") from exc
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DataError(f"{path}: expected a JSON list of objects (one per image), or JSONL (one object per line).")
        rows = data
    else:
        delimiter = "\t" if suffix == ".tsv" else _sniff_delimiter(text)
        reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
        if not reader.fieldnames:
            raise DataError(f"{path} is empty: expected a header line (e.g. path,label,split) and one row per image.")
        rows = []
        for number, row in enumerate(reader, 2):
            if None in row:
                raise DataError(f"{path}, line {number}: more fields than the header has columns "
                                f"({', '.join(reader.fieldnames)}). Quote values that contain '{delimiter}'.")
            rows.append({str(k).strip(): (v.strip() if isinstance(v, str) else v) for k, v in row.items()})
    if not rows:
        raise DataError(f"{path} lists no images (it has no data rows).")
    return rows


def _sniff_delimiter(text: str) -> str:
    header = text.splitlines()[0] if text else ""
    counts = {d: header.count(d) for d in (",", ";", "\t", "|")}
    best = max(counts, key=counts.get)
    return best if counts[best] else ","


# ----------------------------------------------------------------------------- splitting
def stratified_split(rows: Sequence[dict], *, test_fraction: float, seed: int, stratify: bool = True,
                     key: str = "target") -> tuple[list[dict], list[dict]]:
    """Hold out `test_fraction` of the rows (of every class when stratified), seeded and order-independent."""
    if not 0.0 < float(test_fraction) < 1.0:
        raise ConfigError(f"test_fraction must be between 0 and 1 (got {test_fraction}).")
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[str(row[key]) if stratify else ""].append(row)
    train, test, too_small = [], [], []
    for name in sorted(groups):
        group = sorted(groups[name], key=lambda r: str(r.get("id", "")))
        random.Random(f"{seed}:{name}").shuffle(group)
        n = len(group)
        if stratify and n < MIN_CLASS_SIZE_FOR_TEST:
            n_test = 0
            too_small.append(name)
        else:
            n_test = min(max(1, round(n * test_fraction)), n - 1) if n > 1 else 0
        test += group[:n_test]
        train += group[n_test:]
    if too_small:
        log.warning("Classes with fewer than %d examples stay entirely in the training split (none held out for "
                    "testing): %s", MIN_CLASS_SIZE_FOR_TEST, ", ".join(too_small))
    return train, test


def _assign_splits(rows: list[dict], *, where: str, stratify: bool, test_fraction: float, seed: int,
                   had_split_column: bool) -> dict[str, list[dict]]:
    """rows carry 'split' in {'train', 'test', 'val', None}: the final train and test lists."""
    by_split: dict[Any, list[dict]] = defaultdict(list)
    for row in rows:
        by_split[row.pop("split", None)].append(row)
    train, test, val = by_split["train"], by_split["test"], by_split["val"]
    if by_split[None] and had_split_column:
        raise DataError(f"{where}: {len(by_split[None])} rows have an empty split value. Fill it in (train or test), "
                        "or remove the split column to hold out a test split automatically.")
    train += by_split[None]
    if val and test:
        log.warning("%s: %d validation rows are not used (evaluation uses the %d test rows).",
                    where, len(val), len(test))
    elif val:
        log.info("%s: no test rows; the %d validation rows are the test split.", where, len(val))
        test = val
    if not test:
        if not train:
            raise DataError(f"{where}: no usable rows.")
        how = "no split column" if not had_split_column else "no test rows"
        train, test = stratified_split(train, test_fraction=test_fraction, seed=seed, stratify=stratify)
        if not test:
            raise DataError(f"{where}: too few examples to hold out a test split ({len(train)} rows"
                            + (f"; every class has fewer than {MIN_CLASS_SIZE_FOR_TEST}" if stratify else "")
                            + "). Add a split column (train/test) or more examples.")
        log.warning("%s: %s; held out %d of %d examples for testing (%s, %.0f%%, seed %d).", where, how, len(test),
                    len(train) + len(test), "stratified by class" if stratify else "random", 100 * test_fraction, seed)
    if not train:
        raise DataError(f"{where}: no training rows (every row is in the test split).")
    return {"train": train, "test": test}


def _check_labels(splits: dict[str, list[dict]], labels: Sequence[str], where: str) -> None:
    if not labels:
        return
    known = set(labels)
    unknown = Counter(r["target"] for rows in splits.values() for r in rows if r["target"] not in known)
    if unknown:
        shown = ", ".join(f"'{k}' ({v})" for k, v in unknown.most_common(10))
        raise DataError(f"{where}: labels not among the configured classes: {shown}. Add them to --labels "
                        f"(now: {', '.join(labels)}) or fix the data.")
    missing = sorted(known - {r["target"] for r in splits["train"]})
    if missing:
        log.warning("%s: no training examples for classes %s", where, ", ".join(missing))


def _dedupe_ids(rows: list[dict]) -> None:
    seen: Counter = Counter()
    for row in rows:
        seen[row["id"]] += 1
        if seen[row["id"]] > 1:
            row["id"] = f"{row['id']}#{seen[row['id']]}"


def _to_datasetdict(splits: dict[str, list[dict]]) -> "DatasetDict":
    """Rows -> string columns: image, target, id, then whatever else the rows carry (question, messages, ...)."""
    import datasets

    extra = sorted({k for rows in splits.values() for r in rows for k in r} - {"image", "target", "id", "split"})
    names = ("image", "target", "id", *extra)
    features = datasets.Features({k: datasets.Value("string") for k in names})
    return datasets.DatasetDict({
        name: datasets.Dataset.from_dict({k: [str(r.get(k, "")) for r in rows] for k in names}, features=features)
        for name, rows in splits.items()
    })


# ----------------------------------------------------------------------------- image locations
def resolve_image(value: Any, base_dir: Path) -> str:
    """A listing's image value as a loadable location: URLs unchanged, relative paths against base_dir."""
    text = str(value).strip()
    if is_url(text):
        return text
    if text.lower().startswith("file://"):
        text = urllib.parse.unquote(urllib.parse.urlparse(text).path)
    path = Path(text).expanduser()
    return str(path if path.is_absolute() else base_dir / path)


def url_cache_path(url: str) -> Path:
    from .sources import cache_dir

    suffix = Path(urllib.parse.urlparse(url).path).suffix.lower()
    suffix = suffix if suffix in IMAGE_EXTENSIONS else ""
    return cache_dir() / "images" / (hashlib.sha256(url.encode()).hexdigest()[:32] + (suffix or ".img"))


def _download(url: str) -> Path:
    dest = url_cache_path(url)
    if dest.is_file() and dest.stat().st_size:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    request = urllib.request.Request(url, headers={"User-Agent": "unsloth-med"})
    with urllib.request.urlopen(request, timeout=URL_TIMEOUT_S) as response:
        data = response.read()
    tmp = dest.with_suffix(dest.suffix + f".{os.getpid()}.part")
    tmp.write_bytes(data)
    tmp.replace(dest)
    return dest


def fetch_urls(urls: Iterable[str], *, where: str, workers: int = 8) -> dict[str, str | None]:
    """{url: local cached path, or None when that URL failed}; NetworkError when there is no network at all."""
    urls = sorted(set(urls))
    if not urls:
        return {}
    cached = {u: str(url_cache_path(u)) for u in urls if url_cache_path(u).is_file()}
    todo = [u for u in urls if u not in cached]
    if not todo:
        return cached
    hint = ("Without network, download the images on a connected machine and list local paths instead "
            "(a path column, relative to the listing's folder), or copy the cache folder "
            f"{url_cache_path(todo[0]).parent} over.")
    if os.environ.get(OFFLINE_ENV, "").lower() in ("1", "true", "yes"):
        raise NetworkError(f"{where}: {len(todo)} images are URLs (e.g. {todo[0]}) and {OFFLINE_ENV} is set, so "
                           f"nothing is downloaded. {hint}")
    try:  # one probe: a missing network fails here once, not once per image
        cached[todo[0]] = str(_download(todo[0]))
    except urllib.error.HTTPError as exc:
        log.warning("%s: could not download %s (HTTP %s)", where, todo[0], exc.code)
        cached[todo[0]] = None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        if cached:  # most images came from the cache: train on those, say which could not be fetched
            log.warning("%s: %d image URLs are not in the cache and cannot be downloaded now (%s: %s); those rows "
                        "are dropped. First: %s", where, len(todo), type(exc).__name__, reason, todo[0])
            return {**cached, **{u: None for u in todo}}
        raise NetworkError(f"{where}: {len(todo)} images are URLs and the first one ({todo[0]}) could not be "
                           f"downloaded ({type(exc).__name__}: {reason}). {hint}") from exc
    log.info("%s: downloading %d images into %s", where, len(todo) - 1, url_cache_path(todo[0]).parent)

    def one(url: str) -> tuple[str, str | None, str]:
        try:
            return url, str(_download(url)), ""
        except (urllib.error.URLError, OSError, ValueError) as exc:
            return url, None, f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"

    failures = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for url, local, problem in pool.map(one, todo[1:]):
            cached[url] = local
            if local is None:
                failures.append(f"{url} ({problem})")
    if failures:
        log.warning("%s: %d of %d image URLs could not be downloaded; those rows are dropped. First: %s",
                    where, len(failures), len(urls), "; ".join(failures[:3]))
    if len([u for u in urls if cached.get(u)]) == 0:
        raise NetworkError(f"{where}: none of the {len(urls)} image URLs could be downloaded. {hint}")
    return cached


def _localize(rows: list[dict], where: str) -> list[dict]:
    """Download URL images (cached) and drop rows whose download failed."""
    urls = [r["image"] for r in rows if is_url(r["image"])]
    if not urls:
        return rows
    local = fetch_urls(urls, where=where)
    kept = []
    for row in rows:
        if is_url(row["image"]):
            if not local.get(row["image"]):
                continue
            row["image"] = local[row["image"]]
        kept.append(row)
    return kept


def _check_paths_exist(rows: list[dict], base_dir: Path, where: str) -> None:
    """Fail early, with the resolution rule, when most listed paths do not exist (a wrong base folder)."""
    sample = [r for r in rows if not is_url(r["image"])][:50]
    missing = [r for r in sample if not Path(r["image"]).exists()]
    if sample and len(missing) > len(sample) // 2:
        example = missing[0]
        raise DataError(
            f"{where}: {len(missing)} of the first {len(sample)} listed images do not exist (e.g. '{example['id']}' -> "
            f"{example['image']}). Relative paths are resolved against the listing's folder ({base_dir}); write "
            "them relative to it, or absolute."
        )


# ----------------------------------------------------------------------------- listings
def rows_from_records(records: Sequence[Mapping[str, Any]], *, where: str, base_dir: Path | None = None,
                      task: str = "classification", image_column: str | None = None,
                      target_column: str | None = None, target_template: str | None = None,
                      column_aliases: Mapping[str, Sequence[str]] | None = None, split_column: str | None = "split",
                      train_split: str = "train", test_split: str = "test",
                      vqa: Mapping[str, str | None] | None = None) -> tuple[list[dict], bool]:
    """Rows {image, target, id, split} from raw records; returns (rows, whether a split column was used).

    task "vqa": question/answer columns named by `vqa` (conversations.vqa_fields), or a `messages` /
    `conversations` column (conversations.conversation_row)."""
    aliases = dict(column_aliases or {})
    columns = list(dict.fromkeys(k for r in records[:1000] for k in r))
    chat_col = conversation_column(columns) if task == "vqa" else None
    if chat_col:
        return _conversation_rows(records, columns, chat_col, where=where, base_dir=base_dir,
                                  image_column=image_column, split_column=split_column,
                                  split_names=(train_split, test_split))
    image_col = _pick_column(columns, image_column or None, (*aliases.get("image", ()), *IMAGE_COLUMNS), "image",
                             where, "--image_column")
    vqa_cols = _vqa_columns(columns, vqa or {}, where) if task == "vqa" else None
    target_column = vqa_cols["answer"] if vqa_cols else target_column
    if target_template:
        _check_template(target_template, columns, aliases, where)
        target_col = None
    else:
        candidates = LABEL_COLUMNS if task == "classification" else TEXT_COLUMNS
        target_col = _pick_column(columns, target_column or None, candidates, "label" if task == "classification"
                                  else "text", where, "--target_column")
    split_col = _split_column(columns, split_column)
    rows, dropped, bad_splits = [], 0, Counter()
    for record in records:
        image = record.get(image_col)
        target = (_format_target(target_template, _apply_aliases(record, aliases)) if target_template
                  else ("" if record.get(target_col) is None else str(record.get(target_col)).strip()))
        if image in (None, "") or not target:
            dropped += 1
            continue
        split = None
        if split_col is not None and str(record.get(split_col) or "").strip():
            split = _split_of(record[split_col], (train_split,), (test_split,))
            if split is None:
                bad_splits[str(record[split_col])] += 1
                continue
        # vqa: every other column rides along, for instructions that name it ("{modality}: {question}")
        extra = {str(k): "" if v is None else str(v) for k, v in record.items() if k not in (image_col, split_col)
                 } if vqa_cols else {}
        rows.append({**extra, "image": str(image).strip() if base_dir is None else resolve_image(image, base_dir),
                     "target": target, "id": str(image).strip(), "split": split,
                     **({"image_id": str(image).strip(), **vqa_fields(record, **vqa_cols)} if vqa_cols else {})})
    if bad_splits:
        raise DataError(f"{where}: unknown values in split column '{split_col}': "
                        f"{', '.join(f'{k!r} ({v})' for k, v in bad_splits.most_common(5))}. Use train or test "
                        "(val/validation/dev count as test when there is no test).")
    if dropped:
        log.warning("%s: %d rows without an image or a %s were skipped", where, dropped,
                    "target" if target_template else f"'{target_col}'")
    if not rows:
        raise DataError(f"{where}: no row has both an image and a target.")
    _dedupe_ids(rows)
    return rows, split_col is not None


def _split_column(columns: Sequence[str], split_column: str | None) -> str | None:
    if not split_column:
        return None
    folded = {c.casefold(): c for c in columns}
    return folded.get(split_column.casefold()) or (
        next((folded[c] for c in SPLIT_COLUMNS if c in folded), None) if split_column == "split" else None)


def _vqa_columns(columns: Sequence[str], names: Mapping[str, str | None], where: str) -> dict[str, str | None]:
    """The question/answer columns (required) and the answer-type / image-group columns (when present)."""
    folded = {c.casefold(): c for c in columns}
    out: dict[str, str | None] = {
        "question": _pick_column(columns, names.get("question") or "question", (), "question", where,
                                 "--question_column"),
        "answer": _pick_column(columns, names.get("answer") or "answer", (), "answer", where, "--answer_column")}
    for key, default in (("answer_type", "answer_type"), ("image_group", "image_group")):
        wanted = names.get(key) or default
        if names.get(key) and wanted.casefold() not in folded:
            _pick_column(columns, wanted, (), key.replace("_", "-"), where, f"--{key}_column")  # raises, with columns
        out[key] = folded.get(wanted.casefold())
    return out


def _conversation_rows(records: Sequence[Mapping[str, Any]], columns: Sequence[str], chat_col: str, *, where: str,
                       base_dir: Path | None, image_column: str | None, split_column: str | None,
                       split_names: tuple[str, str]) -> tuple[list[dict], bool]:
    """Rows of a LLaVA/ShareGPT `conversations` or OpenAI/HF `messages` listing (data/conversations.py)."""
    image_col = next((c for c in ((image_column,) if image_column else IMAGE_COLUMNS) if c in columns), None)
    split_col = _split_column(columns, split_column)
    rows, dropped = [], 0
    for number, record in enumerate(records, 1):
        row = conversation_row(record, chat_col, image_col, f"{where}, row {number}")
        if row is None:
            dropped += 1
            continue
        if base_dir is not None:
            row["image"] = resolve_image(row["image"], base_dir)
            row["more_images"] = json.dumps([resolve_image(v, base_dir) for v in json.loads(row["more_images"])])
        value = str(record.get(split_col) or "").strip() if split_col else ""
        split = _split_of(value, split_names[:1], split_names[1:]) if value else None
        rows.append({**row, "id": str(record.get("id") or f"{Path(row['image']).name}"), "split": split})
    if dropped:
        log.warning("%s: %d conversations without an image were skipped", where, dropped)
    if not rows:
        raise DataError(f"{where}: no conversation has an image.")
    _dedupe_ids(rows)
    return rows, split_col is not None


def load_table(path: str | os.PathLike, *, task: str = "classification", image_column: str | None = None,
               target_column: str | None = None, target_template: str | None = None,
               column_aliases: Mapping[str, Sequence[str]] | None = None, split_column: str | None = "split",
               labels: Sequence[str] = (), test_fraction: float = 0.1, seed: int = 3407,
               train_split: str = "train", test_split: str = "test",
               vqa: Mapping[str, str | None] | None = None) -> "DatasetDict":
    """Train/test splits from a CSV/TSV/JSONL/JSON listing (see the module docstring)."""
    path = Path(path).expanduser()
    where = str(path)
    records = read_listing(path)
    rows, had_split = rows_from_records(records, where=where, base_dir=path.resolve().parent, task=task,
                                        image_column=image_column, target_column=target_column,
                                        target_template=target_template, column_aliases=column_aliases,
                                        split_column=split_column, train_split=train_split, test_split=test_split,
                                        vqa=vqa)
    _check_paths_exist(rows, path.resolve().parent, where)
    rows = _localize(rows, where)
    splits = _assign_splits(rows, where=where, stratify=task == "classification", test_fraction=test_fraction,
                            seed=seed, had_split_column=had_split)
    _check_labels(splits, labels if task == "classification" else (), where)
    return _to_datasetdict(splits)


# ----------------------------------------------------------------------------- class folders
def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not p.name.startswith("."))


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))


def find_folder_root(root: Path) -> Path:
    """Step down through single sub-folders holding no images (Kaggle's 'X/X/' wrappers)."""
    folder = root
    for _ in range(6):
        subdirs = _subdirs(folder)
        if (len(subdirs) == 1 and not _images_in(folder) and not _images_in(subdirs[0])
                and _split_of(subdirs[0].name, (), ()) is None):
            folder = subdirs[0]
        else:
            break
    return folder


def folder_rows(root: str | os.PathLike, *, train_split: str = "train",
                test_split: str = "test") -> tuple[list[dict], bool, Path]:
    """Rows {image, target, id, split} from class folders; returns (rows, has_split_folders, class root)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"Data folder not found: {root}. "
                        "Pass --data_dir: a folder of class folders, or a CSV/JSONL listing.")
    base = find_folder_root(root)
    top = _subdirs(base)
    split_first = [d for d in top if _split_of(d.name, (train_split,), (test_split,))]
    rows: list[dict] = []
    if split_first and any(_subdirs(d) for d in split_first):
        # {train,test}/<class>/*
        for split_dir in split_first:
            split = _split_of(split_dir.name, (train_split,), (test_split,))
            for class_dir in _subdirs(split_dir):
                rows += [{"image": str(p), "target": class_dir.name, "id": str(p.relative_to(base)), "split": split}
                         for p in _images_in(class_dir)]
        has_splits = True
    else:
        # <class>/{train,test}/* or <class>/*
        has_splits = False
        for class_dir in top:
            parts = [(s, d) for d in _subdirs(class_dir) if (s := _split_of(d.name, (train_split,), (test_split,)))]
            if parts:
                has_splits = True
                for split, where in parts:
                    rows += [{"image": str(p), "target": class_dir.name, "id": str(p.relative_to(base)), "split": split}
                             for p in _images_in(where)]
            rows += [{"image": str(p), "target": class_dir.name, "id": str(p.relative_to(base)),
                      "split": None} for p in _images_in(class_dir)]
    if not rows:
        found = ", ".join(p.name for p in sorted(base.iterdir())[:12]) or "nothing"
        raise DataError(
            f"No images found in class folders under {base} (it contains: {found}). Expected '<class>/*.png', "
            f"'<class>/{{train,test}}/*.png' or '{{train,test}}/<class>/*.png' "
            f"(extensions: {', '.join(IMAGE_EXTENSIONS)}), "
            "or pass a CSV/JSONL listing instead."
        )
    if has_splits and any(r["split"] is None for r in rows):
        loose = sum(r["split"] is None for r in rows)
        log.warning("%s: %d images sit directly in class folders that also have split folders; they go to train.",
                    base, loose)
        for r in rows:
            r["split"] = r["split"] or "train"
    return rows, has_splits, base


def load_folders(root: str | os.PathLike, *, labels: Sequence[str] = (), test_fraction: float = 0.1,
                 seed: int = 3407, train_split: str = "train", test_split: str = "test") -> "DatasetDict":
    """Train/test splits from class folders, with or without split folders (see the module docstring)."""
    rows, has_splits, base = folder_rows(root, train_split=train_split, test_split=test_split)
    splits = _assign_splits(rows, where=str(base), stratify=True, test_fraction=test_fraction, seed=seed,
                            had_split_column=has_splits)
    _check_labels(splits, labels, str(base))
    return _to_datasetdict(splits)


# ----------------------------------------------------------------------------- Hugging Face datasets
def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file()
                                 for name in ("dataset_dict.json", "state.json", "dataset_info.json"))


def load_hf_table(name_or_path: str, *, task: str = "captioning", image_column: str | None = None,
                  target_column: str | None = None, target_template: str | None = None,
                  column_aliases: Mapping[str, Sequence[str]] | None = None, labels: Sequence[str] = (),
                  train_split: str = "train", test_split: str = "test", test_fraction: float = 0.1,
                  seed: int = 3407, vqa: Mapping[str, str | None] | None = None) -> "DatasetDict":
    """Train/test splits from a HF dataset (hub name or save_to_disk folder): image column (an Image feature,
    paths or URLs) and a target column or template; a held-out test split when it has none."""
    import datasets

    from .sources import _redact

    aliases = dict(column_aliases or {})
    try:
        loaded = (datasets.load_from_disk(name_or_path) if Path(name_or_path).exists()
                  else datasets.load_dataset(name_or_path))
    except (ConnectionError, OSError, datasets.exceptions.DatasetNotFoundError) as exc:
        raise NetworkError(
            f"Could not load the Hugging Face dataset '{name_or_path}' ({type(exc).__name__}: {_redact(exc)[:200]}). "
            "Without network access, save it once with `datasets.load_dataset(...).save_to_disk(DIR)` on a "
            "connected machine and pass --data_dir DIR, or export it to a CSV listing. (If you meant a local "
            "folder or file: it does not exist.)"
        ) from exc
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({train_split: loaded})
    names = list(loaded)
    train_name = (next((n for n in names if n == train_split), None)
                  or next((n for n in names if _split_of(n, (train_split,), ()) == "train"), names[0]))
    test_name = (next((n for n in names if n == test_split), None)
                 or next((n for n in names if _split_of(n, (), (test_split,)) == "test"), None)
                 or next((n for n in names if _split_of(n, (), ()) == "val"), None))
    where = f"dataset '{name_or_path}'"
    columns = loaded[train_name].column_names
    image_col = _pick_column(columns, image_column or None, (*aliases.get("image", ()), *IMAGE_COLUMNS), "image",
                             where, "--image_column")
    vqa_cols = _vqa_columns(columns, vqa or {}, where) if task == "vqa" else None
    target_column = vqa_cols["answer"] if vqa_cols else target_column
    if target_template:
        _check_template(target_template, columns, aliases, where)
    else:
        target_col = _pick_column(columns, target_column or None,
                                  LABEL_COLUMNS if task == "classification" else TEXT_COLUMNS,
                                  "label" if task == "classification" else "text", where, "--target_column")

    def targets_of(part) -> list[str]:
        text_cols = [c for c in part.column_names if c != image_col]
        out = []
        for record in part.select_columns(text_cols):
            if target_template:
                out.append(_format_target(target_template, _apply_aliases(record, aliases)))
            else:
                value = record[target_col]
                if task == "classification" and isinstance(part.features[target_col], datasets.ClassLabel):
                    value = part.features[target_col].int2str(value)
                out.append("" if value is None else str(value).strip())
        return out

    def extras_of(part) -> dict[str, list[str]]:
        """VQA: question, answer type (and image group) per row."""
        if not vqa_cols:
            return {}
        text_cols = [c for c in (vqa_cols["question"], vqa_cols["answer"], vqa_cols["answer_type"],
                                 vqa_cols["image_group"]) if c]
        fields = [vqa_fields(record, **vqa_cols) for record in part.select_columns(text_cols)]
        return {key: [str(f.get(key, "")) for f in fields] for key in ("question", "answer_type", "image_group")}

    def convert(part, split_name: str) -> "datasets.Dataset":
        targets = targets_of(part)
        keep = [i for i, t in enumerate(targets) if t]
        if len(keep) < len(targets):
            log.warning("%s/%s: %d rows with an empty target were skipped", where, split_name, len(targets) - len(keep))
            part, targets = part.select(keep), [targets[i] for i in keep]
        extras = extras_of(part)
        if isinstance(part.features[image_col], datasets.Image):
            images = part.select_columns([image_col]).cast_column(image_col, datasets.Image(decode=False))
            images = images.rename_column(image_col, "image") if image_col != "image" else images
            images = images.add_column("target", targets)
            images = images.add_column("id", [f"{split_name}/{i}" for i in range(len(part))])
            for key, values in extras.items():
                images = images.add_column(key, values)
            return images
        values = [str(v).strip() if v is not None else "" for v in part[image_col]]
        rows = [{"image": v, "target": t, "id": v if not is_url(v) else f"{split_name}/{i}", "split": None,
                 **{key: column[i] for key, column in extras.items()}}
                for i, (v, t) in enumerate(zip(values, targets)) if v]
        rows = _localize(rows, f"{where}/{split_name}")
        return _to_datasetdict({"x": rows})["x"]

    train = convert(loaded[train_name], train_name)
    if test_name is None:
        if task == "classification":
            rows = [dict(r, split=None) for r in train]
            parts = (_assign_splits(rows, where=where, stratify=True, test_fraction=test_fraction, seed=seed,
                                    had_split_column=False)
                     if not isinstance(train.features["image"], datasets.Image) else None)
            if parts is not None:
                return _to_datasetdict(parts)
        split = train.train_test_split(test_size=test_fraction, seed=seed)
        log.warning("%s has no test split: holding out %.0f%% of '%s' (seed %d)",
                    where, 100 * test_fraction, train_name, seed)
        out = datasets.DatasetDict({"train": split["train"], "test": split["test"]})
    else:
        out = datasets.DatasetDict({"train": train, "test": convert(loaded[test_name], test_name)})
    if task == "classification" and labels:
        _check_labels({k: [{"target": t} for t in v["target"]] for k, v in out.items()}, labels, where)
    return out


# ----------------------------------------------------------------------------- dispatch
def detect_format(location: str) -> str:
    """'table', 'class_folders' or 'hf' for a --data_dir value (a file, a folder or a dataset name)."""
    path = Path(location).expanduser()
    if path.is_file():
        if is_listing(path):
            return "table"
        raise DataError(f"{path} is not a listing: expected a {', '.join(LISTING_EXTENSIONS)} file, a folder of "
                        "class folders, or a Hugging Face dataset.")
    if path.is_dir():
        if _is_saved_dataset(path):
            return "hf"
        listings = sorted(p for p in path.iterdir() if p.is_file() and is_listing(p))
        if len(listings) == 1:  # a folder with its listing: the listing says what the data is
            return "table"
        if any(_subdirs(find_folder_root(path))):
            return "class_folders"
        raise DataError(f"{path}: no class folders and {'several' if listings else 'no'} listing files "
                        f"({', '.join(p.name for p in listings[:5]) or 'none'}). Pass the listing file itself, "
                        "or a folder with one sub-folder per class.")
    if is_listing(location) or location.startswith((".", "/", "~")):
        raise DataError(f"Data not found: {location}. Pass an existing CSV/JSONL listing, a folder of class folders, "
                        "or a Hugging Face dataset name.")
    return "hf"


def _listing_in(path: Path) -> Path:
    if path.is_file():
        return path
    listings = sorted(p for p in path.iterdir() if p.is_file() and is_listing(p))
    return listings[0]


def load_source(source, data_dir: str | None = None, *, labels: Sequence[str] = (), task: str = "classification",
                seed: int = 3407) -> "DatasetDict":
    """A recipe source of kind "table" or "auto" (see recipes.generic.TableSource) as train/test splits."""
    location = data_dir or getattr(source, "id", "")
    if not location:
        raise DataError("No data given: pass --data_dir (a CSV/JSONL listing, a folder with one sub-folder per class, "
                        "or a Hugging Face dataset name / save_to_disk folder).")
    location = str(location)
    fmt = getattr(source, "data_format", "auto") or "auto"
    fmt = detect_format(location) if fmt == "auto" else fmt
    image_column = getattr(source, "image_column", "") or None
    target_column = getattr(source, "target_column", "") or None
    if not hasattr(source, "data_format"):  # a plain DataSource: its generic defaults mean "detect"
        image_column = None if image_column == "image" else image_column
        target_column = None if target_column == "label" else target_column
    common = dict(test_fraction=float(getattr(source, "test_fraction", 0.1) or 0.1), seed=seed,
                  train_split=getattr(source, "train_split", "train") or "train",
                  test_split=getattr(source, "test_split", "test") or "test")
    template = getattr(source, "target_template", "") or None
    aliases = dict(getattr(source, "column_aliases", ()) or ())
    if task == "vqa":
        common["vqa"] = {key: getattr(source, f"{key}_column", "") or None
                         for key in ("question", "answer", "answer_type", "image_group")}
    if fmt == "table":
        return load_table(_listing_in(Path(location).expanduser()), task=task, image_column=image_column,
                          target_column=target_column, target_template=template, column_aliases=aliases,
                          split_column=getattr(source, "split_column", "split"), labels=labels, **common)
    if fmt == "class_folders":
        if task != "classification":
            common.pop("vqa", None)
            raise DataError(f"{location} is a folder of class folders, which only a classification recipe can use. "
                            "For captions, pass a CSV/JSONL listing with an image column and a text column.")
        return load_folders(location, labels=labels, **common)
    if fmt == "hf":
        return load_hf_table(location, task=task, image_column=image_column, target_column=target_column,
                             target_template=template, column_aliases=aliases, labels=labels, **common)
    raise ConfigError(f"Unknown data format '{fmt}': use auto, table, class_folders or hf.")


def discover_labels(location: str, *, source=None, seed: int = 3407) -> tuple[str, ...]:
    """The sorted class names found in a listing, class folders or dataset (for recipes given no --labels)."""
    splits = load_source(source, location, task="classification", seed=seed)
    found = set(splits["train"]["target"]) | set(splits["test"]["target"])
    return tuple(sorted(found))
