"""The `Trainer` integration: `CompreSSMCallback` (a `Compressor` driven by the Trainer's events) and what it keeps
in, and checks about, Trainer checkpoints (`checkpoint`)."""

from .callback import CompreSSMCallback


__all__ = ["CompreSSMCallback"]
