"""CompreSSM's pipeline, one module per stage (pure functions and small objects on models and tensors).

``arguments`` (every knob) → ``calibration`` (statistics of the training forwards or of a few batches, from the
family's projections) → ``scoring`` (each family's scores: ``mamba_scores``, ``mamba2_scores``) → ``ranks`` (how many
states each layer keeps, and which) → ``surgery`` (the atomic cut, optimizer included) → ``reduction`` (one attempt
end to end; `compress_model`) → ``record`` (what was done). ``compressor`` runs the schedule in any training loop
(``rollback``: pragmatic mode); ``distributed`` keeps the shrinkable tensors out of DDP; ``atomic_io`` writes files
atomically. ``hankel`` is the LTI theory, ``scan_reference`` a slow scan-measured reference score, ``hnn`` the
Hankel-nuclear-norm baseline.
"""

from .arguments import CompressionArguments
from .compressor import Compressor
from .record import CompressionRecord
from .reduction import LayerDecision, ReductionReport, compress_model


__all__ = [
    "CompressionArguments",
    "CompressionRecord",
    "Compressor",
    "LayerDecision",
    "ReductionReport",
    "compress_model",
]
