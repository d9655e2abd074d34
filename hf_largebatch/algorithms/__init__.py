"""The large-batch methods, one module each, every one an ``Algorithm`` (``core/events.py``) that plugs into the
trainer through events only.

``from_arguments`` is the one place where options (``LargeBatchArguments``) become algorithms; an algorithm of
the same kind passed in ``callbacks=[...]`` takes the option's place.
"""

from __future__ import annotations

from ..core.events import Algorithm
from .adaptive_batch import AdaptiveBatch, AdaptiveBatchConfig
from .adascale import AdaScale
from .autowu import AutoWU, AutoWUConfig
from .conadv import ConAdv, ConAdvConfig
from .extrapolation import Extrapolation
from .local_sgd import LocalSGD
from .noise_probe import GradientNoiseProbe
from .noise_scale import NoiseScaleMonitor

__all__ = ["AdaScale", "AdaptiveBatch", "AdaptiveBatchConfig", "AutoWU", "AutoWUConfig", "ConAdv", "ConAdvConfig",
           "Extrapolation", "GradientNoiseProbe", "LocalSGD", "NoiseScaleMonitor", "from_arguments"]


def _conadv(args) -> ConAdv:
    # pixel_epsilon's normalisation and relative_epsilon's RMS are read at train start (ConAdvConfig.resolved)
    return ConAdv(args.conadv_config(), args.adversarial)


#: (the algorithm's class, whether the options ask for it, how to build it from them), in the order they are added
_FROM_OPTIONS = (
    (AdaScale, lambda args: args.lr_scaling == "adascale", lambda args: AdaScale()),
    (AutoWU, lambda args: args.lr_schedule == "autowu", lambda args: AutoWU(args.autowu_config())),
    (ConAdv, lambda args: args.adversarial != "none", _conadv),
    (Extrapolation, lambda args: args.extrapolation != "none",
     lambda args: Extrapolation(args.extrapolation, args.extrapolation_ratio)),
    (AdaptiveBatch, lambda args: args.adaptive_batch != "none",
     lambda args: AdaptiveBatch(args.adaptive_batch, args.adaptive_batch_config(), args.lr_scaling,
                                args.base_batch_size, args.local_sgd_steps)),
    (LocalSGD, lambda args: bool(args.local_sgd_steps), lambda args: LocalSGD(args.local_sgd_steps)),
    (GradientNoiseProbe, lambda args: args.noise_probe_steps > 0,
     lambda args: GradientNoiseProbe(args.noise_probe_steps)),
)


def from_arguments(args, present: list[Algorithm] = ()) -> list[Algorithm]:
    """The algorithms ``args`` asks for, less those whose kind is already ``present`` (passed as callbacks)."""
    return [build(args) for kind, wanted, build in _FROM_OPTIONS
            if wanted(args) and not any(isinstance(alg, kind) for alg in present)]
