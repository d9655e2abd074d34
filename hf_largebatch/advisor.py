"""``hf-largebatch advise``: which batch size and which LR, from a short probe, before spending the GPU hours.

A probe (``GradientNoiseProbe``: a few hundred steps at a small batch, ``noise_probe_steps``) records every step's
unbiased ``||G||^2`` and ``tr(Sigma)`` (one example's gradient covariance). From them:

* the gradient noise scale ``B_noise = mean tr(Sigma) / mean ||G||^2`` (McCandlish et al. 2018's ``B_simple``; a
  ratio of means, so a step's negative ``||G||^2`` estimate is averaged in, not floored), a 68% interval from a
  bootstrap over the probe's steps, and its trend (the estimate over the probe's first and second halves);
* the trade-off between optimizer steps and examples at batch ``B``: ``S/S_min = 1 + B_noise/B`` and
  ``E/E_min = 1 + B/B_noise``;
* the recommended range: from the probe's batch up to the largest doubling of it for which each doubling still
  buys >= ``DOUBLING_SPEEDUP`` x fewer steps (1.5x: up to ``B = B_noise``, where the examples needed have doubled);
* the LR plan at the recommended batch: AdaScale by default (the tuned base LR and warm-up, with a gain of
  ``r = (1 + B_noise/B0) / (1 + B_noise/B)``, the same formula on the same statistics; Adam-family optimizers get
  ``sqrt(r)``, AdamScale), LEGW for a user who keeps a schedule of their own.

The noise scale grows as training goes on (the gradient shrinks faster than its noise), so a probe at the start
says what helps early; a rising trend says a larger batch will pay later (``adaptive_batch`` follows it).

Outputs: ``Advice.table()`` (text), ``Advice.plot(path)`` (steps vs examples, the recommendation marked) and
``Advice.to_dict()`` (JSON). ``advise(...)`` runs the probe on any ``LargeBatchTrainer`` setup;
``advice_from_probe(output_dir)`` reads the probe of a run made with ``noise_probe_steps`` (the CLI's route).
``Advice.steps_to_target`` predicts the steps a batch needs to a target from those the probe's batch needs.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np

from .algorithms.noise_probe import PROBE_FILE
from .core.lr_scaling import peak_lr_multiplier

#: each doubling of the batch inside the recommended range cuts the optimizer steps at least this much
DOUBLING_SPEEDUP = 1.5
#: the candidate batches shown: the probe's batch times 2^k, k = 0 .. MAX_DOUBLINGS
MAX_DOUBLINGS = 12
_ADAM_FAMILY = ("Adam", "AdamW", "LAMB", "AdamP")


def noise_scale(grad_sqr, trace) -> float:
    """``mean tr(Sigma) / mean ||G||^2`` over steps (inf when the mean ``||G||^2`` is not positive: the gradient is
    lost in its noise at this batch, every batch up to very large ones still pays)."""
    mean_sq = float(np.mean(grad_sqr))
    return float(np.mean(trace)) / mean_sq if mean_sq > 0 else math.inf


def steps_over_min(batch: float, noise: float) -> float:
    """``S / S_min = 1 + B_noise / B``: optimizer steps to a target, over the fewest any batch needs."""
    return 1.0 + noise / batch


def examples_over_min(batch: float, noise: float) -> float:
    """``E / E_min = 1 + B / B_noise``: examples to a target, over the fewest any batch needs."""
    return 1.0 + batch / noise


def steps_ratio(batch: float, reference: float, noise: float) -> float:
    """Steps to a target at ``batch`` over those at ``reference``: ``(1 + B_noise/B) / (1 + B_noise/B_ref)``;
    ``B_ref / B`` for an infinite noise scale (perfect scaling: the gradient is lost in its noise)."""
    if math.isinf(noise):
        return reference / batch
    return steps_over_min(batch, noise) / steps_over_min(reference, noise)


def predicted_steps(steps_at_base: float, base_batch: float, batch: float, noise: float) -> float:
    """Steps to a target at ``batch``, from the steps measured at ``base_batch`` (the same target)."""
    return steps_at_base * steps_ratio(batch, base_batch, noise)


def steps_along_trajectory(grad_sqr, trace, base_batch: float, batch: float, window: int = 25) -> float:
    """Steps at ``batch`` that do the work of the recorded steps at ``base_batch``, with the noise scale measured
    along the way: each ``window`` of base steps, of noise scale ``n_w``, takes ``(1 + n_w/B) / (1 + n_w/B0)`` times
    as many steps at ``B`` (the noise scale grows during training, so one early value understates what a larger
    batch saves later). A window whose mean ``||G||^2`` is not positive counts ``B0/B`` (its noise-scale limit)."""
    grad_sqr, trace = np.asarray(grad_sqr, dtype=np.float64), np.asarray(trace, dtype=np.float64)
    total = 0.0
    for start in range(0, len(grad_sqr), window):
        sq, tr = grad_sqr[start:start + window], trace[start:start + window]
        total += len(sq) * steps_ratio(batch, base_batch, noise_scale(sq, tr))
    return total


def adascale_gain(base_batch: float, batch: float, noise: float) -> float:
    """AdaScale's gain ratio at ``S = batch / base_batch`` on these statistics: ``(sigma^2 + |G|^2) / (sigma^2/S +
    |G|^2)`` with ``sigma^2 = tr(Sigma) / B0``, i.e. ``(1 + B_noise/B0) / (1 + B_noise/B)``."""
    return 1.0 / steps_ratio(batch, base_batch, noise)


def largest_efficient_batch(probe_batch: int, noise: float, speedup: float = DOUBLING_SPEEDUP) -> int:
    """The largest ``probe_batch x 2^k`` reached by doublings that each cut the steps by >= ``speedup``."""
    batch = probe_batch
    for _ in range(MAX_DOUBLINGS):
        if 1.0 / steps_ratio(2 * batch, batch, noise) < speedup:
            break
        batch *= 2
    return batch


@dataclass(frozen=True)
class NoiseScaleEstimate:
    """``value`` with its 68% bootstrap interval ``[low, high]``, and the estimates over the probe's first and
    second halves (``early``, ``late``), from ``steps`` steps."""

    value: float
    low: float
    high: float
    early: float
    late: float
    steps: int

    @property
    def trend(self) -> float:
        """``late / early``: > 1 when the noise scale grew during the probe."""
        return self.late / self.early if self.early > 0 else math.nan


def estimate_noise_scale(grad_sqr, trace, resamples: int = 2000, seed: int = 0) -> NoiseScaleEstimate:
    """The noise scale of the probe's steps, a bootstrap over steps (resampled with replacement) for its spread,
    and the two halves for its trend. Needs at least 4 steps."""
    grad_sqr, trace = np.asarray(grad_sqr, dtype=np.float64), np.asarray(trace, dtype=np.float64)
    n = len(grad_sqr)
    if n < 4 or len(trace) != n:
        raise ValueError(f"the probe recorded {n} steps with an estimate; the advisor needs at least 4 (raise "
                         "noise_probe_steps, and give each step >= 2 micro-batches)")
    picks = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    sq, tr = grad_sqr[picks].mean(axis=1), trace[picks].mean(axis=1)
    boot = np.where(sq > 0, tr / np.where(sq > 0, sq, 1.0), np.inf)
    with np.errstate(invalid="ignore"):  # resamples lost in their noise are inf: inf - inf between two of them
        low, high = np.percentile(boot, [16, 84])
    half = n // 2
    return NoiseScaleEstimate(noise_scale(grad_sqr, trace), float(low), float(high),
                              noise_scale(grad_sqr[:half], trace[:half]), noise_scale(grad_sqr[half:], trace[half:]), n)


@dataclass(frozen=True)
class LRPlan:
    """How to set the LR at ``batch``: the options (``lr_scaling``, ``learning_rate`` at ``base_batch_size``,
    warm-up) and what they will apply (``peak_lr``; AdaScale's is its predicted mean gain times the LR)."""

    rule: str
    learning_rate: float
    peak_lr: float
    warmup_epochs: float
    note: str


def lr_plans(batch: int, base_batch: int, learning_rate: float, base_warmup_epochs: float, adam_family: bool,
             noise: float) -> list[LRPlan]:
    """AdaScale first (no schedule to re-tune: the base run's, on progress), then LEGW (a schedule of your own)."""
    scale = batch / base_batch
    gain = adascale_gain(base_batch, batch, noise)
    applied = math.sqrt(gain) if adam_family else gain
    return [
        LRPlan("adascale", learning_rate, learning_rate * applied, base_warmup_epochs,
               f"mean gain ~{gain:.2f} predicted: ~{gain:.2f}x fewer steps than the base run; the base schedule "
               "runs on progress" + (" (AdamScale: the LR follows sqrt(gain))" if adam_family else "")),
        LRPlan("legw", learning_rate, learning_rate * peak_lr_multiplier("legw", scale), scale * base_warmup_epochs,
               f"sqrt(S) peak, warm-up S x w0 epochs (S = {scale:g}), on the base run's epoch budget"),
    ]


@dataclass
class Advice:
    """What the advisor says (see the module docstring); ``to_dict`` is its JSON."""

    probe_batch: int
    base_batch: int
    learning_rate: float
    optimizer: str
    base_warmup_epochs: float
    noise: NoiseScaleEstimate
    recommended: int
    plans: list[LRPlan]
    candidates: list[dict] = field(default_factory=list)
    record: dict | None = field(default=None, repr=False)  # the probe's steps, for steps_to_target

    @classmethod
    def from_record(cls, record: dict, resamples: int = 2000, seed: int = 0) -> Advice:
        """From a probe's record (``GradientNoiseProbe.record()``, the content of ``noise_probe.json``)."""
        run = record["run"]
        noise = estimate_noise_scale(record["grad_sqr"], record["trace"], resamples, seed)
        probe_batch = int(run["global_batch"])
        base_batch = int(run.get("base_batch_size") or probe_batch)
        optimizer = run.get("optimizer") or str(run.get("optim"))
        recommended = largest_efficient_batch(probe_batch, noise.value)
        warmup = base_warmup_epochs(run)
        plans = lr_plans(recommended, base_batch, float(run["learning_rate"]), warmup,
                         optimizer in _ADAM_FAMILY, noise.value)
        candidates = []
        for k in range(MAX_DOUBLINGS + 1):
            batch = probe_batch * 2 ** k
            candidates.append({
                "batch": batch,
                "steps_vs_probe": steps_ratio(batch, probe_batch, noise.value),
                "examples_vs_probe": examples_over_min(batch, noise.value) / examples_over_min(probe_batch,
                                                                                               noise.value),
                "steps_over_min": steps_over_min(batch, noise.value),
                "examples_over_min": examples_over_min(batch, noise.value),
                "recommended": probe_batch <= batch <= recommended})
            if batch > 4 * max(recommended, noise.value if math.isfinite(noise.value) else 0):
                break
        return cls(probe_batch, base_batch, float(run["learning_rate"]), optimizer, warmup, noise, recommended,
                   plans, candidates, record)

    def steps_to_target(self, batch: int, steps_at_probe_batch: float) -> float:
        """Optimizer steps to a target at ``batch``, given the steps the probe's batch takes to it. When the probe
        covered those steps (a probe left on over a base run: ``noise_probe_steps`` = its length), the noise scale
        measured along them (``steps_along_trajectory``); otherwise the probe's one value, which understates what a
        larger batch saves when the noise scale rises (``noise.trend`` > 1; the common case: it grows as the loss
        falls)."""
        steps = self.record["steps"] if self.record else []
        if steps and steps[-1] >= steps_at_probe_batch:
            covered = sum(step <= steps_at_probe_batch for step in steps)
            along = steps_along_trajectory(self.record["grad_sqr"][:covered], self.record["trace"][:covered],
                                           self.probe_batch, batch)
            return along * steps_at_probe_batch / covered  # steps without an estimate count like the others
        return predicted_steps(steps_at_probe_batch, self.probe_batch, batch, self.noise.value)

    def to_dict(self) -> dict:
        return {"probe_batch": self.probe_batch, "base_batch": self.base_batch, "learning_rate": self.learning_rate,
                "optimizer": self.optimizer, "base_warmup_epochs": self.base_warmup_epochs,
                "noise_scale": {**dataclasses.asdict(self.noise), "trend": self.noise.trend},
                "recommended_batch_range": [self.probe_batch, self.recommended],
                "lr_plans": [dataclasses.asdict(plan) for plan in self.plans], "candidates": self.candidates}

    def table(self, steps_to_target: float | None = None) -> str:
        """The printed advice; with ``steps_to_target`` (the steps the probe's batch takes to a target), a column
        of the steps each batch is predicted to take (``steps_to_target``)."""
        n = self.noise
        lines = [
            f"gradient noise scale B_noise = {n.value:.4g} examples (68% interval {n.low:.4g} .. {n.high:.4g}, "
            f"{n.steps} probe steps at batch {self.probe_batch})",
            f"trend over the probe: {n.early:.4g} (first half) -> {n.late:.4g} (second half)"
            + (": rising, a larger batch pays later in training" if n.trend > 1.25 else ""),
            "",
            "| batch | steps vs probe batch | examples vs probe batch | S/S_min | E/E_min | "
            + ("predicted steps to target | " if steps_to_target else "") + "|",
            "|---:|---:|---:|---:|---:|" + ("---:|" if steps_to_target else "") + "---|",
        ]
        for c in self.candidates:
            mark = "recommended range" if c["recommended"] else ""
            if c["batch"] == self.recommended:
                mark = "<- recommended"
            predicted = f"{self.steps_to_target(c['batch'], steps_to_target):.0f} | " if steps_to_target else ""
            lines.append(f"| {c['batch']} | {c['steps_vs_probe']:.3f} | {c['examples_vs_probe']:.3f} | "
                         f"{c['steps_over_min']:.3f} | {c['examples_over_min']:.3f} | {predicted}{mark} |")
        if steps_to_target:
            covered = bool(self.record and self.record["steps"] and self.record["steps"][-1] >= steps_to_target)
            lines.append(f"(predicted from {steps_to_target:g} steps at batch {self.probe_batch}: "
                         + ("along the noise scale the probe measured over them)" if covered else
                            "the probe ended before them, so from its one noise scale: a lower bound of the saving "
                            "when the noise scale rises)"))
        lines += ["", f"recommended batch: {self.probe_batch} .. {self.recommended} (each doubling buys >= "
                      f"{DOUBLING_SPEEDUP:g}x fewer steps); LR tuned at base batch {self.base_batch}: "
                      f"{self.learning_rate:g} ({self.optimizer})", "",
                  "| plan at the recommended batch | learning_rate | peak LR applied | warm-up (epochs) | |",
                  "|---|---:|---:|---:|---|"]
        lines += [f"| lr_scaling={p.rule} | {p.learning_rate:g} | {p.peak_lr:.4g} | {p.warmup_epochs:g} | {p.note} |"
                  for p in self.plans]
        return "\n".join(lines)

    def plot(self, path: str) -> str:
        """Steps vs examples (both over their minimum) as the batch grows, the 68% band, the candidates, the
        recommendation starred; without a finite positive noise scale (no trade-off curve), steps vs batch.
        Returns ``path``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        if math.isfinite(self.noise.value) and self.noise.value > 0:
            self._plot_trade_off(ax)
        else:  # an infinite noise scale scales perfectly, a zero one not at all
            ax.plot([c["batch"] for c in self.candidates], [c["steps_vs_probe"] for c in self.candidates], "o-",
                    color="C1")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("global batch")
            ax.set_ylabel("optimizer steps / those at the probe's batch")
            ax.set_title(f"noise scale {self.noise.value:g}: recommended {self.recommended}")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def _plot_trade_off(self, ax) -> None:
        batches = np.geomspace(self.probe_batch / 4, self.candidates[-1]["batch"] * 4, 200)
        for value, style in ((self.noise.low, ":"), (self.noise.high, ":"), (self.noise.value, "-")):
            if math.isfinite(value) and value > 0:
                ax.plot(examples_over_min(batches, value), steps_over_min(batches, value), style, color="C0",
                        label="B_noise = %.3g" % value if style == "-" else None)
        for c in self.candidates:
            ax.plot(c["examples_over_min"], c["steps_over_min"], "o", color="C1" if c["recommended"] else "0.6")
            ax.annotate(str(c["batch"]), (c["examples_over_min"], c["steps_over_min"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
        best = next(c for c in self.candidates if c["batch"] == self.recommended)
        ax.plot(best["examples_over_min"], best["steps_over_min"], "*", markersize=16, color="C3",
                label=f"recommended: {self.recommended}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("examples to a target / E_min")
        ax.set_ylabel("optimizer steps to a target / S_min")
        ax.set_title("batch size trade-off (dotted: 68% interval)")
        ax.grid(alpha=0.3, which="both")
        ax.legend()

    def write(self, output_dir: str) -> dict[str, str]:
        """``advice.json``, ``advice.md`` and ``advice.png`` in ``output_dir``; their paths."""
        os.makedirs(output_dir, exist_ok=True)
        paths = {kind: os.path.join(output_dir, f"advice.{kind}") for kind in ("json", "md", "png")}
        with open(paths["json"], "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        with open(paths["md"], "w") as f:
            f.write(self.table() + "\n")
        self.plot(paths["png"])
        return paths


def base_warmup_epochs(run: dict) -> float:
    """The probed run's warm-up in epochs: ``legw_base_warmup_epochs`` if set, else ``warmup_steps`` (a count, or
    below 1 a fraction of the configured run's steps) over its steps per epoch; 0 without a dataset length."""
    if run.get("legw_base_warmup_epochs"):
        return float(run["legw_base_warmup_epochs"])
    warmup = float(run.get("warmup_steps") or 0.0)
    examples = run.get("train_examples")
    if not warmup or not examples:
        return 0.0
    if warmup < 1:
        warmup *= run.get("run_steps") or 0
    return warmup / max(examples // run["global_batch"], 1)


def advice_from_probe(output_dir: str, **kwargs) -> Advice:
    """The advice from the ``noise_probe.json`` a run with ``noise_probe_steps`` wrote into ``output_dir``."""
    path = os.path.join(output_dir, PROBE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: run the training with noise_probe_steps > 0 (the probe "
                                "writes it at the end) or use hf_largebatch.advisor.advise")
    with open(path) as f:
        return Advice.from_record(json.load(f), **kwargs)


def advise(model, args, train_dataset, probe_steps: int = 200, output_dir: str | None = None, **trainer_kwargs
           ) -> Advice:
    """Probe ``probe_steps`` optimizer steps of this setup (a copy of ``model``; ``args`` as given, its LR schedule
    included, with nothing saved, evaluated or reported) and return the advice, also written to
    ``output_dir`` (default ``<args.output_dir>/advice``). ``trainer_kwargs`` go to ``LargeBatchTrainer``
    (``data_collator``, ``callbacks``, ...)."""
    from .core.trainer import LargeBatchTrainer

    output_dir = output_dir or os.path.join(args.output_dir, "advice")
    probe_args = dataclasses.replace(args, output_dir=os.path.join(output_dir, "probe"), noise_probe_steps=probe_steps,
                                     save_strategy="no", eval_strategy="no", report_to=[], push_to_hub=False)
    trainer = LargeBatchTrainer(model=copy.deepcopy(model), args=probe_args, train_dataset=train_dataset,
                                **trainer_kwargs)
    trainer.train()
    advice = Advice.from_record(trainer.algorithm("noise_probe").record())
    advice.write(output_dir)
    return advice
