"""The third-party warnings every run printed that say nothing about the run, silenced in this
one place (by exact message, so any other warning still shows). ``lyra-pl fit|validate|
predict|pipeline`` call :func:`silence` before the Trainer starts."""
from __future__ import annotations

import warnings

# (message regex, why it is benign here)
KNOWN = (
    (r"LightningCLI's args parameter is intended to run from within Python",
     "lyra-pl hands LightningCLI its own argv (with --config paths resolved)"),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated",
     "inside Lightning's own pytree helper"),
    (r"Your `IterableDataset` has `__len__` defined",
     "ShardStream's length is exact for every worker (computed from the manifest)"),
    (r"DTensor random operators may not have complete support on cpu device mesh",
     "the stages initialize weights before sharding; no random op runs on DTensors"),
    (r"You have overridden `transfer_batch_to_device` in `LightningModule` but have passed in a "
     r"`LightningDataModule`", "the stage's own transfer is the one meant"),
    (r"It is recommended to use `self.log\('val/",
     "val/ metrics are already reduced over the ranks (training/epoch_means.py)"),
    (r"The number of training batches \(\d+\) is smaller than the logging interval",
     "EdgeStepLogs (training/callbacks.py) logs the first and the last step whatever it is"),
    (r"`training_step` returned `None`\. If this was on purpose",
     "on purpose: a batch that uses nothing trainable has no backward (training/stages.py)"),
    (r"Detected an existing checkpoint in .*, overwriting since self.overwrite=True",
     "last.ckpt is rewritten on purpose"),
)


def silence() -> None:
    for message, _ in KNOWN:
        warnings.filterwarnings("ignore", message=message)
