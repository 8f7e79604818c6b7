"""DoRA (use_dora), the LoRA variant W' = m ⊙ (W + ΔW)/‖W + ΔW‖ (PEFT's DoraLinearVariant and its Conv1D, Embedding
and ConvNd siblings): its magnitude check, its merge (`dora_merge`) and, in compare, the exact merged-minus-base
delta and a per-element bound on what the merge's rounding can leave.

The merge (docs/math.md §10) is M = cast_d(f_c ⊙ V_c), V_c = fl_c(W + ΔW_c), f_c = fl_c(m / n_c), n_c = ‖V_c‖ along the
input axis, all in the compute dtype c. Exactly, M* = f* ⊙ V*, f* = m / ‖V*‖, V* = W + ΔW. With e_V a bound on
|V_c − V*| per element, δn a bound on |n_c − ‖V*‖| per feature and δf one on |f_c − f*| (docs/math.md §10):

    e_V = γ_k(u_c)·G + u_c·(|V*| + γ_k(u_c)·G)                      (ΔW's evaluation, then the add)
    δn  = ‖e_V‖ + γ_{L+2}(u_c)·(‖V*‖ + ‖e_V‖)                       (L terms summed, a square root, per feature)
    δf  = m·δn / (‖V*‖·(‖V*‖ − δn)) + u_c·(f* + m·δn / (‖V*‖·(‖V*‖ − δn)))
    |M − M*| ≤ ½ulp_d(M) + (1 + u_c)·(δf·(|V*| + e_V) + f*·e_V) + u_c·|f* V*|

γ_{L+2} is the worst case of any summation order, so the bound holds whatever order torch's norm uses; it is loose
by about L/log L against a pairwise sum, which the tolerance verdict then covers. Everything here is float64.
"""

from dataclasses import dataclass

import torch

from loratv.adapters.kinds.lora_variants.base import LoraVariant
from loratv.adapters.structures import Adapter, LoraModule
from loratv.errors import LoratvError
from loratv.numerics.precision import gamma, unit_roundoff

U64 = unit_roundoff(torch.float64)


@dataclass
class DoraTerms:
    """Per-feature factors of one DoRA tensor, computed once from the whole tensor."""

    kind: str  # "linear": features are rows; "conv1d"/"embedding": features are columns
    factor: torch.Tensor  # f* = m / ‖V*‖, float64, one per feature
    factor_error: torch.Tensor  # δf
    k: int  # longest dot product of ΔW plus two
    compute: torch.dtype

    def to(self, device) -> "DoraTerms":
        """A copy with the per-feature factors on `device`.

        Args:
            device: the torch device to move to.

        Returns:
            The new DoraTerms.
        """
        return DoraTerms(self.kind, self.factor.to(device), self.factor_error.to(device), self.k, self.compute)

    def along_rows(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """A per-feature vector shaped to broadcast against rows [start, stop) of the tensor.

        Args:
            x: one float64 value per feature (factor or factor_error).
            start: first row.
            stop: one past the last row.

        Returns:
            "linear": x's rows [start, stop) as a column; otherwise all of x as one row (features are columns).
        """
        return x[start:stop].view(-1, 1) if self.kind == "linear" else x.view(1, -1)

    def shaped(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """`x` (rows × 1 or 1 × columns) viewed to broadcast against `like` (a ConvNd block has trailing dims).

        Args:
            x: the output of along_rows.
            like: the rows of the tensor it multiplies.

        Returns:
            `x` with trailing unit dims up to like.dim() when like has more than 2 dims, else `x` itself.
        """
        return x.view(x.shape[0], *[1] * (like.dim() - 1)) if like.dim() > 2 else x

    def delta_and_bound(self, w_start: torch.Tensor, w: torch.Tensor, delta: torch.Tensor, g: torch.Tensor, start: int,
                        stop: int):
        """Rows of D = f*⊙(W₀ + ΔW) − W (W₀ the weight the merge starts from: the base, or the base layer the adapter
        saved), the bound on the evaluation error of D in float64, and a function of ulp_d(M) giving the merge bound
        of these rows.

        Args:
            w_start: rows [start, stop) of W₀, float64.
            w: rows [start, stop) of the base W, float64.
            delta: the same rows of ΔW, float64.
            g: the same rows of ΔW evaluated on absolute values (G).
            start: first row.
            stop: one past the last row.

        Returns:
            (D, the bound on D's evaluation error, bound(ulp_m) giving the per-element merge error bound), shaped
            like `w`.
        """
        u_c = unit_roundoff(self.compute)
        f = self.shaped(self.along_rows(self.factor, start, stop), w)
        fe = self.shaped(self.along_rows(self.factor_error, start, stop), w)
        v = w_start + delta
        merged = f * v
        d = merged - w
        # float64 evaluation: ΔW (γ_k(u64)·G), the add, the product, the subtraction: a few u64 of each magnitude
        evaluation = (gamma(self.k, torch.float64) * g * f.abs() + 4 * U64 * (merged.abs() + w.abs() + w_start.abs()))
        e_v = gamma(self.k, self.compute) * g
        e_v = e_v + u_c * (v.abs() + e_v)

        def bound(ulp_m: torch.Tensor) -> torch.Tensor:
            core = fe * (v.abs() + e_v) + f.abs() * e_v
            return 0.5 * ulp_m + (1 + u_c) * core + u_c * merged.abs()

        return d, evaluation, bound


def dora_terms(w: torch.Tensor, delta: torch.Tensor, g: torch.Tensor, magnitude: torch.Tensor, kind: str, k: int,
               compute: torch.dtype) -> DoraTerms:
    """f* and δf for one whole tensor: w, delta (float64 ΔW) and g (Σ|s|·|L|@|R|) in the stored orientation.

    Args:
        w: the float64 tensor the merge starts from.
        delta: ΔW in float64.
        g: the same product on absolute values.
        magnitude: m, one value per output feature.
        kind: "linear" (features are rows) or "conv1d"/"embedding" (features are columns).
        k: the longest dot product of ΔW plus two.
        compute: the merge's compute dtype.

    Returns:
        The DoraTerms.
    """
    u_c = unit_roundoff(compute)
    v = w + delta
    e_v = gamma(k, compute) * g
    e_v = e_v + u_c * (v.abs() + e_v)
    axis = 1 if kind == "linear" else 0  # the input axis
    length = v.shape[axis]
    norm = torch.linalg.vector_norm(v, dim=axis)
    norm_error = torch.linalg.vector_norm(e_v, dim=axis)
    # the float64 norm itself is off by at most γ_{L+2}(u64)·‖V‖: counted on the same side
    delta_n = norm_error + gamma(length + 2, compute) * (norm + norm_error) + gamma(length + 2, torch.float64) * norm
    m = magnitude.to(torch.float64)
    factor = m / norm
    spread = m.abs() * delta_n / (norm * (norm - delta_n).clamp(min=0))
    factor_error = spread + u_c * (factor.abs() + spread) + 2 * U64 * factor.abs()
    return DoraTerms(kind, factor, factor_error, k, compute)


def dora_merge(w: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, kind: str) -> torch.Tensor:
    """PEFT's DoRA merge of a whole tensor in the stored orientation, in the dtype of `w` and `delta` (the promoted one):
    V = W + ΔW, n = ‖V‖₂ along the input axis (rows of a Linear weight; columns of Conv1D/Embedding, computed on the
    transposed view as PEFT does), W' = (m / n) ⊙ V.

    Args:
        w: the whole base tensor in the compute dtype.
        delta: the whole ΔW, same dtype and orientation.
        magnitude: m, one value per output feature, same dtype.
        kind: the orientation, "linear", "conv1d", "embedding" or "conv".

    Returns:
        The merged tensor in the compute dtype.
    """
    if kind == "conv":  # _DoraConvNdVariant: norms over everything but the output channel
        norm = (w + 1 * delta).norm(p=2, dim=tuple(range(1, w.dim())), keepdim=True).transpose(1, 0)
        return (magnitude.view(norm.shape) / norm).view(-1, *[1] * (w.dim() - 1)) * (w + delta)
    if kind == "linear":
        norm = torch.linalg.norm(w + 1 * delta, dim=1)
        return (magnitude / norm).view(-1, 1) * (w + delta)
    norm = torch.linalg.norm(w.T + 1 * delta.T, dim=1)
    return (magnitude / norm).view(-1, 1).T * (w + delta)


def _check_magnitude(adapter, module: LoraModule, shape) -> None:
    """DoRA's m has one value per output feature: rows of a Linear weight, columns of Conv1D and Embedding weights."""
    want = shape[1] if module.kind in ("conv1d", "embedding") else shape[0]
    got = tuple(adapter.tensors.entry(module.magnitude_key).shape)
    if module.kind == "conv" and got == (1, want, *[1] * (len(shape) - 2)):
        return  # stored (1, out, 1, …), used per output channel
    if got != (want,):
        raise LoratvError(f"{adapter.tensors.path}: DoRA magnitude '{module.magnitude_key}' has shape {list(got)}, "
                          f"but module '{module.module}' has {want} output features.")


def refuse_dora(adapter: "Adapter", command: str) -> None:
    """Commands that treat the adapter as an additive ΔW cannot take DoRA (its merge rescales W + ΔW per feature).

    Args:
        adapter: the loaded adapter.
        command: the command's name, for the message.

    Raises:
        LoratvError: the adapter is DoRA.
    """
    if adapter.settings.use_dora:
        raise LoratvError(f"{adapter.config_path}: DoRA adapters are not additive (W' = m ⊙ (W + ΔW)/‖W + ΔW‖); "
                          f"loratv {command} does not handle them yet, only merge does.")


class DoraVariant(LoraVariant):
    """DoRA: the module stores a magnitude m (lora_magnitude_vector), and the merge rescales W + ΔW per output
    feature, W' = (m / ‖W + ΔW‖) ⊙ (W + ΔW), whole-tensor (not additive)."""

    name = "dora"
    display_name = "DoRA"
    config_field = "use_dora"
    additive = False

    def applies(self, adapter, module) -> bool:
        """A module with a magnitude key is DoRA (map_keys requires one on every module when use_dora is set).

        Args:
            adapter: the adapter.
            module: the LoraModule.

        Returns:
            Whether the module stores a DoRA magnitude.
        """
        return module.magnitude_key is not None

    def check_bound(self, adapter, module, base, target: str) -> None:
        """m has one value per output feature of the bound base tensor.

        Raises:
            LoratvError: the magnitude's shape does not match the output features.
        """
        _check_magnitude(adapter, module, base.entry(target).shape)

    def merge(self, adapter, module, w: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """PEFT's DoRA merge of the whole tensor (`dora_merge`), the magnitude in w's dtype and device.

        Args:
            adapter: the adapter.
            module: the bound LoraModule.
            w: the base tensor in the compute dtype.
            delta: the whole ΔW, same dtype.

        Returns:
            The merged tensor in the compute dtype.

        Raises:
            LoratvError: the magnitude holds NaN or Inf.
        """
        magnitude = adapter.factor(module.magnitude_key).to(device=w.device, dtype=w.dtype)
        return dora_merge(w, delta, magnitude, module.kind)

    def bound_terms(self, adapter, module, w: torch.Tensor, part, shape: tuple, compute: torch.dtype) -> DoraTerms:
        """compare's per-feature factors f* and δf for the module's whole tensor.

        Args:
            adapter: the adapter.
            module: the bound LoraModule (alone on its tensor).
            w: the float64 tensor the merge starts from (the base, or the saved base layer).
            part: the module's factors (numerics.lowrank.Factors), giving ΔW and G by rows.
            shape: the base tensor's shape.
            compute: the merge's compute dtype.

        Returns:
            The DoraTerms.

        Raises:
            LoratvError: the magnitude holds NaN or Inf.
        """
        kind = module.kind
        if kind == "conv":  # one feature per output channel, like the rows of a Linear weight
            w, kind = w.flatten(1), "linear"
        return dora_terms(w, part.rows(0, shape[0]), part.abs_rows(0, shape[0]),
                          adapter.factor(module.magnitude_key).flatten(), kind, part.rank + 2, compute)


DORA = DoraVariant()
