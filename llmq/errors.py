"""One exception type per kind of user error. The CLI prints them as one line and exits with code 2."""


# what still works on a model the per-layer stage (llmq/layers.py: GPTQ, smoothing, --max-kl, --sequential)
# cannot drive: the end of both refusals' messages
WITHOUT_LAYER_STAGE = "quantize it in memory with --method llm-int8 --no-gptq (round-to-nearest weights)"


class LlmqError(Exception):
    """Base class of every error a user can cause and fix. `str(err)` is the one-line message."""

    exit_code = 2


class ConfigError(LlmqError):
    """A recipe, flag or option value is invalid."""


class ModelLoadError(LlmqError):
    """A model path, folder, file or Hub id cannot be loaded as a causal LM."""


class DataError(LlmqError):
    """A text source is missing, unreadable, empty or too short."""


class UnsupportedArchitecture(LlmqError):
    """The model family is not in the smoothing table (llmq/arch.py)."""


class OutputError(LlmqError):
    """The output location cannot be written (exists, is a file, not writable)."""


class NumericalError(LlmqError):
    """inf/nan appeared in weights or activations."""

    @classmethod
    def damaged(cls, name: str) -> "NumericalError":
        """inf/nan in the checkpoint's weight `name` (in memory, on disk, or on its way to the output)."""
        return cls(f"the model's weights hold inf/nan in {name}; the checkpoint is damaged (re-download or "
                   "re-export it)")


class PushError(LlmqError):
    """Uploading to the Hub failed (no token, bad repo id, refused, network)."""


class ExportError(LlmqError):
    """A folder cannot be exported to the asked format (not an llmq folder, a method the format cannot express,
    the format's package missing)."""


class AssetError(LlmqError):
    """An offline asset could not be fetched or failed its checksum."""
