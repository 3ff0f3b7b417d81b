"""CompreSSM's pipeline, one module per stage.

``arguments`` (every knob, and the checks shared by all entry points) → ``calibration`` (statistics from a few
batches, through the model's `SSMFamily`) → ``scores`` (importance per state) → ``ranks`` (how many states each
layer keeps, and which) → ``surgery`` (the atomic cut, optimizer included, and the restore used by rollback) →
``reduction`` (one attempt end to end; `compress_model`) → ``history`` (what was done). ``distributed`` keeps the
shrinkable tensors out of DDP; ``callback`` runs the schedule inside a `Trainer`. ``hankel`` is the LTI theory;
``scan_energy`` a slow scan-measured reference score; ``hnn`` the Hankel-nuclear-norm baseline.
"""

from .arguments import CompressionArguments
from .callback import CompreSSMCallback
from .reduction import LayerDecision, ReductionReport, compress_model


__all__ = ["CompreSSMCallback", "CompressionArguments", "LayerDecision", "ReductionReport", "compress_model"]
