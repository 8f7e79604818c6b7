"""LoRA on raw parameters (target_parameters, PEFT's ParamWrapper), MoE expert stacks included (reference §3.3).

The key mapping that records and resolves these modules against the base (`_register_param_owner`,
`_resolve_target_parameters`) is LoRA's (loratv/adapters/kinds/lora.py); what is the variant's own is which
parameter a LoRA fits (`_param_fit`) and the expert-stack ΔW (`expert_delta`).
"""

import torch

from loratv.adapters.kinds.lora_variants.base import LoraVariant, lora_factors

TRANSPOSED_EXPERT_MODELS = {"gpt_oss", "openai_privacy_filter", "aria"}  # MoE stacks stored (E, in, out)


def _param_fit(a, b, shape, config):
    """The kind of a ParamWrapper LoRA (A (r·E, in), B (out, r·E)) on a raw parameter of `shape`, or None."""
    if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
        return None
    if len(shape) == 2:
        return "linear" if tuple(shape) == (b[0], a[1]) else None
    if len(shape) != 3 or a[0] % shape[0]:
        return None
    swapped, transposed = (shape[0], b[0], a[1]), (shape[0], a[1], b[0])
    if swapped == transposed == tuple(shape):  # square experts: the model class decides (is_transposed)
        return "experts_t" if (config or {}).get("model_type") in TRANSPOSED_EXPERT_MODELS else "experts"
    return {swapped: "experts", transposed: "experts_t"}.get(tuple(shape))


def expert_delta(a, b, r: int, scale: float, kind: str, start: int, stop: int) -> torch.Tensor:
    """ΔW of experts [start, stop) of a 3-D stack: A (r·E, in) reshaped expert-major (E, r, in), B (out, r·E)
    expert-minor (out, r, E); (E, out, in), or (E, in, out) for a transposed stack (reference §3.3).

    Args:
        a: lora_A (r·E, in).
        b: lora_B (out, r·E).
        r: the rank per expert.
        scale: the LoRA scale s.
        kind: "experts" (stored (E, out, in)) or "experts_t" (stored (E, in, out)).
        start: first expert.
        stop: one past the last expert.

    Returns:
        ΔW of those experts.
    """
    experts = a.shape[0] // r
    wa = a.reshape(experts, -1, a.shape[-1])[start:stop]
    wb = b.reshape(b.shape[0], -1, experts)[:, :, start:stop]
    pattern = "o r e, e r i -> e o i" if kind == "experts" else "o r e, e r i -> e i o"
    return torch.einsum(pattern, wb, wa) * scale


class TargetParametersVariant(LoraVariant):
    """target_parameters: a LoRA on a raw parameter (named by the parameter itself, `module == target`), merged as
    ParamWrapper does; a 3-D expert stack ("experts"/"experts_t") is merged expert by expert (`expert_delta`)."""

    name = "target_parameters"
    display_name = "target_parameters"
    config_field = "target_parameters"

    def applies(self, adapter, module) -> bool:
        """A module built from a raw parameter: the config sets target_parameters and the module is the parameter.

        Args:
            adapter: the adapter.
            module: the LoraModule.

        Returns:
            Whether the module is a ParamWrapper LoRA.
        """
        return bool(adapter.settings.raw.get("target_parameters")) and module.module == module.target

    def delta_rows(self, adapter, module, start: int, stop: int, dtype: torch.dtype, device,
                   factor_dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """Experts [start, stop) of a 3-D stack (one GEMM per expert, the same alone or batched); None for a 2-D
        parameter, whose ΔW is plain LoRA's.

        Args:
            adapter: the adapter.
            module: the bound LoraModule.
            start: first expert.
            stop: one past the last expert.
            dtype: the compute dtype.
            device: the compute device.
            factor_dtype: when given, the factors are first rounded to it.

        Returns:
            ΔW of those experts, or None.
        """
        if module.kind not in ("experts", "experts_t"):
            return None
        a, b = lora_factors(adapter, module, dtype, device, factor_dtype)
        return expert_delta(a, b, module.r, module.scale, module.kind, start, stop)


TARGET_PARAMETERS = TargetParametersVariant()
