"""A mergekit merge configuration (YAML), read as a typed recipe, and its parameters resolved per tensor.

The file a mergekit user already has is read as mergekit 0.1.5 reads a config with a `models:` list
(`mergekit/config.py`, `mergekit/parameter_resolver.py`, `mergekit/plan.py`):

- top level: `models`, `merge_method`, `base_model`, `parameters`, `dtype`, `out_dtype`, `tokenizer_source`
  (`base` or the base model's own only), `chat_template`; `slices:` and `modules:` layouts, a `tokenizer:` section and
  any other key are refused by name;
- each model: `model` (a folder or hub id, or mergekit's `model+lora`: an adapter on that model) and `parameters`;
- a setting is a scalar, a list (a gradient over the layers: numeric lists interpolate linearly at
  t = layer / (layers − 1), others pick element int(t·(len − 1))), or a list of `{filter, value}` entries (the first
  whose filter is absent, `*`, or a substring of the tensor name applies); tensors outside the layers have t = 0;
- a per-model parameter is looked up in the model's `parameters`, then in the top-level `parameters`, then its default;
  a shared one in the top-level `parameters`, then its default. A setting that no filter matches falls through.
"""

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from loratv.errors import BadInputError, UnsupportedAdapterError
from loratv.io.config_file import read_yaml_data
from loratv.merging.methods import METHODS, REQUIRED, MergeMethod, Parameter

TOP_LEVEL = {"models", "merge_method", "base_model", "parameters", "dtype", "out_dtype", "tokenizer_source",
             "chat_template", "slices", "modules", "tokenizer"}
REFUSED_TOP_LEVEL = {
    "slices": "a slice layout (layer ranges stacked or interleaved from several models)",
    "modules": "a per-module layout",
    "tokenizer": "a tokenizer section (vocabulary surgery)",
}
DTYPES = {"float32": "fp32", "fp32": "fp32", "float16": "fp16", "fp16": "fp16", "half": "fp16", "bfloat16": "bf16",
          "bf16": "bf16", "float64": "fp64", "fp64": "fp64"}
LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


@dataclass(frozen=True)
class InputModel:
    """One entry of `models:`: its reference as written and its own parameter settings."""

    model: str
    parameters: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    """A parsed merge configuration.

    Attributes:
        path: the YAML file.
        text: its text (recorded in the output's metadata).
        method: the merge method.
        models: the inputs in `models:` order.
        base_model: the base model reference, or None.
        parameters: the top-level parameter settings.
        dtype: the config's `dtype` as a precision name ("fp32", "bf16", …) or None.
        out_dtype: the config's `out_dtype` as a precision name, or None.
    """

    path: Path
    text: str
    method: MergeMethod
    models: tuple
    base_model: str | None
    parameters: dict
    dtype: str | None
    out_dtype: str | None

    def inputs(self) -> list[str]:
        """The model references whose tensors enter the method, in mergekit's order: `models:` order, then the base
        when it is not listed (mergekit adds it; linear then weighs it like any input).

        Returns:
            Model references, without repeats.
        """
        refs = [m.model for m in self.models]
        if self.base_model is not None and self.base_model not in refs:
            refs.append(self.base_model)
        return refs

    def shared_values(self, tensor: str, t: float) -> dict:
        """The shared parameters' values for one tensor.

        Args:
            tensor: the tensor name.
            t: its layer fraction (0 outside the layers).

        Returns:
            Parameter name -> value.

        Raises:
            BadInputError: a required parameter is missing, or a value is not of its type.
        """
        return {p.name: self._resolve(p, [self.parameters], tensor, t, None)
                for p in self.method.parameters if not p.per_model}

    def model_values(self, model: str, tensor: str, t: float) -> dict:
        """One input's per-model parameters for one tensor.

        Args:
            model: the input's reference.
            tensor: the tensor name.
            t: its layer fraction.

        Returns:
            Parameter name -> value.

        Raises:
            BadInputError: a required parameter is missing, or a value is not of its type.
        """
        own: dict = next((m.parameters for m in self.models if m.model == model), {})
        return {p.name: self._resolve(p, [own, self.parameters], tensor, t, model)
                for p in self.method.parameters if p.per_model}

    def _resolve(self, parameter: Parameter, scopes: list, tensor: str, t: float, model: str | None):
        for scope in scopes:
            if parameter.name in scope:
                value = _evaluate(scope[parameter.name], tensor, t, parameter, self.path)
                if value is not None:
                    return value
        if parameter.default is REQUIRED:
            where = f"model '{model}'" if model is not None else "the top-level parameters"
            raise BadInputError(f"{self.path}: merge method '{self.method.name}' needs parameter '{parameter.name}' "
                                f"for {where} (tensor {tensor}).")
        return parameter.default


def _typed(value, parameter: Parameter, path: Path):
    """A scalar checked against the parameter's type, as mergekit's validation would accept it."""
    if parameter.kind is bool:
        if isinstance(value, bool):
            return value
        raise BadInputError(f"{path}: parameter '{parameter.name}' must be true or false, not {value!r}.")
    if isinstance(value, bool):
        raise BadInputError(f"{path}: parameter '{parameter.name}' must be a number, not {value!r}.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise BadInputError(f"{path}: parameter '{parameter.name}' must be a number, not {value!r}.") from None
    if not math.isfinite(number):
        raise BadInputError(f"{path}: parameter '{parameter.name}' is not finite ({value!r}).")
    return number


def _evaluate(setting, tensor: str, t: float, parameter: Parameter, path: Path):
    """mergekit's evaluate_setting: a scalar, a gradient, or {filter, value} entries (first match)."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return _typed(setting, parameter, path)
    if not isinstance(setting, list):
        raise BadInputError(f"{path}: parameter '{parameter.name}' has a value of type {type(setting).__name__}.")
    if not setting:
        return None
    if all(isinstance(e, (bool, int, float, str)) for e in setting):
        values = [_typed(e, parameter, path) for e in setting]
        if parameter.kind is bool:
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        low = int(scaled)
        high = min(len(values) - 1, low + 1)
        frac = scaled - low
        return _typed((1 - frac) * values[low] + frac * values[high], parameter, path)
    for entry in setting:
        if not isinstance(entry, dict) or "value" not in entry or set(entry) - {"filter", "value"}:
            raise BadInputError(f"{path}: parameter '{parameter.name}' mixes values and entries that are not "
                                "{filter, value} pairs.")
        where = entry.get("filter")
        if where is None or where == "*" or (tensor and str(where) in tensor):
            return _evaluate(entry["value"], tensor, t, parameter, path)
    return None


def _reference(value, path: Path, key: str, lora_allowed: bool = False) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadInputError(f"{path}: '{key}' must name a model (a folder or hub id), not {value!r}.")
    if "+" in value:
        if not lora_allowed:
            raise UnsupportedAdapterError(f"{path}: '{key}' is '{value}', a model+LoRA reference, which "
                                          "merge-models reads only in 'models' entries.")
        model, _, lora = value.partition("+")
        if not model or not lora or "+" in lora:
            raise BadInputError(f"{path}: '{key}' is '{value}', not MODEL+LORA (one '+' between a model and an "
                                "adapter).")
    return value


def split_lora(reference: str) -> tuple[str, str | None]:
    """mergekit's `model+lora` reference split into (model, adapter), or (model, None).

    Args:
        reference: a `models:` entry's model.

    Returns:
        The model reference and the adapter reference (None without '+').
    """
    model, plus, lora = reference.partition("+")
    return (model, lora) if plus else (reference, None)


def _dtype(value, path: Path, key: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or value.lower() not in DTYPES:
        raise BadInputError(f"{path}: '{key}' must be one of float32, float16, bfloat16 or float64, not {value!r}.")
    return DTYPES[value.lower()]


def load_recipe(path: str | Path) -> Recipe:
    """Read and check a mergekit YAML configuration.

    Args:
        path: the YAML file.

    Returns:
        The Recipe.

    Raises:
        BadInputError: not a mapping, a missing or mistyped key, an unknown model or method parameter, a density
            outside (0, 1], or an unknown method.
        UnsupportedAdapterError: a key loratv refuses by name (slices, modules, a tokenizer section, a model+LoRA
            base_model, a tokenizer_source that builds a new vocabulary).
    """
    path = Path(path)
    data = read_yaml_data(path)
    if not isinstance(data, dict):
        raise BadInputError(f"{path}: not a merge configuration (expected a mapping with 'models' and "
                            "'merge_method').")
    unknown = sorted(str(k) for k in data if k not in TOP_LEVEL)
    if unknown:
        raise BadInputError(f"{path}: key '{unknown[0]}' is not a mergekit configuration key.")
    for key, what in REFUSED_TOP_LEVEL.items():
        if data.get(key) is not None:
            raise UnsupportedAdapterError(f"{path}: '{key}' is {what}, which merge-models does not run; give "
                                          "'models' with one entry per input model.")
    name = data.get("merge_method")
    if not isinstance(name, str):
        raise BadInputError(f"{path}: 'merge_method' is missing (one of {', '.join(METHODS)}).")
    if name not in METHODS:
        raise BadInputError(f"{path}: merge_method '{name}' is unknown (merge-models runs {', '.join(METHODS)}).")
    method = METHODS[name]
    source = data.get("tokenizer_source")
    if source not in (None, "base") and source != data.get("base_model"):
        raise UnsupportedAdapterError(f"{path}: tokenizer_source '{source}' builds a new vocabulary, which "
                                      "merge-models does not do; the base model's tokenizer files are copied.")
    entries = data.get("models")
    if not isinstance(entries, list) or not entries:
        raise BadInputError(f"{path}: 'models' must be a non-empty list of {{model, parameters}} entries.")
    models = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "model" not in entry or set(entry) - {"model", "parameters"}:
            raise BadInputError(f"{path}: models[{i}] must be a mapping with 'model' and optional 'parameters'.")
        parameters = entry.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise BadInputError(f"{path}: models[{i}].parameters must be a mapping.")
        models.append(InputModel(_reference(entry["model"], path, f"models[{i}].model", lora_allowed=True),
                                 parameters))
    base = data.get("base_model")
    base = _reference(base, path, "base_model") if base is not None else None
    if method.needs_base and base is None:
        raise BadInputError(f"{path}: merge_method '{name}' needs 'base_model' (the model the task vectors are taken "
                            "from).")
    if len({m.model for m in models}) != len(models):
        raise BadInputError(f"{path}: a model is listed twice in 'models'.")
    shared = data.get("parameters") or {}
    if not isinstance(shared, dict):
        raise BadInputError(f"{path}: 'parameters' must be a mapping.")
    known = {p.name for p in method.parameters}
    for where, settings in [("parameters", shared)] + [(f"models[{i}].parameters", m.parameters)
                                                         for i, m in enumerate(models)]:
        for key in settings:
            if key not in known:
                raise BadInputError(f"{path}: {where} sets '{key}', which merge_method '{name}' does not take "
                                    f"(it takes {', '.join(sorted(known))}).")
    recipe = Recipe(path=path, text=path.read_text(encoding="utf-8"), method=method, models=tuple(models),
                    base_model=base, parameters=shared, dtype=_dtype(data.get("dtype"), path, "dtype"),
                    out_dtype=_dtype(data.get("out_dtype"), path, "out_dtype"))
    others = [m for m in recipe.inputs() if method.base_weighted or m != base]
    if len(others) < method.min_models or (method.max_models is not None and len(others) > method.max_models):
        wanted = (f"exactly {method.min_models}" if method.max_models == method.min_models
                  else f"at least {method.min_models}")
        raise BadInputError(f"{path}: merge_method '{name}' takes {wanted} model(s) besides the base; 'models' gives "
                            f"{len(others)}.")
    return recipe


def layer_fraction(tensor: str, num_layers: int | None) -> float:
    """mergekit's t for a tensor: layer / (layers − 1) inside the decoder layers (1 with a single layer), 0 outside.

    Args:
        tensor: the tensor name.
        num_layers: the model's layer count (config num_hidden_layers), or None.

    Returns:
        t in [0, 1].
    """
    match = LAYER_INDEX.search(tensor)
    if match is None or not num_layers:
        return 0.0
    return int(match.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0


def check_densities(recipe: Recipe, tensor: str, models: list[str], values: list[dict]) -> None:
    """A density outside (0, 1] is refused (mergekit would keep at least one element, or none, silently), and so is
    a DELLA epsilon that puts density ± epsilon outside (0, 1).

    Args:
        recipe: the recipe.
        tensor: the tensor the values were resolved for.
        models: the models the values belong to.
        values: each model's per-model values.

    Raises:
        BadInputError: a density outside (0, 1], or such an epsilon.
    """
    for model, v in zip(models, values, strict=True):
        density = v.get("density")
        if density is not None and not 0 < density <= 1:
            raise BadInputError(f"{recipe.path}: density {density} for model '{model}' (tensor {tensor}) is outside "
                                "(0, 1].")
        epsilon = v.get("epsilon")
        if epsilon is not None and density is not None and density < 1 and not (
                density - epsilon > 0 and density + epsilon < 1):
            raise BadInputError(f"{recipe.path}: epsilon {epsilon} for model '{model}' (tensor {tensor}) puts the keep "
                                f"probabilities density ± epsilon outside (0, 1) (density {density}).")
