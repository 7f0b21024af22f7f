"""unipair's LightningModule (:class:`UnipairSystem`) and its plain nn.Module parts."""

from lightning_modules.losses import vicreg_loss
from lightning_modules.system import UnipairSystem

__all__ = ["UnipairSystem", "vicreg_loss"]
