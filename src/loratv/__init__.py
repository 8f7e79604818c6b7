"""loratv: merge LoRA adapters, extract task vectors, and prove what the weights contain."""

__version__ = "0.1.0"
