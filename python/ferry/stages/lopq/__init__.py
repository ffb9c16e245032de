"""LOPQ, Locally Optimized Product Quantization (Kalantidis & Avrithis, CVPR 2014), in numpy.

Training (train.py) is a sequence of chunk / combine / aggregate reductions; encoding and
decoding (model.py) are vectorized over batches; search (search.py) walks an inverted
multi-index. Models are LOPQModelParams protobufs, field-compatible with the reference LOPQ
`.lopq` files; nothing here reads or writes a pickle, except the numpy-only reader of the
reference's text input format (io.py). Importing this package registers the stages
``lopq_encode`` and ``lopq_train``.
"""
from ferry.stages.lopq import stages as _stages  # noqa: F401  (registers the stages)
from ferry.stages.lopq.errors import ModelFormatError, UnsafePickleError
from ferry.stages.lopq.io import (format_code_line, iter_text_vectors, parse_text_line, read_fvecs,
                                  read_text_vectors, write_fvecs)
from ferry.stages.lopq.model import PCA, LOPQModel, codes_to_json, load
from ferry.stages.lopq.search import LOPQSearcher, SearchResult, multisequence
from ferry.stages.lopq.train import LOPQTrainingWarning, TrainConfig, TrainState, fit

__all__ = [
    "LOPQModel", "PCA", "load", "fit", "TrainConfig", "TrainState", "LOPQTrainingWarning",
    "LOPQSearcher", "SearchResult", "multisequence",
    "read_fvecs", "write_fvecs", "read_text_vectors", "iter_text_vectors", "parse_text_line",
    "format_code_line", "codes_to_json", "ModelFormatError", "UnsafePickleError",
]
