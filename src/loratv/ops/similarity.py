"""`loratv similarity`: which of many adapters (and task vectors) on one base are alike, duplicated or outliers.

For K items the K×K matrices come from the factors, tensor by tensor (numerics/fleet.TensorGram): the inner product
of two LoRA deltas is sum((sᵢBᵢ)ᵀ(sⱼBⱼ) ⊙ AᵢAⱼᵀ), for all pairs at once from the stacked factors, never a dense ΔW;
a task vector meets a LoRA through s·sum((BᵀT) ⊙ A) and another task vector through its flattened dot product.
Summed over tensors (all, one layer, one module kind) they give the global, per-layer and per-kind cosines
⟨ΔWᵢ, ΔWⱼ⟩/(‖ΔWᵢ‖‖ΔWⱼ‖) — a cosine of summed products, never a mean of cosines. Column- and row-space overlaps
‖QᵢᵀQⱼ‖²/min(rᵢ, rⱼ) are averaged over the tensors both LoRA items touch. Hierarchical clustering (average
linkage on 1 − cosine, scipy) orders the heatmap; pairs at or above the duplicate threshold are listed, and items
whose mean cosine with the others is far below the fleet's (three scaled median absolute deviations and 0.05 below
the median) are outliers.

Adapters are compared in PEFT's orientation by module name, or, with a base, bound to it (shapes checked, names
mapped to base tensors, Conv1D and embeddings oriented like the base) — required when task vectors are compared
too. Adapters whose modules disagree in shape, or that do not bind to the base, are refused: they are not of one
base.
"""

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loratv.adapters.adapter import bind, load_adapter
from loratv.common.names import layer_of
from loratv.common.progress import progress_bar
from loratv.errors import BadInputError, LoratvError, param
from loratv.exec.executor import ExecutorSpec, byte_groups, parse_executor, run_tasks
from loratv.io.checkpoint import Checkpoint
from loratv.io.outputs import atomic_output_dir
from loratv.numerics.fleet import SignConflicts, SignPartial, TensorGram, Workspace
from loratv.ops.combine import refuse_non_additive
from loratv.ops.task_vector_input import open_task_vector, read_difference
from loratv.report.html import write_report
from loratv.report.similarity_plots import heatmap_plot, per_layer_plot
from loratv.version import __version__

SCHEMA = "loratv.similarity"
SCHEMA_VERSION = 1
RESULTS_FILE = "similarity.json"
HEATMAP_FILE = "similarity_heatmap.png"
PER_LAYER_FILE = "similarity_per_layer.png"
DUPLICATE_COSINE = 0.99
OUTLIER_MADS = 3.0
OUTLIER_MARGIN = 0.05
SIGN_DENSITY = 0.2  # TIES's usual top-k fraction
TASK_BYTES = 256 << 20  # with an executor: bytes of factors per task (each task also opens every input once)
LAYER_PREFIX = re.compile(r"^.*?\.(?:layers|h|blocks|layer)\.\d+\.")


def module_kind_of(name: str) -> str:
    """A tensor's or module's kind: its name without the layer prefix and a trailing `.weight`.

    Args:
        name: e.g. "model.layers.3.self_attn.q_proj.weight".

    Returns:
        e.g. "self_attn.q_proj".
    """
    kind = LAYER_PREFIX.sub("", name)
    return kind[: -len(".weight")] if kind.endswith(".weight") else kind


def read_list(path) -> list[str]:
    """The adapters a `--list` file names: one per line, blank lines and `#` comments skipped.

    Args:
        path: the text file.

    Returns:
        The entries, in file order.

    Raises:
        BadInputError: the file cannot be read or names nothing.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{path}: cannot read the adapter list ({exc.__class__.__name__}).") from None
    entries = [line.split("#", 1)[0].strip() for line in lines]
    entries = [e for e in entries if e]
    if not entries:
        raise BadInputError(f"{path}: the adapter list names no adapter.")
    return entries


@dataclass
class _Totals:
    """The K×K sums over tensors: all, per layer, per module kind, and the overlaps with their counts."""

    k: int
    gram: torch.Tensor = field(init=False)
    layers: dict = field(default_factory=dict)
    kinds: dict = field(default_factory=dict)
    column: torch.Tensor = field(init=False)
    row: torch.Tensor = field(init=False)
    present: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        zeros = torch.zeros(self.k, self.k, dtype=torch.float64)
        self.gram, self.column, self.row, self.present = zeros.clone(), zeros.clone(), zeros.clone(), zeros.clone()

    def add(self, name: str, inner: torch.Tensor, column: torch.Tensor, row: torch.Tensor,
            present: torch.Tensor) -> None:
        self.gram += inner
        layer = layer_of(name)
        if layer is not None:
            self.layers[layer] = self.layers.get(layer, 0) + inner
        kind = module_kind_of(name)
        self.kinds[kind] = self.kinds.get(kind, 0) + inner
        self.column += column
        self.row += row
        self.present += present


def _cosines(gram: torch.Tensor) -> list:
    """The cosine matrix of a Gram matrix as nested lists, None where a norm is zero."""
    norms = torch.sqrt(torch.diagonal(gram).clamp(min=0))
    out = []
    for i in range(gram.shape[0]):
        row = []
        for j in range(gram.shape[0]):
            d = float(norms[i] * norms[j])
            # an input with itself is 1 by definition (the quotient may round a last bit off)
            row.append(None if d == 0 else 1.0 if i == j else max(-1.0, min(1.0, float(gram[i, j]) / d)))
        out.append(row)
    return out


def _matrix(x: torch.Tensor, mask: torch.Tensor | None = None) -> list:
    return [[None if mask is not None and not bool(mask[i, j]) else float(x[i, j]) for j in range(x.shape[1])]
            for i in range(x.shape[0])]


def _clustering(cosine: list) -> dict:
    """Average-linkage clustering on 1 − cosine (an undefined cosine counts as 0): scipy's linkage and leaf order."""
    k = len(cosine)
    if k < 2:
        return {"order": list(range(k)), "linkage": []}
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    distance = torch.tensor([[0.0 if i == j else 1.0 - (cosine[i][j] or 0.0) for j in range(k)] for i in range(k)],
                            dtype=torch.float64).clamp(min=0)
    distance = (distance + distance.T) / 2
    tree = linkage(squareform(distance.numpy(), checks=False), method="average")
    return {"order": [int(i) for i in leaves_list(tree)],
            "linkage": [[int(a), int(b), float(d), int(n)] for a, b, d, n in tree.tolist()]}


def _outliers(cosine: list, names: list) -> list:
    k = len(cosine)
    if k < 4:
        return []
    means = [sum(c for j, c in enumerate(cosine[i]) if j != i and c is not None) / (k - 1) for i in range(k)]
    ordered = sorted(means)
    median = ordered[k // 2] if k % 2 else (ordered[k // 2 - 1] + ordered[k // 2]) / 2
    deviations = sorted(abs(m - median) for m in means)
    mad = 1.4826 * (deviations[k // 2] if k % 2 else (deviations[k // 2 - 1] + deviations[k // 2]) / 2)
    cut = median - max(OUTLIER_MADS * mad, OUTLIER_MARGIN)
    return [{"adapter": names[i], "index": i, "mean_cosine": means[i]} for i in range(k) if means[i] < cut]


def _summed(parts: list):
    """One item's rows: the sum of its parts' rows (several modules may land on one tensor)."""
    if len(parts) == 1:
        return parts[0]
    return lambda i, j: sum(part(i, j) for part in parts)


def _rows_of_group(gram: TensorGram) -> int:
    """The row count of a tensor's deltas, from any of them."""
    if gram.lora:
        return int(gram.lora[0][1].shape[0])
    return int(gram.dense[0][1].shape[0])


def _names(sources: list) -> list[str]:
    """Display names: each input's folder name, or its whole path where folder names repeat."""
    short = [Path(str(s).rstrip("/")).name or str(s) for s in sources]
    return short if len(set(short)) == len(short) else [str(s) for s in sources]


@dataclass
class _Inputs:
    """The opened inputs, and per tensor (or module) name the deltas that land on it: [(item, kind, payload)]."""

    adapters: list
    opened: list  # the task vectors
    base: Checkpoint | None
    groups: dict
    notes: list
    n_adapters: int


def _open_inputs(sources: list, task_vectors: list, base) -> _Inputs:
    """Open every adapter and task vector, bind the adapters to the base (when given) and group their deltas by
    the tensor they change."""
    base_ckpt = Checkpoint(base, label=f"base {base}") if base is not None else None
    adapters = [load_adapter(s) for s in sources]
    for adapter in adapters:
        refuse_non_additive(adapter, "similarity")
    groups: dict[str, list] = {}  # tensor (or module) name -> [(item, kind, payload)]
    shapes: dict[str, tuple] = {}
    notes: list[str] = []
    for i, adapter in enumerate(adapters):
        if base_ckpt is not None:
            plan = bind(adapter, base_ckpt)
            for name, modules in plan.deltas.items():
                for m in modules:
                    groups.setdefault(name, []).append((i, "lora", (adapter, m, m.kind not in ("linear", "conv"))))
            for name, m in plan.bias_additions.items():
                groups.setdefault(name, []).append((i, "bias", (adapter, m)))
            if plan.replacements:
                notes.append(f"{sources[i]}: tensors saved whole ({', '.join(sorted(plan.replacements))}) are "
                             "compared as their difference to the base.")
                for name, key in plan.replacements.items():
                    groups.setdefault(name, []).append((i, "replacement", (adapter, key)))
        else:
            for name, m in adapter.modules.items():
                a_shape = tuple(adapter.tensors.entry(m.a_key).shape[1:])
                b_shape = (adapter.tensors.entry(m.b_key).shape[0],)
                if shapes.setdefault(name, (a_shape, b_shape)) != (a_shape, b_shape):
                    raise LoratvError(f"{adapter.tensors.path}: module {name} has lora_A {a_shape} and lora_B "
                                      f"{b_shape} where another adapter's are {shapes[name]}: the adapters are not of "
                                      "one base (give --base to check them against it).")
                groups.setdefault(name, []).append((i, "lora", (adapter, m, False)))
                if m.bias_key:
                    groups.setdefault(name + ".bias", []).append((i, "bias", (adapter, m)))
            if adapter.replacements:
                notes.append(f"{sources[i]}: tensors saved whole ({', '.join(sorted(adapter.replacements))}) are left "
                             "out: their change needs the base (give --base).")
    opened = []
    for folder in task_vectors:
        _, tv = open_task_vector(base, task_vector=folder)
        opened.append(tv)
    if task_vectors:
        assert base_ckpt is not None
        for name in base_ckpt.names():
            if base_ckpt.entry(name).torch_dtype.is_floating_point:
                groups.setdefault(name, [])
    return _Inputs(adapters, opened, base_ckpt, groups, notes, len(sources))


@dataclass
class _TensorPartial:
    """One tensor's share of the K×K sums (None where no delta lands on it), and of the sign statistics."""

    name: str
    sums: tuple | None  # (inner products, column overlaps, row overlaps, overlap counts), each K×K
    signs: SignPartial | None


def _tensor_partial(inputs: _Inputs, name: str, workspace: Workspace, density: float | None) -> _TensorPartial:
    """The Gram matrix, overlaps and (with a density) sign statistics of the deltas that land on one tensor."""
    k = inputs.n_adapters + len(inputs.opened)
    gram = TensorGram(k, workspace)
    rows_of: dict[int, list] = {}  # item -> callables (start, stop) -> rows of its delta, for the sign pass
    for item, kind, payload in inputs.groups[name]:
        if kind == "lora":
            adapter, m, transposed = payload
            a, b = adapter.factor(m.a_key).flatten(1), adapter.factor(m.b_key).flatten(1)
            left, right = (a.T, b.T) if transposed else (b, a)
            gram.add_lora(item, left, right, m.scale)
            _, left64, right64, scale = gram.lora[-1]  # the float64 copies gram holds
            rows_of.setdefault(item, []).append(
                lambda i, j, left=left64, right=right64, scale=scale: (left[i:j] @ right) * scale)
            continue
        if kind == "bias":
            adapter, m = payload
            value = (adapter.factor(m.bias_key).double() * m.scale).reshape(-1, 1)
        else:
            adapter, key = payload
            assert inputs.base is not None
            value = adapter.factor(key).double() - inputs.base.read(name).double()
            value = value.reshape(value.shape[0], -1) if value.dim() else value.reshape(1, 1)
        gram.add_dense(item, value)
        rows_of.setdefault(item, []).append(lambda i, j, value=value: value[i:j])
    for j, tv in enumerate(inputs.opened):
        t = read_difference(tv, inputs.base, name)
        if t is not None:
            t = t.reshape(t.shape[0], -1) if t.dim() else t.reshape(1, 1)
            gram.add_dense(inputs.n_adapters + j, t)
            rows_of.setdefault(inputs.n_adapters + j, []).append(lambda i, j, t=t: t[i:j])
    partial = _TensorPartial(name, None, None)
    if gram.lora or gram.dense:
        partial.sums = (gram.inner_products(), *gram.overlaps())
    if density is not None and rows_of:
        shape = tuple(next(iter(rows_of.values()))[0](0, 1).shape)
        items = sorted(rows_of)
        partial.signs = SignConflicts(k, density).measure(items, [_summed(rows_of[item]) for item in items],
                                                          (_rows_of_group(gram), shape[1]))
    return partial


def _add_partial(totals: "_Totals", signs: SignConflicts | None, partial: _TensorPartial) -> float | None:
    """Add one tensor's partial sums to the totals (tensors in sorted order, whichever executor computed them);
    returns its sign-agreement ratio."""
    if partial.sums is not None:
        totals.add(partial.name, *partial.sums)
    if signs is not None and partial.signs is not None:
        return signs.accumulate(partial.signs)
    return None


def _group_bytes(inputs: _Inputs, name: str) -> int:
    """The bytes a tensor's deltas read: its factors (or saved tensors), and the task vectors' share."""
    total = 0
    for _, kind, payload in inputs.groups[name]:
        adapter = payload[0]
        keys = (payload[1].a_key, payload[1].b_key) if kind == "lora" else \
            (payload[1].bias_key,) if kind == "bias" else (payload[1],)
        total += sum(adapter.tensors.entry(key).nbytes for key in keys)
    if inputs.opened and inputs.base is not None and name in inputs.base:
        total += len(inputs.opened) * inputs.base.entry(name).nbytes
    return total


def similarity_group_task(sources: list, task_vectors: list, base: str | None, names: list,
                          density: float | None) -> list:
    """A group of tensors of a similarity map, as a unit of work for an executor: opens every input itself and
    returns each tensor's partial sums, for the driver to add in order.

    Args:
        sources: the adapters, as `similarity` got them.
        task_vectors: the task vector folders.
        base: the base model (None without one).
        names: the tensors (or modules) of this group, in sorted order.
        density: with sign conflicts, the support fraction; None without them.

    Returns:
        One _TensorPartial per name, in order.

    Raises:
        LoratvError: as `similarity`, for the inputs and these tensors.
    """
    inputs = _open_inputs(sources, task_vectors, base)
    workspace = Workspace()
    return [_tensor_partial(inputs, name, workspace, density) for name in names]


def similarity(sources: list, out, *, task_vectors: list | None = None, base=None,
               duplicate_cosine: float = DUPLICATE_COSINE, sign_conflicts: bool = False,
               density: float = SIGN_DENSITY, plots: bool = True, force: bool = False, progress: bool = False,
               command: str | None = None, executor: "str | ExecutorSpec" = "local",
               task_bytes: int = TASK_BYTES) -> dict:
    """The similarity map of K adapters (and task vectors) on one base, written to `out`.

    Args:
        sources: the LoRA adapters (folders, files in them, or hub ids).
        out: the output folder (written atomically): similarity.json and, with plots, similarity_heatmap.png,
            similarity_per_layer.png and report.html.
        task_vectors: folders written by `loratv extract`, compared with the adapters (needs `base`).
        base: the base model: adapters are bound to it (shapes checked, names and orientation the base's).
        duplicate_cosine: pairs with a global cosine at or above this are listed as near-duplicates.
        sign_conflicts: also compute, on each tensor's top-k support (k = density·numel per input), the pairwise
            sign-conflict rates and TIES's sign-agreement ratio — dense, every input's rows materialised a block at a
            time: O(K²·m·n) per tensor.
        density: the fraction of each tensor in an input's support, in (0, 1].
        plots: draw the PNGs.
        force: replace an existing output folder.
        progress: show a progress bar.
        command: the command line, recorded.
        executor: "local", or "ray" / "ray=ADDRESS": one Ray task per group of tensors of at most `task_bytes` of
            factors, each opening the inputs itself and returning its tensors' partial sums, which the driver adds in
            the local run's order: every number is the local run's, bit for bit.
        task_bytes: with Ray, the bytes of factors (and task-vector tensors) one task reads at most.

    Returns:
        The record (schema loratv.similarity), as written to similarity.json.

    Raises:
        LoratvError: fewer than two inputs, task vectors without a base, a threshold outside [−1, 1]
            (BadInputError); an adapter that is not additive LoRA, adapters of other shapes or bases.
    """
    task_vectors = list(task_vectors or [])
    if len(sources) + len(task_vectors) < 2:
        raise BadInputError("give at least two adapters or task vectors to compare.")
    if task_vectors and base is None:
        raise BadInputError(f"task vectors are compared with adapters on the base's tensors: give {param('base')}.")
    if not -1.0 <= duplicate_cosine <= 1.0:
        raise BadInputError(f"{param('duplicate_cosine', duplicate_cosine)}: a cosine, in [-1, 1].")
    if not 0.0 < density <= 1.0:
        raise BadInputError(f"{param('density', density)}: a fraction, in (0, 1].")
    run_on = parse_executor(executor)
    inputs = _open_inputs(sources, task_vectors, base)
    k = len(sources) + len(task_vectors)
    names = _names(list(sources) + list(task_vectors))
    totals = _Totals(k)
    signs = SignConflicts(k, density) if sign_conflicts else None
    per_tensor_agreement = {}
    tensor_names = sorted(inputs.groups)
    if run_on.kind == "local":
        workspace = Workspace()
        with progress_bar(len(tensor_names), "similarity", enabled=progress) as bar:
            for name in tensor_names:
                bar.update(1)
                partial = _tensor_partial(inputs, name, workspace, density if sign_conflicts else None)
                ratio = _add_partial(totals, signs, partial)
                if partial.signs is not None:
                    per_tensor_agreement[name] = ratio
    else:
        groups = byte_groups([_group_bytes(inputs, name) for name in tensor_names], task_bytes)
        jobs = [(list(sources), list(task_vectors), None if base is None else str(base),
                 [tensor_names[i] for i in group], density if sign_conflicts else None) for group in groups]
        outcomes = run_tasks(run_on, similarity_group_task, jobs)
        for partials in outcomes:
            for partial in partials:
                ratio = _add_partial(totals, signs, partial)
                if partial.signs is not None:
                    per_tensor_agreement[partial.name] = ratio
    notes = inputs.notes
    record = _record(sources, task_vectors, names, totals, duplicate_cosine, notes, base, command)
    record["sign_conflicts"] = None if signs is None else {
        "density": density,
        "rate": _matrix(torch.nan_to_num(signs.rates(), nan=0.0), signs.common > 0),
        "common_support": _matrix(signs.common),
        "agreement_ratio": signs.agreeing_mass / signs.mass if signs.mass > 0 else None,
        "per_tensor_agreement_ratio": per_tensor_agreement,
    }
    paths = [a.path for a in inputs.adapters] + [Path(t) for t in task_vectors]
    with atomic_output_dir(out, paths, force=force) as tmp:
        if plots:
            heatmap_plot(record, tmp / HEATMAP_FILE)
            per_layer_plot(record, tmp / PER_LAYER_FILE)
        (tmp / RESULTS_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if plots:
            write_report(tmp)
    return record


def _record(sources, task_vectors, names, totals: _Totals, duplicate_cosine, notes, base, command) -> dict:
    k = totals.k
    cosine = _cosines(totals.gram)
    norms = [math.sqrt(max(float(totals.gram[i, i]), 0.0)) for i in range(k)]
    pairs = [{"a": names[i], "b": names[j], "index_a": i, "index_b": j, "cosine": cosine[i][j]}
             for i in range(k) for j in range(i + 1, k) if cosine[i][j] is not None and cosine[i][j] >= duplicate_cosine]
    present = totals.present > 0
    layers = sorted(totals.layers)
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "loratv_version": __version__,
        "command": command,
        "base": None if base is None else str(base),
        "adapters": names,
        "inputs": [{"name": n, "source": str(s), "kind": "lora" if idx < len(sources) else "task_vector"}
                   for idx, (n, s) in enumerate(zip(names, list(sources) + list(task_vectors), strict=True))],
        "cosine": cosine,
        "norms": norms,
        "inner_products": _matrix(totals.gram),
        "per_layer": {"layers": layers, "cosine": [_cosines(totals.layers[layer]) for layer in layers]},
        "per_kind": {kind: _cosines(totals.kinds[kind]) for kind in sorted(totals.kinds)},
        "overlap": {
            "column": _matrix(totals.column / totals.present.clamp(min=1), present),
            "row": _matrix(totals.row / totals.present.clamp(min=1), present),
            "tensors_compared": _matrix(totals.present),
        },
        "clustering": _clustering(cosine),
        "duplicate_cosine": duplicate_cosine,
        "near_duplicates": sorted(pairs, key=lambda p: -p["cosine"]),
        "outliers": _outliers(cosine, names),
        "notes": notes,
    }


def summary_text(record: dict, out) -> str:
    """The lines `loratv similarity` prints.

    Args:
        record: the similarity record.
        out: the output folder.

    Returns:
        Text, one fact per line.
    """
    names, cosine = record["adapters"], record["cosine"]
    k = len(names)
    off = [cosine[i][j] for i in range(k) for j in range(i + 1, k) if cosine[i][j] is not None]
    lines = [f"similarity: {k} inputs -> {out}",
             f"  global cosine between pairs: min {min(off):.4f}, max {max(off):.4f}" if off else
             "  no pair has a defined cosine (a zero delta)",
             f"  near-duplicates (cosine ≥ {record['duplicate_cosine']:g}): {len(record['near_duplicates'])}"]
    lines += [f"    {p['a']} ~ {p['b']}: {p['cosine']:.6f}" for p in record["near_duplicates"][:10]]
    lines.append(f"  outliers: {', '.join(o['adapter'] for o in record['outliers']) or 'none'}")
    order = record["clustering"]["order"]
    lines.append(f"  clustered order: {', '.join(names[i] for i in order[:20])}{' …' if k > 20 else ''}")
    lines += [f"  note: {n}" for n in record["notes"]]
    return "\n".join(lines)
