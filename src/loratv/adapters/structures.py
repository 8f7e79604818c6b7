"""What a loaded LoRA adapter is: its modules (one low-rank update each), its files and names; no loading logic."""

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from loratv.adapters.config import LoraSettings
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
    resolve_names: object = None
    # target_parameters: `<owner>(.base_layer)*` -> (A key, B key), each the LoRA of one raw parameter of the owner
    param_groups: dict = field(default_factory=dict)
    # delta_rows: the whole s·B@A of the module being merged, kept across its row chunks (see delta_rows)
    products: dict = field(default_factory=dict, repr=False)

    @property
    def source(self) -> str:
        return str(self.path)

    def bias_additions(self) -> dict:
        """Base bias name -> LoraModule whose scaled lora_B.bias is added to it."""
        return {m.module + ".bias": m for m in self.modules.values() if m.bias_key}

    def stored_parameters(self) -> int:
        return sum(e.numel for e in self.tensors.entries.values())

    def factor(self, key: str) -> torch.Tensor:
        tensor = self.tensors.read(key)
        if not dtypes.all_finite(tensor):
            raise LoratvError(f"{self.tensors.entry(key).file}: tensor '{key}' contains NaN or Inf.")
        return tensor


def expert_delta(a, b, r: int, scale: float, kind: str, start: int, stop: int) -> torch.Tensor:
    """ΔW of experts [start, stop) of a 3-D stack: A (r·E, in) reshaped expert-major (E, r, in), B (out, r·E)
    expert-minor (out, r, E); (E, out, in), or (E, in, out) for a transposed stack (reference §3.3)."""
    experts = a.shape[0] // r
    wa = a.reshape(experts, -1, a.shape[-1])[start:stop]
    wb = b.reshape(b.shape[0], -1, experts)[:, :, start:stop]
    pattern = "o r e, e r i -> e o i" if kind == "experts" else "o r e, e r i -> e i o"
    return torch.einsum(pattern, wb, wa) * scale


def conv_delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """PEFT's _ConvNd.get_delta_weight, whole: a matmul for 1×…×1 kernels, else the conv of Aᵀ with B (the same sums
    Σ_r B[o,r]·A[r,i,…], in the order torch's conv adds them)."""

    if all(k == 1 for k in a.shape[2:]):
        product = b.flatten(1) @ a.flatten(1)
        return product.view(b.shape[0], *a.shape[1:]) * scale
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[a.dim()]
    return conv(a.transpose(0, 1), b).transpose(0, 1) * scale
