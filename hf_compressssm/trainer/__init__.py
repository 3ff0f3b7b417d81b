"""The `Trainer` integration: `CompreSSMCallback` (a `Compressor` driven by the Trainer's events) and what it keeps
in, and checks about, Trainer checkpoints (`checkpoint`)."""

from .callback import CompreSSMCallback, report_cuts_to_integrations


__all__ = ["CompreSSMCallback", "report_cuts_to_integrations"]
