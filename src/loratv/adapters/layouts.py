"""transformers-5 checkpoint layouts: an adapter made on a transformers-5 model names the modules the model holds in
memory, while the checkpoint on disk (what save_pretrained writes and the hub holds) keeps the original names and,
for MoE models, the experts one by one:

    in memory (adapter)                                on disk (base)
    vit.layers.0.attention.k_proj                      vit.encoder.layer.0.attention.attention.key
    model.language_model.layers.0.self_attn.q_proj     language_model.model.layers.0.self_attn.q_proj
    model.layers.0.mlp.experts.gate_up_proj (E, 2I, H) model.layers.0.mlp.experts.{e}.gate_proj.weight (I, H), up_proj

transformers maps one onto the other when it loads a checkpoint (conversion_mapping.get_model_conversion_mapping:
WeightRenaming and WeightConverter rules per architecture, applied by core_model_loading.rename_source_key). loratv
asks the library for those rules (never a copy of them), runs every on-disk name through them exactly as
convert_and_load_state_dict_in_model does, binds the adapter against the in-memory names, and maps the plan back:
a renamed tensor keeps its delta under its on-disk name; a fused tensor (MergeModulelist, Concatenate) gives each
on-disk piece the slice of the fused delta it was stacked from. The merge then writes the base's own names and
split. Stacking and concatenation move elements without arithmetic, so W_disk + ΔW[piece] is, element for element,
what PEFT's merge of the fused parameter computes.

transformers is needed only here, and only when the adapter's names are not the base's: the `loratv[transformers]`
extra.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import torch

from loratv.adapters.kinds.lora_variants.target_parameters import expert_delta
from loratv.adapters.structures import TOKEN_ROWS, LoraModule
from loratv.errors import LoratvError
from loratv.io.checkpoint import Checkpoint
from loratv.models.meta_model import build_meta_model
from loratv.numerics.lowrank import Factors

EXTRA = "pip install 'loratv[transformers]'"
OUTPUT_EMBEDDINGS = ("lm_head.weight", "embed_out.weight")


@dataclass(frozen=True)
class Piece:
    """Where one on-disk tensor sits in the fused in-memory parameter it was stacked into.

    `expert` is the index along the stacked dimension 0 of a 3-D parameter (None for a 2-D one); `index` holds one
    slice per remaining dimension, so that `fused[expert][index]` (or `fused[index]`) is the on-disk tensor.
    """

    disk: str
    fused: str
    expert: int | None
    index: tuple


@dataclass
class _Entry:
    shape: tuple
    dtype: str


class LayoutView:
    """The base seen under its in-memory names: what `bind` needs of a Checkpoint (names, shapes, config, path)."""

    def __init__(self, base, entries: dict):
        self.base = base
        self.entries = entries
        self.path = base.path
        self.label = base.label

    @property
    def config(self):
        """The base checkpoint's config.json (as Checkpoint.config gives it)."""
        return self.base.config

    def names(self) -> list:
        """The base's tensor names in transformers' in-memory naming.

        Returns:
            The in-memory names, in the order of `entries`.
        """
        return list(self.entries)

    def __contains__(self, name) -> bool:
        return name in self.entries

    def entry(self, name: str) -> _Entry:
        """The shape and dtype of in-memory tensor `name`.

        Args:
            name: an in-memory tensor name.

        Returns:
            Its entry (shape and dtype).

        Raises:
            LoratvError: naming the base, when it has no tensor of that in-memory name.
        """
        try:
            return self.entries[name]
        except KeyError:
            raise LoratvError(f"{self.label}: has no tensor '{name}' (in transformers' in-memory names).") from None


@dataclass
class Layout:
    """transformers' load-time mapping of one base checkpoint: on-disk names -> in-memory names."""

    base: Checkpoint
    model_type: str
    renamed: dict  # in-memory name -> on-disk name (a one-to-one WeightRenaming)
    fused: dict  # in-memory name -> (WeightConverter, {source pattern: [on-disk names, in load order]})
    shapes: dict  # in-memory name -> shape, from the model transformers builds from config.json (meta device)
    conversions: list = field(default_factory=list)  # the rules, as get_model_conversion_mapping returned them
    pieces: dict = field(default_factory=dict)  # in-memory name -> [Piece], made when first needed

    def view(self) -> LayoutView:
        """The base under its in-memory names: renamed tensors with their stored shapes, fused ones with the shape
        transformers gives them.

        Returns:
            A LayoutView of the base, one entry per renamed or fused in-memory tensor (dtype from its on-disk source).
        """
        entries = {}
        for mem, disk in self.renamed.items():
            entry = self.base.entry(disk)
            entries[mem] = _Entry(tuple(entry.shape), entry.dtype)
        for mem, (_, sources) in self.fused.items():
            first = next(iter(sources.values()))[0]
            entries[mem] = _Entry(tuple(self.shapes[mem]), self.base.entry(first).dtype)
        return LayoutView(self.base, entries)

    def disk_pieces(self, name: str) -> list:
        """The on-disk pieces of fused in-memory parameter `name`, each with its place in the fused tensor.

        Args:
            name: a fused in-memory parameter name (a key of `fused`).

        Returns:
            Its Pieces, computed once and kept in `pieces`.

        Raises:
            LoratvError: an operation loratv cannot invert exactly, or pieces that do not tile the parameter.
        """
        if name not in self.pieces:
            self.pieces[name] = _pieces(self, name)
        return self.pieces[name]

    def bind(self, adapter, bind_fn):
        """Bind `adapter` against the in-memory names, then map the plan onto the base's on-disk names.

        Args:
            adapter: the adapter (its names are the in-memory ones).
            bind_fn: adapter.bind, called with the in-memory view.

        Returns:
            The MergePlan keyed by on-disk names (fused deltas split into one Piece module per on-disk tensor).

        Raises:
            LoratvError: a whole-tensor replacement or trained token rows of a fused parameter, or a non-LoRA tuner
                on one (their merge is not defined piece by piece).
        """

        plan = bind_fn(adapter, self.view())
        file = adapter.tensors.path
        deltas: dict = {}
        for name, modules in plan.deltas.items():
            if name in self.renamed:
                deltas.setdefault(self.renamed[name], []).extend(modules)
                continue
            for module in modules:
                if not isinstance(module, LoraModule) or not module.additive:
                    raise LoratvError(f"{file}: '{module.module}' puts a non-additive update on '{name}', which "
                                      f"the base {self.base.path} stores in pieces; loratv merges only LoRA there.")
            for piece in self.disk_pieces(name):
                deltas.setdefault(piece.disk, []).extend(replace(m, piece=piece) for m in modules)
        replacements = {}
        for name, key in plan.replacements.items():
            if name not in self.renamed or key == TOKEN_ROWS:
                what = "trained token rows of" if key == TOKEN_ROWS else f"'{key}' replaces"
                raise LoratvError(f"{file}: {what} '{name}', which the base {self.base.path} stores under other "
                                  "names or in pieces; loratv does not map that across layouts yet.")
            replacements[self.renamed[name]] = key
        bias_additions = {self.renamed.get(n, n): m for n, m in plan.bias_additions.items()}
        new_tensors = {self._disk_name(n): (src, self.renamed.get(k, k) if src == "base" else k)
                       for n, (src, k) in plan.new_tensors.items()}
        notes = list(plan.notes) + [
            f"the adapter names transformers' in-memory modules; mapped onto the on-disk names of {self.base.path} "
            f"with transformers' conversion rules for model_type '{self.model_type}'."]
        return replace(plan, deltas=deltas, replacements=replacements, bias_additions=bias_additions,
                       new_tensors=new_tensors, notes=notes)

    def _disk_name(self, name: str) -> str:
        """The on-disk name of an in-memory tensor the base does not store (an untied head), as save_pretrained
        names it: the rules reversed, converters first, then renamings (core_model_loading.revert_weight_conversion),
        only those loading this checkpoint used (the legacy and prefix rules are not bijective)."""
        if name in self.renamed:
            return self.renamed[name]
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        reverse = []
        for rule in self.conversions[::-1]:
            if not rule.was_used():
                continue
            try:
                reverse.append(rule.reverse_transform())
            except Exception:  # a rule without an inverse cannot have named a stored tensor
                continue
        renamings = [r for r in reverse if isinstance(r, WeightRenaming)]
        converters = [r for r in reverse if isinstance(r, WeightConverter)]
        return rename_source_key(name, renamings, converters, reverse=True)[0]


def _pieces(layout: Layout, name: str) -> list:
    """Invert transformers' stacking of `name`: MergeModulelist(dim=0) stacks each source pattern's tensors in load
    order (expert e is the e-th), Concatenate(dim=c) joins the patterns in the converter's order along c."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    converter, sources = layout.fused[name]
    shape = tuple(layout.shapes[name])
    ops = list(converter.operations)
    names = [type(op).__name__ for op in ops]
    stacked = bool(ops) and isinstance(ops[0], MergeModulelist)
    if stacked:
        if ops[0].dim != 0:
            raise _unsupported(layout, name, names)
        ops = ops[1:]
    if len(ops) > 1 or (ops and not isinstance(ops[0], Concatenate)):
        raise _unsupported(layout, name, names)
    concat = ops[0].dim if ops else None
    # the piece's axis: a stacked parameter has the expert axis first, which a piece lacks (a negative dim
    # counts from the end, the same in both)
    axis = None if concat is None else concat if concat < 0 or not stacked else concat - 1
    patterns = [p for p in converter.source_patterns if p in sources]
    pieces, offset = [], 0
    for pattern in patterns:
        keys = sources[pattern]
        if not stacked and len(keys) != 1:
            raise _unsupported(layout, name, names)
        part = tuple(layout.base.entry(keys[0]).shape)
        size = part[axis] if axis is not None else 0
        for e, key in enumerate(keys):
            if tuple(layout.base.entry(key).shape) != part:
                raise LoratvError(f"{layout.base.path}: '{key}' has shape {list(layout.base.entry(key).shape)}, unlike "
                                  f"the other pieces transformers stacks into '{name}' ({list(part)}).")
            index = [slice(None)] * (len(shape) - (1 if stacked else 0))
            if axis is not None:
                index[axis] = slice(offset, offset + size)
            pieces.append(Piece(key, name, e if stacked else None, tuple(index)))
        offset += size
    probe = torch.empty(shape, device="meta")
    for piece in pieces:
        got = tuple((probe[piece.expert] if piece.expert is not None else probe)[piece.index].shape)
        if got != tuple(layout.base.entry(piece.disk).shape):
            raise LoratvError(f"{layout.base.path}: '{piece.disk}' ({list(layout.base.entry(piece.disk).shape)}) does "
                              f"not tile transformers' '{name}' {list(shape)} as its conversion rule stacks it.")
    experts = shape[0] if stacked else 1
    if stacked and any(len(sources[p]) != experts for p in patterns):
        raise LoratvError(f"{layout.base.path}: stores {sorted(len(sources[p]) for p in patterns)} pieces of "
                          f"'{name}', which holds {experts} experts.")
    return pieces


def _unsupported(layout, name, ops) -> LoratvError:
    return LoratvError(f"{layout.base.path}: transformers builds '{name}' from its on-disk pieces with "
                       f"{' + '.join(ops)}, which loratv cannot split back exactly yet (it inverts MergeModulelist "
                       "and Concatenate).")


# ---------------------------------------------------------------- finding the layout


def _adapter_names(adapter) -> list:
    """(what, in-memory name) for every base name the adapter refers to before the base resolves it."""
    names = [(f"module '{m.module}' targets", m.target) for m in adapter.modules.values()]
    names += [(f"tensor '{k}' replaces", n) for n, k in adapter.replacements.items()]
    names += [("trained token rows of", n) for n in adapter.token_rows]
    return names


def _param_owners(adapter) -> list:
    owners = []
    for nested in adapter.param_groups:
        owner = nested
        while owner.endswith(".base_layer"):
            owner = owner[: -len(".base_layer")]
        owners.append(owner)
    return sorted(set(owners))


def _missing(adapter, base) -> list:
    """(what, name) the base does not store under that name (a tied output embedding is not missing)."""
    tied = (base.config or {}).get("tie_word_embeddings", True)
    missing = [(what, n) for what, n in _adapter_names(adapter)
               if n not in base and not (tied and n in OUTPUT_EMBEDDINGS)]
    if adapter.param_groups:
        parents = {n.rpartition(".")[0] for n in base.names()}
        missing += [("a target_parameters LoRA names module", o) for o in _param_owners(adapter) if o not in parents]
    return missing


def layout_for(adapter, base):
    """The transformers layout mapping `adapter`'s in-memory names onto `base`'s on-disk names, or None when the
    names already agree (transformers is not imported then) or no mapping explains the difference (bind then says
    what the base lacks).

    Args:
        adapter: a loaded adapter whose module names are final (PEFT keys; not kohya names awaiting the base).
        base: the base Checkpoint.

    Returns:
        A Layout, or None.

    Raises:
        LoratvError: transformers is not installed while the names differ (the sentence names the extra), or the
            names belong to another layout that transformers cannot map (the sentence says which two).
    """
    if isinstance(base, LayoutView) or adapter.settings is None:
        return None
    missing = _missing(adapter, base)
    if not missing:
        return None
    config = base.config or {}
    model_type = config.get("model_type")
    if not model_type:
        return None
    what, name = missing[0]
    try:
        import transformers  # noqa: F401
        from transformers.conversion_mapping import get_model_conversion_mapping  # noqa: F401
    except ImportError:
        raise LoratvError(f"{adapter.tensors.path}: {what} '{name}', which the base model {base.path} lacks under "
                          f"that name; a base saved in transformers' on-disk layout (model_type '{model_type}') is "
                          f"mapped onto the adapter's in-memory names with transformers: {EXTRA}.") from None
    layout = _build(base, model_type)
    if layout is not None:
        view = layout.view()
        if len(_missing(adapter, view)) < len(missing):
            return layout
    described = describe_mismatch(name, base)
    if described:
        raise LoratvError(f"{adapter.tensors.path}: {described}, and transformers has no conversion rule between "
                          f"the two for model_type '{model_type}'.")
    return None


def _build(base, model_type: str):
    """transformers' conversion rules for the base's architecture, applied to every on-disk name as loading does;
    None when the library has none that rename or fuse anything here."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key


    try:  # the module tree and shapes, no memory: what from_pretrained builds first (meta_model.py)
        model = build_meta_model(base.config or {}, str(base.root / "config.json"))[0]
    except LoratvError:  # an architecture this transformers does not know or cannot build: no rules to apply
        return None
    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    meta = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    prefix = model.base_model_prefix
    renamed: dict[str, str] = {}
    fused: dict = {}
    # convert_and_load_state_dict_in_model: keys in dot_natural_key order, renamings then at most one converter
    for key in sorted(base.names(), key=dot_natural_key):
        mem, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if mem not in meta and key in meta:
            mem, pattern = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=meta)
        if mem not in meta:
            continue
        if pattern is not None:
            converter = next(c for c in converters if pattern in c.source_patterns)
            fused.setdefault(mem, (converter, {}))[1].setdefault(pattern, []).append(key)
        else:
            renamed[mem] = key
    if not fused and all(mem == disk for mem, disk in renamed.items()):
        return None
    return Layout(base, model_type, renamed, fused, meta, conversions)


# ---------------------------------------------------------------- naming the layouts in an error


def _natural(name: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


def per_expert_example(base, owner: str) -> str | None:
    """A real on-disk name of one expert in owner's layer (`….experts.0.gate_proj.weight`, `….experts.0.w1.weight`)
    when the base stores the experts of that layer one by one; None otherwise.

    Args:
        base: the base Checkpoint.
        owner: an in-memory module name (`….mlp.experts`), whose last part names the expert list.

    Returns:
        The first such name in natural order, or None.
    """
    leaf = owner.rpartition(".")[2]
    layer = re.search(r"(?:^|\.)([A-Za-z_]+\.\d+)\.", owner)  # "layers.0": the same layer, under any prefix
    one_by_one = re.compile(rf"(?:^|\.){re.escape(leaf)}\.\d+\.")
    for n in sorted(base.names(), key=_natural):
        if one_by_one.search(n) and (layer is None or f".{layer.group(1)}." in f".{n}"):
            return n
    return None


def describe_mismatch(name: str, base) -> str | None:
    """Which two layouts `name` (in-memory) and the base's names belong to, when the base clearly stores the same
    tensor under another prefix or one expert at a time; None when nothing explains it.

    Args:
        name: a tensor or module name from the adapter.
        base: the base Checkpoint.

    Returns:
        A clause for an error sentence, or None.
    """
    parts = name.split(".")
    best, best_len = None, 0
    for n in base.names():
        other = n.split(".")
        k = 0
        while k < min(len(parts), len(other)) and parts[-1 - k] == other[-1 - k]:
            k += 1
        if k > best_len:
            best, best_len = n, k
    digit = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    needed = len(parts) - digit + 1 if digit is not None else 2  # the layer index and what follows, and one more
    if best is not None and best_len >= min(needed, len(parts)) and best_len < len(best.split(".")):
        mine = ".".join(parts[: len(parts) - best_len])
        theirs = ".".join(best.split(".")[: -best_len])
        return (f"the adapter names the in-memory transformers-5 modules ({mine}.…) while the base file stores "
                f"{theirs}.… ('{best}')")
    owner = name if not name.endswith(".weight") else name.rpartition(".")[0]
    for candidate in (owner, owner.rpartition(".")[0]):
        example = per_expert_example(base, candidate) if candidate else None
        if example:
            return (f"the adapter names the fused in-memory expert stacks of '{candidate}' while the base file "
                    f"stores the experts one by one ('{example}')")
    return None


# ---------------------------------------------------------------- the delta of one piece


def _factors(adapter, module, dtype, device, factor_dtype):
    a, b = adapter.factor(module.a_key), adapter.factor(module.b_key)
    if factor_dtype is not None:  # as loading the adapter into a model of that dtype rounds them
        a, b = a.to(factor_dtype), b.to(factor_dtype)
    return a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)


def piece_rows(adapter, module, start: int, stop: int, dtype, device, factor_dtype=None) -> torch.Tensor:
    """Rows [start, stop) of the slice of the fused ΔW that one on-disk piece receives.

    ΔW is evaluated as PEFT evaluates the fused parameter's (ParamWrapper's einsum, for the piece's expert alone:
    one GEMM per expert, alone or batched; B@A·s for a 2-D parameter), then sliced: each element is the value PEFT
    adds to the same element of the fused parameter.

    Args:
        adapter: the adapter holding the factors.
        module: a LoraModule whose `piece` is a layouts.Piece.
        start: first row of the on-disk tensor.
        stop: one past its last row.
        dtype: the dtype ΔW is computed in.
        device: the device it is computed on.
        factor_dtype: when given, the factors are first rounded to it.

    Returns:
        The rows, in the on-disk tensor's orientation.

    Raises:
        LoratvError: naming the adapter file, when a piece with no expert index belongs to a module whose kind is
            not linear, conv1d or embedding.
    """

    piece = module.piece
    a, b = _factors(adapter, module, dtype, device, factor_dtype)
    if piece.expert is not None:
        whole = expert_delta(a, b, module.r, module.scale, module.kind, piece.expert, piece.expert + 1)[0]
    elif module.kind == "linear":
        whole = (b @ a) * module.scale
    elif module.kind in ("conv1d", "embedding"):
        whole = ((b @ a) * module.scale).T
    else:
        raise LoratvError(f"{adapter.tensors.path}: '{module.module}' ({module.kind}) lands on '{piece.disk}', one "
                          "piece of a fused parameter, which loratv splits only for LoRA on matrices and experts.")
    return whole[piece.index][start:stop]


def piece_factors(adapter, module):
    """The piece's ΔW as lowrank.Factors (float64, stored orientation): for expert e, ΔW_e = s·B_e@A_e with
    A_e = A.reshape(E, r, in)[e], B_e = B.reshape(out, r, E)[:, :, e]; a slice of rows or columns of ΔW is the
    same slice of B_e or A_e.

    Args:
        adapter: the adapter holding the factors.
        module: a LoraModule whose `piece` is a layouts.Piece.

    Returns:
        A lowrank.Factors for the piece.
    """

    piece = module.piece
    a, b = adapter.factor(module.a_key), adapter.factor(module.b_key)
    if piece.expert is not None:
        experts = a.shape[0] // module.r
        a = a.reshape(experts, module.r, a.shape[-1])[piece.expert]
        b = b.reshape(b.shape[0], module.r, experts)[:, :, piece.expert]
    rows, cols = (tuple(piece.index) + (slice(None), slice(None)))[:2]
    if module.kind in ("experts", "linear"):  # stored (out, in): rows are B's, columns A's
        return Factors.from_lora(a[:, cols], b[rows], module.scale, transposed=False)
    return Factors.from_lora(a[:, rows], b[cols], module.scale, transposed=True)  # stored (in, out)
