"""The harvest stage: the snapshots' activations at one hook, stored (one process or torchrun ranks) or
streamed; `activations(ctx)` is how the crosscoder stage reads them whichever mode made them."""

from evolution.harvest.read import Activations, activations
from evolution.harvest.stage import HarvestConfig, harvest_stage

__all__ = ["Activations", "HarvestConfig", "activations", "harvest_stage"]
