"""What a loaded LoRA adapter is: its modules (one low-rank update each), its files and names; no loading logic."""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loratv.adapters.settings import LoraSettings
from loratv.common import dtypes
from loratv.errors import LoratvError
from loratv.io.checkpoint import Checkpoint

PREFIX = "base_model.model."
TOKEN_ROWS = "<trainable token rows>"  # plan.replacements marker: the replacement is built by token_replacement
CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
# transformers' Conv1D layers store W as (in, out); PEFT forces fan_in_fan_out for them
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "decision_transformer", "imagegpt"}
CONV1D_MODULES = ("c_attn", "c_proj", "c_fc", "q_attn")
INPUT_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")
OUTPUT_EMBEDDING_NAMES = ("lm_head.weight", "embed_out.weight")
NOT_LORA_MARKERS = {
    "lora_E": "AdaLoRA (lora_E)",
    "hada_w1": "LoHa (hada_*)",
    "lokr_w1": "LoKr (lokr_*)",
    "lora_down": "kohya LoRA (lora_down/lora_up)",
}


@dataclass
class LoraModule:
    """One low-rank update: ΔW = scale · B @ A, in the orientation of the base tensor `target`."""

    module: str
    target: str
    kind: str  # "linear", "conv1d" (stored transposed) or "embedding"
    a_key: str
    b_key: str
    r: int
    alpha: float
    scale: float
    bias_key: str | None = None  # lora_B.bias, added (times scale) to the module's bias
    magnitude_key: str | None = None  # DoRA: W' = m ⊙ (W + ΔW) / ‖W + ΔW‖, norms along the input axis
    # layouts.Piece: the base stores this module's (fused, in-memory) parameter in pieces; ΔW is this piece's slice
    piece: object = None
    # the LoRA variants (kinds/lora_variants: DoRA, rsLoRA, ConvNd, …) chosen when the module was built
    variants: tuple = ()

    def has_variant(self, name: str) -> bool:
        """Whether one of the module's variants is called `name`.

        Args:
            name: a variant name ("dora", "rslora", "conv", "target_parameters", "lora_bias").

        Returns:
            True when the module uses it.
        """
        return any(v.name == name for v in self.variants)

    @property
    def additive(self) -> bool:
        """Whether the merge adds ΔW (False when a variant rescales W + ΔW, as DoRA does)."""
        return all(v.additive for v in self.variants)

    @property
    def merge_variant(self):
        """The variant whose `merge` computes the merged tensor whole (DoRA), or None for W + ΔW by rows."""
        return next((v for v in self.variants if not v.additive), None)


@dataclass
class Adapter:
    path: Path
    config_path: Path
    settings: LoraSettings
    tensors: Checkpoint
    modules: dict = field(default_factory=dict)  # module name -> LoraModule
    replacements: dict = field(default_factory=dict)  # base tensor name -> adapter key
    # replacements saved as `<targeted module>.base_layer.<param>`: PEFT loads them into the base parameter itself,
    # which a tied head shares, so they never untie (unlike a `modules_to_save` copy)
    saved_layers: set = field(default_factory=set)
    token_rows: dict = field(default_factory=dict)  # base tensor name -> (adapter key, row indices): rows replaced
    # files whose module names only the base can resolve (kohya's flattened names): called by bind(adapter, base)
    resolve_names: Callable[..., None] | None = None
    # target_parameters: `<owner>(.base_layer)*` -> (A key, B key), each the LoRA of one raw parameter of the owner
    param_groups: dict = field(default_factory=dict)
    # delta_rows: the whole s·B@A of the module being merged, kept across its row chunks (see delta_rows)
    products: dict = field(default_factory=dict, repr=False)
    # merge with PEFT's own program where loratv evaluates the same product faster (HRA): PEFT's bits, PEFT's time
    peft_arithmetic: bool = False

    @property
    def source(self) -> str:
        """The adapter's path (its folder, or the single file) as a string."""
        return str(self.path)

    def bias_additions(self) -> dict:
        """Base bias name -> LoraModule whose scaled lora_B.bias is added to it.

        Returns:
            {`<module>.bias`: module} for every module with a bias_key.
        """
        return {m.module + ".bias": m for m in self.modules.values() if m.bias_key}

    def stored_parameters(self) -> int:
        """How many numbers the adapter's weights file stores.

        Returns:
            The sum of numel over every tensor entry of the file.
        """
        return sum(e.numel for e in self.tensors.entries.values())

    def factor(self, key: str) -> torch.Tensor:
        """Adapter tensor `key`, read in its stored dtype and checked to be finite.

        Args:
            key: an adapter key.

        Returns:
            The tensor.

        Raises:
            LoratvError: naming the file and the key, when the tensor holds a NaN or an Inf; or Checkpoint.read's
                errors (no such key, a file truncated since it was indexed).
        """
        tensor = self.tensors.read(key)
        if not dtypes.all_finite(tensor):
            raise LoratvError(f"{self.tensors.entry(key).file}: tensor '{key}' contains NaN or Inf.")
        return tensor
