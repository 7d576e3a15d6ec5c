"""Where a listed image is: a path (relative to the listing's folder), a file:// URL, or an http(s) URL
downloaded once into the cache (offline: a clear NetworkError).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import logging
import os
import threading
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable

from ...errors import DataError, NetworkError
from ..images import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)
OFFLINE_ENV = "UNSLOTH_MED_OFFLINE"  # "1": never try to download image URLs
URL_TIMEOUT_S = 20


def is_url(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower().startswith(("http://", "https://"))


def row_name(image: Any, located: str) -> str:
    """A row's id from its (first) image as listed: the path as written; an inline data-URL image's cache file name,
    not the whole image; a URL without its query and fragment, where signed URLs carry their access token."""
    if is_data_url(image):
        return Path(located).name
    return shown_url(image) if is_url(image) else str(image).strip()


def shown_url(url: str) -> str:
    """A URL as ids, logs and errors show it: without its query and fragment, where a signed URL (S3, GCS, an
    expiring link) carries its access token."""
    from urllib.parse import urlsplit

    return urlsplit(str(url).strip())._replace(query="", fragment="").geturl()


def absolute(path: str | os.PathLike) -> Path:
    """The one path rule of every loader (listings, class folders, recipe folders): absolute, '~' expanded,
    '.' and '..' folded, symlinks kept as named. A listing and the class folders beside it then name each
    image the same way, also when the data sits behind a symlink."""
    return Path(os.path.abspath(os.path.expanduser(path)))


def is_data_url(value: Any) -> bool:
    """An image given inline (`data:image/png;base64,...`), as OpenAI-style chat exports write it."""
    return isinstance(value, str) and value.lstrip()[:5].lower() == "data:"


def cached_image_bytes(data: bytes) -> str:
    """Image bytes (a data URL's, a dataset's) written once into the cache, named by content; the path."""
    from PIL import Image, UnidentifiedImageError

    from ..sources import cache_dir

    try:
        with Image.open(io.BytesIO(data)) as image:
            suffix = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}.get(image.format,
                                                                                                       ".png")
    except (UnidentifiedImageError, OSError):  # not an image: the image checks report it, naming this file
        suffix = ".img"
    folder = cache_dir() / "hf-images"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (hashlib.sha1(data).hexdigest() + suffix)
    if not path.is_file():
        partial = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        partial.write_bytes(data)
        os.replace(partial, path)  # complete or absent, whoever writes it
    return str(path)


def data_url_file(value: str) -> str:
    """A base64 data URL's image as a cached file (the same bytes: the same file)."""
    header, _, payload = value.strip().partition(",")
    if ";base64" not in header.lower():
        raise DataError(f"An image is a data URL that is not base64 ({value.strip()[:40]!r}...). Write it as "
                        "data:image/png;base64,<data>, or give a file path or an http(s) URL.")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DataError(f"An image data URL holds no valid base64 data ({exc}; it starts {value.strip()[:40]!r}). "
                        "Re-encode the image, or give a file path or an http(s) URL.") from exc
    return cached_image_bytes(data)


def image_location(value: Any, base_dir: Path | None) -> str:
    """resolve_image, or the value as it is when there is no listing folder (a dataset's column); a data URL
    becomes a cached file either way."""
    if is_data_url(value):
        return data_url_file(value)
    return str(value).strip() if base_dir is None else resolve_image(value, base_dir)


def resolve_image(value: Any, base_dir: Path) -> str:
    """A listing's image value as a loadable location: URLs unchanged, relative paths against base_dir,
    Windows separators (images\\x.png, written by a listing made on Windows) read as folders."""
    text = str(value).strip()
    if is_url(text):
        return text
    if is_data_url(text):
        return data_url_file(text)
    if text.lower().startswith("file://"):
        text = urllib.parse.unquote(urllib.parse.urlparse(text).path)
    if "\\" in text and os.sep == "/" and not (base_dir / text).exists():
        text = text.replace("\\", "/")
    path = Path(text).expanduser()
    return str(absolute(path if path.is_absolute() else base_dir / path))


def url_cache_path(url: str) -> Path:
    from ..sources import cache_dir

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
        raise NetworkError(f"{where}: {len(todo)} images are URLs (e.g. {shown_url(todo[0])}) and {OFFLINE_ENV} is "
                           f"set, so nothing is downloaded. {hint}")
    try:  # one probe: a missing network fails here once, not once per image
        cached[todo[0]] = str(_download(todo[0]))
    except urllib.error.HTTPError as exc:
        log.warning("%s: could not download %s (HTTP %s)", where, shown_url(todo[0]), exc.code)
        cached[todo[0]] = None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        if cached:  # most images came from the cache: train on those, say which could not be fetched
            log.warning("%s: %d image URLs are not in the cache and cannot be downloaded now (%s: %s); those rows "
                        "are dropped. First: %s", where, len(todo), type(exc).__name__, reason, shown_url(todo[0]))
            return {**cached, **{u: None for u in todo}}
        raise NetworkError(f"{where}: {len(todo)} images are URLs and the first one ({shown_url(todo[0])}) could not "
                           f"be downloaded ({type(exc).__name__}: {reason}). {hint}") from exc
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
                failures.append(f"{shown_url(url)} ({problem})")
    if failures:
        log.warning("%s: %d of %d image URLs could not be downloaded; those rows are dropped. First: %s",
                    where, len(failures), len(urls), "; ".join(failures[:3]))
    if len([u for u in urls if cached.get(u)]) == 0:
        raise NetworkError(f"{where}: none of the {len(urls)} image URLs could be downloaded. {hint}")
    return cached


def _localize(rows: list[dict], where: str) -> list[dict]:
    """Download URL images (cached), every image of a row (`more_images` too), and drop rows with an image
    whose download failed: a sample that lacks one of its images cannot be trained as written."""
    def images(row: dict) -> list[str]:
        return [row["image"], *json.loads(row.get("more_images") or "[]")]

    urls = [image for row in rows for image in images(row) if is_url(image)]
    if not urls:
        return rows
    local = fetch_urls(urls, where=where)
    kept = []
    for row in rows:
        found = images(row)
        if any(is_url(image) and not local.get(image) for image in found):
            continue
        found = [local[image] if is_url(image) else image for image in found]
        row["image"] = found[0]
        if "more_images" in row:
            row["more_images"] = json.dumps(found[1:])
        kept.append(row)
    return kept


def _check_paths_exist(rows: list[dict], base_dir: Path, where: str) -> None:
    """Fail early, with the resolution rule, when most listed paths do not exist (a wrong base folder)."""
    def exists(path: str) -> bool:
        try:
            return Path(path).exists()
        except OSError:  # a name too long to be a path (a cell that holds something else)
            return False

    sample = [r for r in rows if not is_url(r["image"])][:50]
    missing = [r for r in sample if not exists(r["image"])]
    if sample and len(missing) > len(sample) // 2:
        example = missing[0]
        raise DataError(
            f"{where}: {len(missing)} of the first {len(sample)} listed images do not exist (e.g. '{example['id']}' -> "
            f"{example['image']}). Relative paths are resolved against the listing's folder ({base_dir}); write "
            "them relative to it, or absolute." + _found_below(base_dir, example["id"])
        )


def _found_below(base_dir: Path, listed: str) -> str:
    """Where a missing listed image is, when it sits in a sub-folder of the listing's folder (VQA-RAD keeps its
    images in 'VQA_RAD Image Folder/', SLAKE in 'imgs/', beside the JSON): the sentence that says so, or ''."""
    if Path(listed).is_absolute() or is_url(listed):
        return ""
    try:
        folders = sorted(p for p in base_dir.iterdir() if p.is_dir())[:200]
        found = next((folder for folder in folders if (folder / listed).is_file()), None)
    except OSError:
        return ""
    if found is None:
        return ""
    return (f" '{listed}' is in the sub-folder '{found.name}': move the listing into {found}, or write the paths "
            f"as '{found.name}/{listed}'.")
