"""Drop-in optimizers (torch only): GaLore family, Natural GaLore, layer-wise updates, MeZO."""

from memft.optimizers.galore import (GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, GaLoreOptimizer,
                                     galore_param_groups)
from memft.optimizers.layerwise import LayerwiseOptimizer
from memft.optimizers.mezo import MeZO
from memft.optimizers.natural_galore import NaturalGaLoreAdamW
from memft.optimizers.projector import LowRankProjector

__all__ = ["GaLoreAdafactor", "GaLoreAdamW", "GaLoreAdamW8bit", "GaLoreOptimizer", "LayerwiseOptimizer",
           "LowRankProjector", "MeZO", "NaturalGaLoreAdamW", "galore_param_groups"]
