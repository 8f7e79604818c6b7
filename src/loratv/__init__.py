"""loratv: merge LoRA adapters, extract task vectors, and prove what the weights contain.

The Python API (docs/api.md): the file commands `merge`, `extract`, `compare`, `validate`, `precision_study`,
`analyze`, `to_lora`, `convert`, `inspect` and `verify`, each returning a typed frozen result with `to_dict()`; the
in-memory streams `iter_merged` and `iter_task_vector`; `load_adapter`; and the exceptions, all subclasses of
`LoratvError`. A base model may be a folder, a weights file, a hub id or an already-loaded state dict.

The API's functions and results are loaded on first use (PEP 562): `import loratv` itself stays light (no torch),
so `from loratv.errors import LoratvError`, `loratv.__version__` and the stdlib-only tokenizer writer cost nothing.
"""

from importlib import import_module
from typing import TYPE_CHECKING

from loratv.errors import BadInputError, LoratvError, OutputExistsError, UnsupportedAdapterError
from loratv.version import __version__

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ loads them
    from loratv.api.functions import (
        analyze,
        combine,
        compare,
        convert,
        extract,
        inspect,
        merge,
        merge_models,
        precision_study,
        similarity,
        to_lora,
        validate,
        verify,
        verify_merge,
    )
    from loratv.api.results import (
        Analysis,
        CombineResult,
        Comparison,
        ConvertResult,
        Inspection,
        MergeResult,
        MergeVerification,
        ModelMergeResult,
        PrecisionStudy,
        SimilarityResult,
        TaskVectorResult,
        TaskVectorTensor,
        TensorComparison,
        ToLoraResult,
        VerifyResult,
    )
    from loratv.api.streams import Adapter, BoundAdapter, iter_merged, iter_task_vector, load_adapter

# public name -> the module that defines it
_LAZY = {
    "Adapter": "loratv.api.streams",
    "Analysis": "loratv.api.results",
    "BoundAdapter": "loratv.api.streams",
    "CombineResult": "loratv.api.results",
    "Comparison": "loratv.api.results",
    "ConvertResult": "loratv.api.results",
    "Inspection": "loratv.api.results",
    "MergeResult": "loratv.api.results",
    "ModelMergeResult": "loratv.api.results",
    "MergeVerification": "loratv.api.results",
    "PrecisionStudy": "loratv.api.results",
    "SimilarityResult": "loratv.api.results",
    "TaskVectorResult": "loratv.api.results",
    "TaskVectorTensor": "loratv.api.results",
    "TensorComparison": "loratv.api.results",
    "ToLoraResult": "loratv.api.results",
    "VerifyResult": "loratv.api.results",
    "analyze": "loratv.api.functions",
    "combine": "loratv.api.functions",
    "compare": "loratv.api.functions",
    "convert": "loratv.api.functions",
    "extract": "loratv.api.functions",
    "inspect": "loratv.api.functions",
    "iter_merged": "loratv.api.streams",
    "iter_task_vector": "loratv.api.streams",
    "load_adapter": "loratv.api.streams",
    "merge": "loratv.api.functions",
    "merge_models": "loratv.api.functions",
    "verify_merge": "loratv.api.functions",
    "precision_study": "loratv.api.functions",
    "similarity": "loratv.api.functions",
    "to_lora": "loratv.api.functions",
    "validate": "loratv.api.functions",
    "verify": "loratv.api.functions",
}

__all__ = [
    "Adapter",
    "Analysis",
    "BadInputError",
    "BoundAdapter",
    "CombineResult",
    "Comparison",
    "ConvertResult",
    "Inspection",
    "LoratvError",
    "MergeResult",
    "MergeVerification",
    "ModelMergeResult",
    "OutputExistsError",
    "PrecisionStudy",
    "SimilarityResult",
    "TaskVectorResult",
    "TaskVectorTensor",
    "TensorComparison",
    "ToLoraResult",
    "UnsupportedAdapterError",
    "VerifyResult",
    "__version__",
    "analyze",
    "combine",
    "compare",
    "convert",
    "extract",
    "inspect",
    "iter_merged",
    "iter_task_vector",
    "load_adapter",
    "merge",
    "merge_models",
    "precision_study",
    "similarity",
    "to_lora",
    "validate",
    "verify",
    "verify_merge",
]


def __getattr__(name: str) -> object:
    """Load a public API name on first access.

    Args:
        name: the attribute asked for.

    Returns:
        The function or class `name` names.

    Raises:
        AttributeError: `name` is not part of the API.
    """
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'loratv' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    """The module's names, the lazily loaded ones included.

    Returns:
        Sorted attribute names.
    """
    return sorted(set(globals()) | set(__all__))
