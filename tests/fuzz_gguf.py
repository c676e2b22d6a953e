"""Coverage-guided fuzzing of the header gate (atheris, libFuzzer): any bytes give a GGUFInfo or edgecad's
ModelFileError, nothing else (libFuzzer's -timeout and -rss_limit_mb bound each input's time and memory).

    python tests/fuzz_gguf.py CORPUS_DIR [libFuzzer flags, e.g. -max_total_time=600]
    (tests/test_gguf_file.py runs it for a short while; scripts/fuzz_gguf.sh for longer)
A crash writes the input as crash-<hash> in the working directory: keep it under tests/fuzz-regressions/.
"""
import sys

import atheris

with atheris.instrument_imports():
    from edgecad.errors import ModelFileError
    from edgecad.gguf_file import parse_header


def one_input(data: bytes) -> None:
    try:
        info = parse_header(data)
    except ModelFileError:
        return
    info.layers(), info.vocab_size, info.n_layer, info.tied_output  # what the engine reads of an accepted header


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
