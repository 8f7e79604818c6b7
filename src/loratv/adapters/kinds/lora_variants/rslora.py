"""rsLoRA (use_rslora): the scale is α/√r instead of α/r (PEFT's LoraLayer.update_layer); nothing else changes.

The scale itself is `LoraSettings.scale` (loratv/adapters/settings.py), which every LoRA module's `scale` comes
from (kohya files too); this variant names it for inspect and adapter-keys.
"""

from loratv.adapters.kinds.lora_variants.base import LoraVariant


class RsLoraVariant(LoraVariant):
    """rsLoRA: s = α/√r (LoraSettings.scale), chosen for every module of an adapter with use_rslora."""

    name = "rslora"
    display_name = "rsLoRA"
    config_field = "use_rslora"
    scaling_rule = "alpha/sqrt(r)"

    def applies(self, adapter, module) -> bool:
        """Every module of an adapter whose config sets use_rslora.

        Args:
            adapter: the adapter.
            module: the LoraModule.

        Returns:
            Whether use_rslora is set.
        """
        return bool(adapter.settings.use_rslora)


RSLORA = RsLoraVariant()
