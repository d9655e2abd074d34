"""The gradient-noise-scale monitor: telemetry for any run, no change to training (ALGORITHMS.md section 0)."""

from __future__ import annotations

from ..core.statistics import SmoothedNoiseScale


class NoiseScaleMonitor(SmoothedNoiseScale):
    """Add it to any run (``callbacks=[NoiseScaleMonitor()]``) to log ``grad_sqr``, ``grad_var`` and
    ``noise_scale`` (B_simple, an estimate of the critical batch size in examples) every logging step, from the
    trainer's gradient statistics. Needs ``world_size x gradient_accumulation_steps >= 2``. With AdamScale in the
    run the statistics are those of its preconditioned gradients (the ones AdamScale logs under the same names)."""

    name = "noise_scale_monitor"
    option = "callbacks=[NoiseScaleMonitor()]"
