"""edgecad's exceptions: each names the file or value at fault and what to do."""
from typing import Optional


class EdgecadError(Exception):
    """Base class of every error edgecad raises on purpose."""


class ModelFileError(EdgecadError):
    """A model file is missing, not GGUF, truncated, or llama.cpp refused it."""


class UnknownModelError(EdgecadError):
    """A registry name that edgecad does not know."""


class ModelNotFetchedError(EdgecadError):
    """A registry model that is not in the cache yet."""


class FetchError(EdgecadError):
    """Downloading or assembling a registry model failed; nothing was installed."""


class ChecksumError(FetchError):
    """A model's bytes do not match the registry's size or sha256."""


class VocabularyMismatchError(EdgecadError):
    """The draft model does not share the target's vocabulary."""


class RequestError(EdgecadError):
    """The caller's arguments are at fault, not the engine: a value out of range or not supported, a prompt the
    context cannot hold, messages the chat template refuses. `param` names the argument (a server answers 400)."""

    code = None  # OpenAI's error code for it (the server's `code`), when it has one

    def __init__(self, message: str, param: str = None):
        super().__init__(message)
        self.param = param


class PromptTooLongError(RequestError):
    """The prompt does not fit in the context window."""

    code = "context_length_exceeded"


class NotSupportedError(EdgecadError, AttributeError):
    """A member of llama-cpp-python's `Llama` that edgecad does not have (an AttributeError: hasattr says False)."""


class LlamaError(EdgecadError):
    """A llama.cpp call failed; `code` is its return value."""

    def __init__(self, message: str, code: int = 0):
        super().__init__(message)
        self.code = code


class NativeError(EdgecadError):
    """A call into edgecad's C library failed; `code` is its EC_* status."""

    def __init__(self, message: str, code: int = 0):
        super().__init__(message)
        self.code = code


class RemoteLostError(EdgecadError):
    """A remote device (edgecad.rpc) is unreachable or went away: its layers of the target went with it."""


class BudgetTooSmallError(EdgecadError):
    """No configuration runs inside the memory budget; `smallest` is the smallest budget that runs one (None where
    something else ruled every one out)."""

    def __init__(self, message: str, smallest: Optional[int] = None):
        super().__init__(message)
        self.smallest = smallest


class MemoryFloorError(EdgecadError):
    """The memory the engine may use fell below what it needs at the least (edgecad.follow): it stopped the
    completion and freed its models rather than be killed; the next request loads them again if memory came back."""
