"""Reading a templated answer back into its fields: the inverse of a source's `target_template`.

A target built from "Product: {title}, Category: {category}, Full Price: {price}" is scored field by field
(recipes/product_catalog.py). Each field's label is the template's text before it without the separators
around it ("Product:", "Category:", "Full Price:"). In an answer, labels are found ignoring case and spacing,
in any order and anywhere (a model may say "Sure!" first), and a field's value runs to the next label found:
so a value may itself hold commas ("Red Bag, large").
"""
from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import Any

_FIELD = re.compile(r"\{(\w+)\}")
_SEPARATORS = " \t\n,;|"  # what joins one field to the next label in a template: not part of either
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?|[-+]?\.\d+")


@lru_cache(maxsize=32)
def template_labels(template: str) -> tuple[tuple[str, str], ...]:
    """(field, label) for each field of the template, in order.

    Raises ValueError for a field with no label text before it (two fields side by side): where one ends and
    the next begins could not be told in an answer."""
    parts = _FIELD.split(template)  # literal, field, literal, field, ..., literal
    labels = []
    for i in range(1, len(parts), 2):
        label = parts[i - 1].strip(_SEPARATORS)
        if not label:
            raise ValueError(f"The template {template!r} has no label before {{{parts[i]}}}: its answers cannot be "
                             "read back field by field. Put a label before each field (e.g. 'Title: {title}').")
        labels.append((parts[i], label))
    return tuple(labels)


@lru_cache(maxsize=32)
def _label_pattern(template: str) -> re.Pattern:
    alternatives = []
    for index, (_, label) in enumerate(template_labels(template)):
        pieces = re.findall(r"\w+|[^\w\s]", label)  # words and punctuation, any spacing between them
        alternatives.append(f"(?P<f{index}>" + r"\s*".join(re.escape(p) for p in pieces) + ")")
    return re.compile("|".join(alternatives), re.IGNORECASE)


def read_fields(text: Any, template: str) -> dict[str, str] | None:
    """{field: value} of an answer in the template's format; None when a field's label is missing.

    A label found twice keeps its first value."""
    labels = template_labels(template)
    text = " ".join(str(text).split())
    marks = [(labels[int(m.lastgroup[1:])][0], m.start(), m.end()) for m in _label_pattern(template).finditer(text)]
    found: dict[str, str] = {}
    for i, (field, _, end) in enumerate(marks):
        stop = marks[i + 1][1] if i + 1 < len(marks) else len(text)
        found.setdefault(field, text[end:stop].strip(_SEPARATORS))
    return found if len(found) == len(labels) else None


def read_number(text: Any) -> float | None:
    """The first number in a text ('$1,890.00' -> 1890.0); None when there is none."""
    if text is None:
        return None
    match = _NUMBER.search(str(text))
    if not match:
        return None
    try:
        value = float(match.group(0).replace(",", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None
