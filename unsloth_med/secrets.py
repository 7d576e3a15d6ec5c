"""Keep tokens out of logs and files.

Hugging Face and Kaggle tokens are read from the environment by the libraries that need them; this
package never copies them into configs, reports or model cards. A token given as an option (`--hub_token`,
on the command line or in a --config file) is taken out of the training arguments as soon as they are parsed
(`take_hub_token`): the trainer never sees it, so it cannot pickle it into a checkpoint's training_args.bin,
and the push (hub.py) gets it from `given_hub_token`, as it gets HF_TOKEN from the environment.

As a second line of defence every log record and every text file the run writes passes through `redact`,
which replaces the secret values this process knows of (the known secret variables, the values of secret
options on its command line, tokens taken from its options) and anything shaped like an HF token with '***';
`hub.files_with_secrets` refuses to export or push a folder holding one of those values.
"""
from __future__ import annotations

import logging
import os
import re
import sys

SECRET_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_TOKEN", "KAGGLE_KEY", "KAGGLE_API_TOKEN",
                    "WANDB_API_KEY")
_HF_TOKEN_SHAPE = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")


# Options that end like a secret (is_secret_key) but name a tokenizer's special token, not a credential.
NOT_SECRET_OPTIONS = frozenset(("pad_token", "eos_token", "bos_token", "unk_token", "sep_token", "cls_token",
                                "mask_token"))
_MIN_SECRET = 6  # shorter values would redact ordinary text
_given: set[str] = set()  # secret values this process was handed as options (remember_secret)
_hub_token: list[str] = []  # the --hub_token taken out of the training arguments (take_hub_token)


def is_secret_option(name: str) -> bool:
    """A command-line option (`--hub_token`, `--hub-token`) whose value is a credential."""
    name = name.lstrip("-").split("=", 1)[0].replace("-", "_").lower()
    return is_secret_key(name) and name not in NOT_SECRET_OPTIONS


def command_line_secrets(argv: list[str] | None = None) -> list[str]:
    """Values of secret options in `argv` (default: this process's own command line), in both
    `--hub_token VALUE` and `--hub_token=VALUE` forms."""
    argv = sys.argv[1:] if argv is None else argv
    values = []
    for i, arg in enumerate(argv):
        if not isinstance(arg, str) or not arg.startswith("--") or not is_secret_option(arg):
            continue
        _, eq, value = arg.partition("=")
        if not eq:
            value = argv[i + 1] if i + 1 < len(argv) and isinstance(argv[i + 1], str) else ""
        if len(value) >= _MIN_SECRET:
            values.append(value)
    return values


def remember_secret(value: str | None) -> None:
    """Treat `value` as a secret for the rest of this process (redact, files_with_secrets)."""
    if value and len(str(value)) >= _MIN_SECRET:
        _given.add(str(value))


def remember_command_line_secrets(argv: list[str]) -> None:
    """Remember the secret options' values of a command's argv (which need not be sys.argv: a test, a script)."""
    for value in command_line_secrets(argv):
        remember_secret(value)


def take_hub_token(training_args) -> None:
    """Move `--hub_token` out of the training arguments (TrainingArguments/SFTConfig) into this process's memory.

    The trainer pickles its arguments into every checkpoint (training_args.bin); a blank token there is the only
    safe one. The push reads the token back with `given_hub_token`."""
    token = getattr(training_args, "hub_token", None)
    if token:
        remember_secret(token)
        _hub_token[:] = [str(token)]
        training_args.hub_token = None


def given_hub_token() -> str | None:
    """The token given with --hub_token to this process (None: use HF_TOKEN or `hf auth login`)."""
    return _hub_token[0] if _hub_token else None


def forget_given_secrets() -> None:
    """Drop the remembered option values (tests; a long-lived process between runs)."""
    _given.clear()
    _hub_token.clear()


def secret_values() -> list[str]:
    """Every secret value this process knows of: secret environment variables, values of secret options on its
    command line, and values it was handed as options (remember_secret, take_hub_token)."""
    values = [os.environ.get(name, "") for name in SECRET_VARIABLES] + command_line_secrets() + sorted(_given)
    return sorted({v for v in values if len(v) >= _MIN_SECRET}, key=len, reverse=True)


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
