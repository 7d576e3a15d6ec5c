"""The package's own errors. Each message says what went wrong, where, and how to fix it.

The CLI prints these as one short message (no traceback) and exits with status 2; anything else
is a bug and keeps its traceback.
"""


class UnslothMedError(Exception):
    """Base class: an expected, user-fixable problem."""


class ConfigError(UnslothMedError):
    """A config file or command-line option is wrong."""


class DataError(UnslothMedError):
    """The dataset is missing, misnamed, or has too many unusable samples."""


class ImageError(DataError):
    """One image cannot be used (corrupt, truncated, not an image, too large)."""


class SampleTooLongError(DataError):
    """A sample's image + text tokens do not fit max_seq_length."""


class UnsupportedModelError(UnslothMedError):
    """The model's family is not one this package knows how to fine-tune."""


class BackendError(UnslothMedError):
    """The requested backend cannot run here (no GPU, unsloth missing, out of memory)."""


class CredentialsError(UnslothMedError):
    """Kaggle or Hugging Face credentials are missing."""


class NetworkError(UnslothMedError):
    """A download or upload needed the network and could not reach it."""


class ExportError(UnslothMedError):
    """An export failed or its reloaded weights disagree with the tuned model."""


class DiskFullError(UnslothMedError):
    """The disk under the run folder filled up while writing a checkpoint, the adapter or an export."""
