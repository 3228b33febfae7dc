"""Errors a user can act on. The CLI prints them as one line; anything else is a bug and keeps its traceback."""


class SoraError(Exception):
    """Base class for errors caused by input or configuration, not by Sora itself."""


class DataError(SoraError):
    """Unreadable, missing or malformed data. The message names the file (and line where known)."""


class ConfigError(SoraError):
    """An invalid recipe, flag or override."""


class CheckpointError(SoraError):
    """A checkpoint directory that is missing, incomplete or incompatible."""


class SoraWarning(UserWarning):
    """Input Sora can use but probably should not as it is (the CLI prints it as one yellow line)."""


class MissingDependency(SoraError, ImportError):
    """A feature's optional dependency is not installed; the message says which extra installs it."""


# The import name of each optional dependency -> (its PyPI name, the extra of sora that installs it). The
# plain install (inference, ``sora serve``, the client) leaves the training stack out; ``sora[train]`` adds it.
OPTIONAL = {
    "sklearn": ("scikit-learn", "train"),
    "scipy": ("scipy", "train"),
    "pyarrow": ("pyarrow", "train"),
    "matplotlib": ("matplotlib", "train"),
    "optuna": ("optuna", "train"),
    "onnx": ("onnx", "train"),
    "sacrebleu": ("sacrebleu", "train"),
    "rouge_score": ("rouge-score", "train"),
}


def missing(exc: ImportError, feature: str) -> MissingDependency:
    """The error to raise when ``feature``'s import failed with ``exc``: which package, which extra.

        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise missing(exc, "reading Parquet") from exc
    """
    root = (exc.name or "").split(".")[0]
    package, extra = OPTIONAL.get(root, (root or str(exc), "train"))
    return MissingDependency(f"{feature} needs {package}, which is not installed: pip install 'sora[{extra}]'")
