"""Typed, frozen results of the Python API; each `to_dict()` is the JSON record the command writes or prints."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

JSONRecord = dict[str, Any]


def _copy(record: Mapping[str, Any]) -> JSONRecord:
    return copy.deepcopy(dict(record))


@dataclass(frozen=True)
class MergeVerification:
    """What `loratv.verify_merge` found.

    Attributes:
        verdict: "EQUIVALENT (certified)", "EQUIVALENT within tolerance", "CONSISTENT (masks not reproducible)" or
            "NOT EQUIVALENT".
        certified: every tensor is within the derived rounding bound of the recipe's arithmetic.
        failing_tensors: the tensors (up to ten, worst first) beyond what is allowed.
        record: the whole JSON record (docs/merging.md).
    """

    verdict: str
    certified: bool
    failing_tensors: tuple[str, ...]
    record: dict

    @property
    def equivalent(self) -> bool:
        """Whether the merged model passed (certified, within tolerance, or consistent)."""
        return self.verdict != "NOT EQUIVALENT"


@dataclass(frozen=True)
class ModelMergeResult:
    """What `loratv.merge_models` wrote.

    Attributes:
        output: the merged model's folder.
        method: the recipe's merge method.
        inputs: the input models, in the order the method sees them (`models:`, then the base if unlisted).
        merged: names of the floating-point tensors merged.
        copied: names of the non-floating tensors copied from the reference model.
    """

    output: Path
    method: str
    inputs: tuple[str, ...]
    merged: tuple[str, ...] = ()
    copied: tuple[str, ...] = ()


@dataclass(frozen=True)
class MergeResult:
    """What `loratv.merge` wrote.

    Attributes:
        output: the merged model's folder (None for a merge computed in memory).
        total_tensors: tensors in the merged model.
        merged: names of the tensors the adapter changed.
        replaced: names of the tensors replaced whole by the adapter's saved copies (modules_to_save).
        added: names of tensors the base does not store (an untied head).
        copied: untouched tensors copied byte for byte.
        cast: untouched tensors cast to the output precision.
        notes: remarks on the binding (e.g. tied embeddings untied).
    """

    output: Path | None
    total_tensors: int
    merged: tuple[str, ...] = ()
    replaced: tuple[str, ...] = ()
    added: tuple[str, ...] = ()
    copied: int = 0
    cast: int = 0
    notes: tuple[str, ...] = ()

    @property
    def tensors_changed(self) -> tuple[str, ...]:
        """Every tensor whose value differs from the base's by the adapter: merged, replaced or added."""
        seen: dict[str, None] = {}
        for name in (*self.merged, *self.replaced, *self.added):
            seen.setdefault(name, None)
        return tuple(seen)

    def summary(self) -> str:
        """The one line `loratv merge` prints.

        Returns:
            "merged M of N tensors, replaced R, copied C unchanged, cast K; wrote OUT".
        """
        return (
            f"merged {len(self.merged)} of {self.total_tensors} tensors, replaced {len(self.replaced)}, "
            f"copied {self.copied} unchanged, cast {self.cast}; wrote {self.output}"
        )

    def to_dict(self) -> JSONRecord:
        """The merge as a JSON-ready dict.

        Returns:
            output, total_tensors, the merged/replaced/added names, the copied and cast counts, and the notes.
        """
        return {"output": None if self.output is None else str(self.output), "total_tensors": self.total_tensors,
                "merged": list(self.merged), "replaced": list(self.replaced), "added": list(self.added),
                "copied": self.copied, "cast": self.cast, "notes": list(self.notes)}


@dataclass(frozen=True)
class TaskVectorTensor:
    """One tensor of a task vector (a row of task_vector.json's "tensors")."""

    name: str
    shape: tuple[int, ...]
    parameters: int
    base_dtype: str
    finetuned_dtype: str
    changed: bool
    stored: bool
    stored_dtype: str | None
    stored_exactly: bool
    l2_norm: float
    max_abs: float
    nonzero: int


@dataclass(frozen=True)
class TaskVectorResult:
    """What `loratv.extract` wrote: the record of OUT/task_vector.json."""

    output: Path
    record: Mapping[str, Any] = field(repr=False)

    @property
    def file(self) -> Path:
        """The task vector's safetensors file."""
        return self.output / str(self.record["file"])

    @property
    def changed_tensors(self) -> int:
        """How many tensors differ between the fine-tuned model and the base."""
        return int(self.record["changed_tensors"])

    @property
    def l2_norm(self) -> float:
        """‖T‖ over the whole task vector, as task_vector.json records it."""
        return float(self.record["l2_norm"])

    @property
    def tensors(self) -> tuple[TaskVectorTensor, ...]:
        """One typed row per base tensor, in the record's order."""
        return tuple(TaskVectorTensor(
            name=t["name"], shape=tuple(t["shape"]), parameters=t["parameters"], base_dtype=t["base_dtype"],
            finetuned_dtype=t["finetuned_dtype"], changed=t["changed"], stored=t["stored"],
            stored_dtype=t["stored_dtype"], stored_exactly=t["stored_exactly"], l2_norm=t["l2_norm"],
            max_abs=t["max_abs"], nonzero=t["nonzero"]) for t in self.record["tensors"])

    def to_dict(self) -> JSONRecord:
        """The record, exactly as OUT/task_vector.json holds it.

        Returns:
            A deep copy (changing it changes nothing here).
        """
        return _copy(self.record)


@dataclass(frozen=True)
class TensorComparison:
    """One base tensor as compared (a row of comparison_results.json's "tensors"; docs/comparison-results.md)."""

    name: str
    category: str
    targeted: bool
    shape: tuple[int, ...]
    parameters: int
    max_abs_diff: float | None
    certificate_ratio: float | None
    cosine: float | None
    raw: Mapping[str, Any] = field(repr=False, compare=False)
    tolerance_ratio: float | None = None  # tensors with no derived bound (PEFT-backed tuners): |T − ΔW| / tolerance

    @property
    def ratio(self) -> float | None:
        """The certificate ratio, or the tolerance ratio where no rounding bound is derived (≤ 1 passes)."""
        return self.certificate_ratio if self.tolerance_ratio is None else self.tolerance_ratio


@dataclass(frozen=True)
class Comparison:
    """A comparison of an adapter with a task vector (the record of comparison_results.json).

    Attributes:
        record: the whole record, as `to_dict()` returns it.
        output: the folder written, or None when nothing was written.
    """

    record: Mapping[str, Any] = field(repr=False)
    output: Path | None = None

    @property
    def verdict(self) -> str:
        """"EQUIVALENT (certified)", "EQUIVALENT within tolerance" or "NOT EQUIVALENT"."""
        return str(self.record["summary"]["verdict"])

    @property
    def certified(self) -> bool:
        """Every element within its proven rounding bound (verdict "EQUIVALENT (certified)")."""
        return bool(self.record["summary"]["certified"])

    @property
    def equivalent(self) -> bool:
        """Certified or within tolerance (what the CLI exits 0 for)."""
        return self.verdict != "NOT EQUIVALENT"

    @property
    def counts(self) -> dict[str, int]:
        """Tensors per category: shared, adapter-only, tv-only, cast-artifact, unexplained, unchanged."""
        return {str(k): int(v) for k, v in self.record["summary"]["counts"].items()}

    @property
    def reasons(self) -> tuple[str, ...]:
        """The sentences the record gives for its verdict."""
        return tuple(self.record["summary"]["reasons"])

    @property
    def tensors(self) -> tuple[TensorComparison, ...]:
        """One typed row per base tensor, in the record's order (the full row in each `.raw`)."""
        return tuple(TensorComparison(
            name=t["name"], category=t["category"], targeted=t["targeted"], shape=tuple(t["shape"]),
            parameters=t["parameters"], max_abs_diff=t.get("max_abs_diff"),
            certificate_ratio=t.get("certificate_ratio"), cosine=t.get("cosine"), raw=t,
            tolerance_ratio=t.get("tolerance_ratio"))
            for t in self.record["tensors"])

    def worst(self, n: int = 5) -> tuple[TensorComparison, ...]:
        """The n targeted tensors closest to (or furthest past) their rounding bound (or, with no derived bound,
        their tolerance), worst first.

        Args:
            n: how many to return at most.

        Returns:
            Targeted tensors with a ratio, sorted by it, largest first.
        """
        rows = [t for t in self.tensors if t.targeted and t.ratio is not None]
        return tuple(sorted(rows, key=lambda t: -(t.ratio or 0.0))[:n])

    def to_dict(self) -> JSONRecord:
        """The record, exactly as comparison_results.json holds it (also when nothing was written).

        Returns:
            A deep copy (changing it changes nothing here).
        """
        return _copy(self.record)


@dataclass(frozen=True)
class Record:
    """A command's JSON record, typed by subclass."""

    record: Mapping[str, Any] = field(repr=False)
    output: Path | None = None

    def to_dict(self) -> JSONRecord:
        """The record, exactly as the command writes or prints it.

        Returns:
            A deep copy (changing it changes nothing here).
        """
        return _copy(self.record)


@dataclass(frozen=True)
class PrecisionStudy(Record):
    """The record of `loratv precision` (precision_results.json)."""

    @property
    def paths(self) -> tuple[Mapping[str, Any], ...]:
        """One summary per merge path run, in the order run."""
        return tuple(self.record.get("paths", ()))


@dataclass(frozen=True)
class Analysis(Record):
    """The record of `loratv analyze` (analysis_results.json; docs/analysis-results.md)."""


@dataclass(frozen=True)
class ToLoraResult(Record):
    """The record of `loratv to-lora` (the fidelity file beside the PEFT adapter written)."""


@dataclass(frozen=True)
class CombineResult(Record):
    """The record of `loratv combine` (combine_fidelity.json beside the combined PEFT adapter)."""

    @property
    def modules(self) -> tuple[Mapping[str, Any], ...]:
        """One entry per combined module: ranks, ‖ΔW‖_F of the exact sum, dropped and stored errors."""
        return tuple(self.record.get("modules", ()))


@dataclass(frozen=True)
class SimilarityResult(Record):
    """The record of `loratv similarity` (similarity.json)."""

    @property
    def names(self) -> tuple[str, ...]:
        """The inputs' names, in input order (the rows and columns of every matrix)."""
        return tuple(self.record["adapters"])

    @property
    def cosine(self) -> tuple[tuple[float | None, ...], ...]:
        """The K×K global cosine matrix (None where an input's delta is zero)."""
        return tuple(tuple(row) for row in self.record["cosine"])


@dataclass(frozen=True)
class ConvertResult(Record):
    """The record `loratv convert --json` prints."""


@dataclass(frozen=True)
class Inspection(Record):
    """The record `loratv inspect --json` prints for one model, adapter or config."""


@dataclass(frozen=True)
class VerifyResult(Record):
    """The record `loratv verify --json` prints."""

    @property
    def ok(self) -> bool:
        """True when verify found no problem."""
        return bool(self.record["ok"])

    @property
    def problems(self) -> tuple[str, ...]:
        """One sentence per problem found (a missing or changed file, a manifest that cannot be read)."""
        return tuple(self.record["problems"])
