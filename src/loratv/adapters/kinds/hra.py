"""HRA (peft_type HRA): the weight's input axis reflected by r Householder reflections (PEFT's
src/peft/tuners/hra/layer.py):

    W' = W · H₁ ⋯ H_r,   H_i = I − 2 ûᵢûᵢᵀ,  ûᵢ = uᵢ / ‖uᵢ‖        (apply_GS false)
    W' = W · (I − 2 V Vᵀ),  V = Gram–Schmidt(u₁ … u_r)             (apply_GS true)

with W viewed as (out, in) for Linear and (out, in·k·k) for a square Conv2d kernel.

PEFT forms the n×n product and multiplies W by it: n³ operations per module (a 3072³ matmul for a StarCoder2-3B
projection). loratv applies the same product in its compact WY form (Schreiber and Van Loan, 1989),
H₁ ⋯ H_r = I − Û T Ûᵀ with T upper triangular r×r, so W' = W − ((W Û) T) Ûᵀ: two rank-r products, O(r·out·in),
evaluated in float64 and rounded once to the compute dtype. Its error is half an ulp of the result plus a float64
term far below it, so it is not PEFT's bits (PEFT rounds through every factor of its product, in the base dtype).
`peft_arithmetic` runs PEFT's own merge instead, bit for bit; compare's reference is this float64 evaluation, its
tolerance built from PEFT's own error (PeftTerms), so both merges pass.

Layers other than Linear and square Conv2d are left to PEFT's code (which refuses them, with its reason).
"""

import math

import torch

from loratv.adapters.kind import TunerModule
from loratv.adapters.kinds.peft_backed import PeftBackedKind

STRUCTURED_LAYERS = ("Linear", "Conv2d")  # layer classes PEFT's HRA wraps (HRALinear, HRAConv2d)


def householder_wy(u: torch.Tensor, apply_gs: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The compact WY form (Û, T) of HRA's reflection product, in float64: H₁ ⋯ H_r = I − Û T Ûᵀ.

    Without Gram–Schmidt, Ûᵢ = uᵢ/‖uᵢ‖ and T is built column by column from P_k H_{k+1} =
    I − [Û_k û][[T_k, −2 T_k Û_kᵀ û], [0, 2]][Û_k û]ᵀ. With it (PEFT's apply_GS), the columns are orthonormalised in
    order as PEFT does (each against the ones before it, one at a time) and T = 2I.

    Args:
        u: HRA's stored vectors, (n, r), one per column, any floating dtype.
        apply_gs: the adapter's apply_GS.

    Returns:
        (Û of shape (n, r), T of shape (r, r)), float64.
    """
    u = u.to(torch.float64)
    r = u.shape[1]
    if apply_gs:
        columns: list[torch.Tensor] = []
        for i in range(r):
            v = u[:, i]
            for w in columns:
                v = v - (w @ v) * w
            columns.append(v / v.norm())
        return torch.stack(columns, dim=1), 2 * torch.eye(r, dtype=torch.float64, device=u.device)
    unit = u / u.norm(dim=0)
    t = torch.zeros(r, r, dtype=torch.float64, device=u.device)
    for k in range(r):
        t[:k, k] = -2 * (t[:k, :k] @ (unit[:, :k].t() @ unit[:, k]))
        t[k, k] = 2
    return unit, t


def hra_merged_weight(weight: torch.Tensor, u: torch.Tensor, apply_gs: bool) -> torch.Tensor:
    """W · H₁ ⋯ H_r (or W · (I − 2VVᵀ) with Gram–Schmidt), in float64, through the compact WY form.

    Args:
        weight: the base weight, (out, in) or (out, in, k, k), any floating dtype.
        u: HRA's stored vectors, (in or in·k·k, r).
        apply_gs: the adapter's apply_GS.

    Returns:
        The merged weight in float64, shaped like `weight`.

    Raises:
        ValueError: u's row count is not the weight's flattened input size.
    """
    flat = weight.reshape(weight.shape[0], -1).to(torch.float64)
    if u.shape[0] != flat.shape[1]:
        raise ValueError(f"HRA vectors of length {u.shape[0]} do not fit a weight with {flat.shape[1]} inputs")
    unit, t = householder_wy(u.to(flat.device), apply_gs)
    return torch.addmm(flat, (flat @ unit) @ t, unit.t(), alpha=-1).reshape(weight.shape)


class HraKind(PeftBackedKind):
    """HRA: PEFT's tuner, merged through the compact WY form of its reflections (PEFT's own merge on request)."""

    def __init__(self):
        super().__init__("HRA", "HRA")
        self.update = ("multiplicative: W' = W·H₁⋯H_r, Householder reflections of the input axis, applied in compact "
                       "WY form in float64 (PEFT's own merge with peft_arithmetic)")

    def _vectors(self, adapter, module: TunerModule, shape: tuple) -> torch.Tensor | None:
        """The module's hra_u when the WY form applies (a Linear or square Conv2d that the vectors fit), else None."""
        if module.kind not in STRUCTURED_LAYERS or (len(shape) == 4 and shape[2] != shape[3]):
            return None
        key = module.options["state"]["owned"][module.module].get("hra_u")
        if key is None:
            return None
        u = adapter.factor(key)
        if u.dim() != 2 or u.shape[0] != math.prod(shape[1:]):
            return None  # PEFT's own merge refuses it, with its reason
        return u

    def merged_value(self, adapter, module: TunerModule, w: torch.Tensor) -> torch.Tensor:
        """The merged weight through the WY form in float64, rounded once to the compute dtype; the bias unchanged
        (HRA reflects the weight only). With `adapter.peft_arithmetic`, or a layer the form does not cover, PEFT's
        own merge (PeftBackedKind.merged_value).

        Args:
            adapter: the adapter.
            module: the bound module (its target the layer's weight or bias).
            w: the base tensor in the compute dtype.

        Returns:
            The merged tensor, in the compute dtype.

        Raises:
            LoratvError: PEFT's merge (the fallback) cannot merge the module.
        """
        leaf = module.target[len(module.module) + 1:]
        weight_shape = tuple(module.options["state"]["base"].entry(f"{module.module}.weight").shape)
        u = None if adapter.peft_arithmetic else self._vectors(adapter, module, weight_shape)
        if u is None:
            return super().merged_value(adapter, module, w)
        if leaf != "weight":
            return w
        return hra_merged_weight(w, u, bool(adapter.settings.raw.get("apply_GS"))).to(w.dtype)

    def merged_params(self, adapter, module: TunerModule, dtype: torch.dtype | None = None, *,
                      reference: bool = False) -> dict:
        """As PeftBackedKind.merged_params, except that compare's float64 reference is the WY form evaluated in
        float64 on float64 inputs (the same product as PEFT's program, without its n³ matmul).

        Args:
            adapter: the adapter.
            module: a bound module.
            dtype: the dtype PEFT's merge runs in (None: the base tensors' own).
            reference: the float64 reference.

        Returns:
            Parameter name -> merged tensor.

        Raises:
            LoratvError: PEFT cannot merge the module, or a stored tensor does not fit it.
        """
        state = module.options["state"]
        base = state["base"]
        u = self._vectors(adapter, module, tuple(base.entry(f"{module.module}.weight").shape)) if reference else None
        if u is None:
            return super().merged_params(adapter, module, dtype, reference=reference)
        params = {name: base.read(f"{module.module}.{name}").to(torch.float64) for name in module.options["params"]}
        params["weight"] = hra_merged_weight(params["weight"], u, bool(adapter.settings.raw.get("apply_GS")))
        return params


KIND = HraKind()
