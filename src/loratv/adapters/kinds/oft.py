"""OFT (peft_type OFT): W' = W @ Rᵀ, R block-diagonal orthogonal from the Cayley transform of skew blocks
(docs/peft-format.md §4, PEFT's src/peft/tuners/oft/layer.py)."""

import math

import torch

from loratv.adapters.kind import ROUTED_KEY, AdapterKind, TunerModule, tensor_shape
from loratv.errors import LoratvError


def oft_rotation(adapter, module: TunerModule, dtype, device, absolute: bool = False) -> torch.Tensor:
    """The per-block rotations (blocks, b, b), as PEFT's OFTRotationModule._cayley_batch builds them.

    Args:
        adapter: the adapter.
        module: an OFT module.
        dtype: the dtype.
        device: the device.
        absolute: build the same series on |Q| (compare's G).

    Returns:
        The rotations.
    """
    o = module.options
    vec = adapter.factor(module.keys["oft_R.weight"]).to(device=device, dtype=dtype)
    vec = vec.abs() if absolute else vec
    b, count = o["block"], vec.shape[0]
    rows, cols = torch.triu_indices(b, b, 1, device=device)
    q = torch.zeros(count, b, b, device=device, dtype=dtype)
    q[:, rows, cols] = vec
    q = q + q.transpose(-2, -1) if absolute else q - q.transpose(-2, -1)  # disjoint triangles: |Q| exactly
    if not o["neumann"]:
        eye = torch.eye(b, device=device, dtype=dtype).unsqueeze(0).expand(count, b, b)
        return torch.linalg.solve(eye + q, eye - q, left=False)
    r = torch.eye(b, device=device, dtype=dtype).repeat(count, 1, 1)
    n = o["terms"]
    if n > 1:
        r.add_(q, alpha=2.0)
        if n > 2:
            power = torch.bmm(q, q)
            r.add_(power, alpha=2.0)
            for _ in range(3, n - 1):
                power = torch.bmm(power, q)
                r.add_(power, alpha=2.0)
            power = torch.bmm(power, q)
            r.add_(power)
    return r


class OftKind(AdapterKind):
    """OFT: block-diagonal orthogonal rotations of the weight's input axis."""

    peft_type = "OFT"
    display_name = "OFT"
    config_fields = frozenset({
        "r", "oft_block_size", "module_dropout", "target_modules", "fan_in_fan_out", "bias", "exclude_modules",
        "init_weights", "layers_to_transform", "layers_pattern", "modules_to_save", "coft", "eps", "block_share",
        "use_cayley_neumann", "num_cayley_neumann_terms"})
    stored_tensor_roles = ("oft_R.weight",)
    multiplicative = True
    supports_conv = True
    refuses_conv1d = True
    update = "multiplicative: W' = W @ Rᵀ, R block-diagonal orthogonal (Cayley)"

    def routed(self, adapter) -> str | None:
        """Constrained OFT (coft: its parameters projected at merge time) and OFT on Embedding layers
        (oft_embedding_R) are merged by PEFT's own code (kinds/peft_backed.py).

        Args:
            adapter: the adapter, before its keys are mapped.

        Returns:
            "OFT+PEFT" for those cases, else None.
        """
        if adapter.settings.raw.get("coft") or any(".oft_embedding_R" in k for k in adapter.tensors.names()):
            return ROUTED_KEY.format("OFT")
        return None

    def check_key(self, adapter, key: str, name: str) -> None:
        if ".oft_embedding_R" in name:
            raise LoratvError(f"{adapter.tensors.path}: tensor '{key}' is OFT on an Embedding layer "
                              "(oft_embedding_R), which loratv does not merge: PEFT's OFT Embedding rotates the "
                              "embedding dimension of every row (W @ R), a layout loratv's OFT merge and its rounding "
                              "bound do not cover.")

    def build_module(self, adapter, module: str, keys: dict) -> TunerModule:
        shape = tensor_shape(adapter, keys["oft_R.weight"])
        block = (1 + math.isqrt(1 + 8 * shape[1])) // 2 if len(shape) == 2 else 0
        if len(shape) != 2 or block * (block - 1) // 2 != shape[1] or block < 2:
            raise LoratvError(f"{adapter.tensors.path}: OFT module '{module}' stores oft_R {list(shape)}, which is "
                              "not (blocks, b(b−1)/2).")
        raw = adapter.settings.raw
        options = {"block": block, "blocks": shape[0], "block_share": bool(raw.get("block_share")),
                   "neumann": raw.get("use_cayley_neumann", True) is not False,
                   "terms": int(raw.get("num_cayley_neumann_terms", 5))}
        return TunerModule(module, module + ".weight", "OFT", keys, shape[0], None, 1.0, options)

    def fit_problem(self, adapter, module: TunerModule, shape: tuple) -> str | None:
        if module.kind == "conv1d":
            return "is a Conv1D weight (fan_in_fan_out), which OFT does not rotate in loratv"
        if len(shape) > 2 and (len(shape) != 4 or shape[2] != shape[3]):
            return "is not a square Conv2d kernel (PEFT's OFT assumes kernel_size[0]²)"
        inp, o = math.prod(shape[1:]), module.options
        wanted_blocks = 1 if o["block_share"] else inp // o["block"]
        if inp % o["block"] or o["blocks"] != wanted_blocks:
            return f"has {inp} inputs, which {o['blocks']} OFT blocks of size {o['block']} do not cover"
        return None

    def merged_value(self, adapter, module, w):
        """W rotated block by block (Conv2d: the weight viewed as (out, in·k·k))."""
        rotation = oft_rotation(adapter, module, w.dtype, w.device)
        flat = w.reshape(w.shape[0], -1)
        count = flat.shape[1] // module.options["block"]
        blocks = [rotation[0 if module.options["block_share"] else i] for i in range(count)]
        return torch.mm(torch.block_diag(*blocks), flat.t()).t().reshape(w.shape)

    def apply_rows(self, adapter, module, x, start, stop, absolute=False, cache=None):
        """Rows [start, stop) rotated along the input axis, in float64."""
        cache = {} if cache is None else cache
        key = ("abs" if absolute else "value", module.peft_type)
        if key not in cache:
            cache[key] = oft_rotation(adapter, module, torch.float64, x.device, absolute)
        rotation, b = cache[key], module.options["block"]
        blocks = x.reshape(x.shape[0], -1, b)
        if module.options["block_share"]:
            return torch.einsum("okj,ij->oki", blocks, rotation[0]).reshape(x.shape)
        return torch.einsum("okj,kij->oki", blocks, rotation).reshape(x.shape)

    def depth(self, module, shape) -> int:
        b, n = module.options["block"], module.options["terms"]
        # R = I + 2Q + … + Q^(n−1): Q^k has depth (k−1)·b, n−1 additions; then a length-b dot product with W
        return max(n - 2, 0) * b + max(n - 1, 0) + b + 1

    def check_certifiable(self, adapter, module: TunerModule) -> None:
        if not module.options["neumann"]:
            raise LoratvError(f"{adapter.config_path}: OFT with use_cayley_neumann = false inverts I + Q per block; "
                              "loratv merges it (as PEFT does) but has no certified bound for the inverse, so compare "
                              "refuses it.")


KIND = OftKind()
