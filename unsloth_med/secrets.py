"""Keep tokens out of logs and files.

Hugging Face and Kaggle tokens are read from the environment by the libraries that need them; this
package never copies them into configs, reports or model cards. As a second line of defence every log
record and every text file the run writes passes through `redact`, which replaces the current values
of the known secret variables (and anything shaped like an HF token) with '***'.
"""
from __future__ import annotations

import logging
import os
import re

SECRET_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_TOKEN", "KAGGLE_KEY", "KAGGLE_API_TOKEN",
                    "WANDB_API_KEY")
_HF_TOKEN_SHAPE = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")


def secret_values() -> list[str]:
    values = [os.environ.get(name, "") for name in SECRET_VARIABLES]
    return sorted({v for v in values if len(v) >= 6}, key=len, reverse=True)


def redact(text: str) -> str:
    for value in secret_values():
        text = text.replace(value, "***")
    return _HF_TOKEN_SHAPE.sub("hf_***", text)


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        return True


def is_secret_key(key: str) -> bool:
    """Config keys whose values must never be written (e.g. hub_token)."""
    return bool(re.search(r"(token|secret|password|api_key)$", key.lower()))
