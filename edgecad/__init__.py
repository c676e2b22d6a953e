"""edgecad: run a language model larger than your device's memory.

A resident draft model builds a token tree; the target model, paged from
storage inside a memory budget, verifies it in one pass (LLMCad), on llama.cpp.
"""
from .engine import Engine
from .plan import PagerParams
from .tree import TreeParams
from .errors import (ChecksumError, EdgecadError, FetchError, LlamaError, ModelFileError, ModelNotFetchedError,
                     NativeError, PromptTooLongError, UnknownModelError, VocabularyMismatchError)

__version__ = "0.1.0"
__all__ = ["Engine", "PagerParams", "TreeParams", "EdgecadError", "ChecksumError", "FetchError", "LlamaError", "ModelFileError",
           "ModelNotFetchedError", "NativeError", "PromptTooLongError", "UnknownModelError",
           "VocabularyMismatchError", "__version__"]
