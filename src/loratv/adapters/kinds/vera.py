"""VeRA (peft_type VERA): ΔW = (λ_b ⊙ B)@(λ_d ⊙ A), with projections A, B shared by every module and saved once
(docs/peft-format.md §4, PEFT's src/peft/tuners/vera/layer.py)."""

from loratv.adapters.kind import AdapterKind, TunerModule, module_tensors, require, tensor_shape
from loratv.errors import LoratvError


class VeraKind(AdapterKind):
    """VeRA: per-module scaling vectors around shared random projections."""

    peft_type = "VERA"
    display_name = "VeRA"
    config_fields = frozenset({
        "r", "target_modules", "projection_prng_key", "save_projection", "vera_dropout", "d_initial",
        "fan_in_fan_out", "bias", "modules_to_save", "init_weights", "layers_to_transform", "layers_pattern"})
    stored_tensor_roles = ("vera_lambda_b", "vera_lambda_d")
    shared_tensors = {"base_model.vera_A": "vera_A", "base_model.vera_B": "vera_B"}
    update = "additive: ΔW = (λ_b ⊙ B)@(λ_d ⊙ A) with shared A, B"

    def check_config(self, config: dict, path) -> None:
        if config.get("save_projection") is False:
            raise LoratvError(f"{path}: VeRA with save_projection = false regenerates its shared projections from "
                              "torch's CPU random generator; loratv merges only adapters that store them "
                              "(save_projection = true).")

    def check_groups(self, adapter, groups: dict, shared: dict) -> None:
        if groups and len(shared) != 2:
            raise LoratvError(f"{adapter.tensors.path}: VeRA adapter without its shared projections base_model.vera_A "
                              "/ vera_B (saved with save_projection = false?).")

    def build_module(self, adapter, module: str, keys: dict) -> TunerModule:
        require(adapter, module, keys, "vera_lambda_b", "vera_lambda_d")
        lb, ld = tensor_shape(adapter, keys["vera_lambda_b"]), tensor_shape(adapter, keys["vera_lambda_d"])
        va, vb = tensor_shape(adapter, keys["vera_A"]), tensor_shape(adapter, keys["vera_B"])
        if len(lb) != 1 or len(ld) != 1 or len(va) != 2 or len(vb) != 2 or not (ld[0] == va[0] == vb[1]):
            raise LoratvError(f"{adapter.tensors.path}: VeRA module '{module}' has inconsistent shapes (lambda_b "
                              f"{list(lb)}, lambda_d {list(ld)}, vera_A {list(va)}, vera_B {list(vb)}).")
        return TunerModule(module, module + ".weight", "VERA", keys, ld[0], None, 1.0, {"out": lb[0]})

    def fit_problem(self, adapter, module: TunerModule, shape: tuple) -> str | None:
        out, inp = shape if module.kind == "linear" else shape[::-1]
        va, vb = tensor_shape(adapter, module.keys["vera_A"]), tensor_shape(adapter, module.keys["vera_B"])
        if module.options["out"] != out or va[1] < inp or vb[0] < out:
            return (f"({out} out, {inp} in) does not fit lambda_b {module.options['out']} or vera_A/B "
                    f"{list(va)}/{list(vb)}")
        return None

    def additive_delta(self, adapter, module, shape, dtype, device, absolute=False, exact_scale=False):
        """ΔW on the projections sliced to the weight, as PEFT's VeraLayer.get_delta_weight."""
        t = module_tensors(adapter, module, dtype, device, absolute)
        out, inp = shape if module.kind == "linear" else shape[::-1]
        sliced_a, sliced_b = t["vera_A"][:, :inp], t["vera_B"][:out, :]
        delta = (t["vera_lambda_b"].unsqueeze(-1) * sliced_b) @ (t["vera_lambda_d"].unsqueeze(-1) * sliced_a)
        return delta if module.kind == "linear" else delta.T

    def depth(self, module, shape) -> int:
        return module.r + 2


KIND = VeraKind()
