"""unipair command line: LightningCLI over the unipair system and DataModules."""

from __future__ import annotations

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import ArgsType, LightningCLI


def cli_main(args: ArgsType = None) -> None:
    """Entry point of the `unipair` console script (and `python cli.py`)."""
    LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
    )


if __name__ == "__main__":
    cli_main()
