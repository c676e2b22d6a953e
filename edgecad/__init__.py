"""edgecad: run a language model larger than your device's memory.

A resident draft model builds a token tree; the target model, paged from
storage inside a memory budget, verifies it in one pass (LLMCad), on llama.cpp.
"""
import os

# llama.cpp's CPU threads are OpenMP's: after a parallel region a worker spins GOMP_SPINCOUNT times (300,000 by
# default, a few ms) then sleeps, and a paged pass idles at every layer boundary where it waits for storage. Woken
# cold there, a 1-token pass of the F16 target paged at 45% computed in 192 ms against 110 ms resident; spinning
# 1,000,000 times (~10 ms here) it computed in 112 ms, and the paged tree on the 1.5B at 40% ran 6.22 tok/s
# against 4.86 (resident: 11.66 against 11.42; docs/paging.md). Set before llama_cpp loads libgomp (it reads the
# variable once); a value the user set wins.
os.environ.setdefault("GOMP_SPINCOUNT", "1000000")

from .engine import Engine
from .follow import FollowParams
from .plan import PagerParams
from .tree import TreeParams
from .errors import (ChecksumError, EdgecadError, FetchError, LlamaError, MemoryFloorError, ModelFileError,
                     ModelNotFetchedError, NativeError, PromptTooLongError, UnknownModelError, VocabularyMismatchError)

__version__ = "0.1.0"
__all__ = ["Engine", "FollowParams", "PagerParams", "TreeParams", "EdgecadError", "ChecksumError", "FetchError",
           "LlamaError", "MemoryFloorError", "ModelFileError",
           "ModelNotFetchedError", "NativeError", "PromptTooLongError", "UnknownModelError",
           "VocabularyMismatchError", "__version__"]
