"""ConAdv: concurrent adversarial training with stale weights (Liu et al., ICLR 2022), and its sequential baseline.

Each training micro-batch ``x`` gets an adversarial copy made by one signed-gradient step from a random start::

    delta0 = Uniform(-eps, eps) for a fraction ``random_start`` of the examples, else 0
    g      = grad_x CE(f(x + delta0; w_attack), y)      # y: the true label (ascent) or a random wrong one (descent)
    x_adv  = clip(x + delta0 + alpha sign(g), x - eps, x + eps)

and the step's loss is the mean over ``[clean, adversarial]`` (one forward of the concatenated batch, normalised
like the clean loss). ``w_attack`` is what distinguishes the two modes:

* ``conadv``: the weights of the previous step, ``w_{t-1}``. The attack then does not depend on step t-1's
  all-reduce and update, which is what lets it run concurrently with them on an accelerator.
* ``sequential``: the current weights ``w_t`` (classic adversarial training; the attack waits for the update).

The attack runs on a private copy of the model (one extra model in memory): its parameters never require
gradients, it is not wrapped by DDP or DeepSpeed (so it triggers no collective and ranks stay in lockstep), its
BatchNorm running statistics are its own (the trained model's are untouched by the attack), its dropout is off
(the attack draws no numbers from the global RNG), and its random starts come from a generator seeded by
(seed, step, micro-batch, rank), so a resumed run draws the same ones.

Concurrency (``conadv`` mode, ``concurrent=True``, the default, on CPU): a step's attacks need only ``w_{t-1}`` and
the step's inputs, both known when the step's micro-batches are drawn, so they run on a worker thread, in
micro-batch order, while the trainer trains the earlier micro-batches (torch ops release the GIL; each thread
uses torch's intra-op threads, so give each half the cores). The attack of micro-batch k+1 overlaps the training
of micro-batch k: with n micro-batches a step, (n-1)/n of the attack time is hidden. The numbers are today's
exactly: the same copy, seeds, order and autocast. On CUDA the worker also launches the attacks on a side stream
(``AttackStream``), so the GPU runs their kernels beside the training stream's; events order the two streams.
``sequential`` mode cannot overlap (it attacks the current weights).

Inputs: a floating-point input (``pixel_values``, ...) is perturbed directly; ``input_ids`` are perturbed in
embedding space, by adding the perturbation to the output of ``model.get_input_embeddings()`` for that call. (The
hook, rather than passing ``inputs_embeds``, keeps the model's own embedding path: Marian, for one, multiplies the
embeddings by sqrt(d) only when it embeds ``input_ids`` itself.)
"""

from __future__ import annotations

import contextlib
import copy
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..core import backends
from ..core import loss as loss_rules
from ..core.events import Algorithm, MicroBatch
from ..core.option_strings import parse_key_values, require_positive_finite

ADVERSARIAL_MODES = ("none", "conadv", "sequential")
_FLOAT_INPUTS = ("pixel_values", "input_values", "input_features")


@dataclass
class ConAdvConfig:
    """The attack. Give the radius as one of:

    * ``epsilon``: in the model's input units (normalised pixels, embedding units);
    * ``pixel_epsilon``: in [0, 1] pixel units, converted per channel with ``image_std`` (and x_adv kept a valid
      image with ``image_mean``). Without them, they are read at train start from the trainer's image processor
      (``processing_class.image_mean`` / ``image_std``, as HF's image scripts pass it); the image recipe gives them;
    * ``relative_epsilon``: for text, a fraction of the RMS of the input-embedding table's entries (read at train
      start), so one number means the same on any model: a signed step moves each embedding coordinate by
      ``relative_epsilon x RMS``. There is no default: no paper behind this library gives an embedding-space radius,
      and a silent default would train on an attack nobody chose."""

    epsilon: float | None = None
    pixel_epsilon: float | None = None
    relative_epsilon: float | None = None
    #: step size, in the units of the radius given; default: the radius (alpha = eps)
    alpha: float | None = None
    #: fraction of examples whose attack starts from a uniform random point of the eps-ball (the rest from x)
    random_start: float = 0.8
    #: descend towards a random wrong label instead of ascending the true label's loss
    targeted: bool = False
    #: the input to perturb: "auto" (pixel_values / input_values / input_features, else input_ids) or a key
    input_name: str = "auto"
    #: conadv mode on CPU: run each step's attacks on a worker thread while the earlier micro-batches train
    concurrent: bool = True
    image_mean: tuple[float, ...] | None = None
    image_std: tuple[float, ...] | None = None
    #: the RMS of the input-embedding entries that ``relative_epsilon`` multiplies (``resolved`` sets it)
    embedding_rms: float | None = None

    _STRING_KEYS = ("epsilon", "pixel_epsilon", "relative_epsilon", "alpha", "random_start", "targeted",
                    "input_name", "concurrent")
    _RADII = ("epsilon", "pixel_epsilon", "relative_epsilon")

    def __post_init__(self):
        if sum(getattr(self, name) is not None for name in self._RADII) != 1:
            raise ValueError("ConAdv needs exactly one of epsilon (in the model's input units, e.g. "
                             "adversarial_args='epsilon=0.1'), pixel_epsilon (in [0, 1] pixel units, e.g. "
                             "'pixel_epsilon=0.0314' for 8/255) or relative_epsilon (text: a fraction of the input "
                             "embeddings' RMS, e.g. 'relative_epsilon=0.1')")
        for name in (*self._RADII, "alpha"):
            if getattr(self, name) is not None:
                require_positive_finite(getattr(self, name), f"adversarial_args: {name}")
        if not 0.0 <= self.random_start <= 1.0:
            raise ValueError(f"ConAdv: random_start is a probability, got {self.random_start}")

    @classmethod
    def from_string(cls, text: str | None, **extra) -> ConAdvConfig:
        types = {f.name: (str if f.name == "input_name" else bool if f.name in ("targeted", "concurrent") else float)
                 for f in fields(cls) if f.name in cls._STRING_KEYS}
        return cls(**parse_key_values(text, types, "adversarial_args"), **extra)

    def resolved(self, model=None, processing_class=None) -> ConAdvConfig:
        """This config with what train start knows: the image normalisation of ``processing_class`` for
        ``pixel_epsilon`` (when not given), the embeddings' RMS for ``relative_epsilon``. Raises, before any step,
        when either is needed and not found."""
        updates = {}
        if self.pixel_epsilon is not None and self.image_std is None:
            mean, std = getattr(processing_class, "image_mean", None), getattr(processing_class, "image_std", None)
            if std is not None and getattr(processing_class, "do_normalize", True) is False:
                mean, std = 0.0, 1.0  # the processor does not normalise: model inputs are [0, 1] pixels
            if std is None:
                raise ValueError("pixel_epsilon needs the per-channel image_std the images were normalised with: pass "
                                 "the image processor as LargeBatchTrainer(processing_class=...), give "
                                 "ConAdvConfig(image_mean=..., image_std=...), or give epsilon in the model's input "
                                 "units instead")
            updates.update(image_mean=_as_tuple(mean), image_std=_as_tuple(std))
        if self.relative_epsilon is not None and self.embedding_rms is None:
            layer = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
            if layer is None or getattr(layer, "weight", None) is None:
                raise ValueError(f"relative_epsilon is a fraction of the input embeddings' RMS, but "
                                 f"{type(model).__name__} has no get_input_embeddings() table; give epsilon instead")
            updates["embedding_rms"] = float(layer.weight.detach().float().square().mean().sqrt())
        return replace(self, **updates) if updates else self

    def radius_and_step(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, alpha) in the units of ``x``, shaped to broadcast over it (per channel for pixel_epsilon)."""
        alpha = self.alpha
        if self.epsilon is not None or self.relative_epsilon is not None:
            if self.epsilon is not None:
                eps, unit = self.epsilon, 1.0
            else:
                if self.embedding_rms is None:
                    raise ValueError("relative_epsilon needs the embeddings' RMS: ConAdvConfig.resolved(model) (the "
                                     "trainer calls it at train start)")
                eps, unit = self.relative_epsilon * self.embedding_rms, self.embedding_rms
            step = eps if alpha is None else alpha * unit
            return (torch.tensor(eps, dtype=x.dtype, device=x.device),
                    torch.tensor(step, dtype=x.dtype, device=x.device))
        if self.image_std is None:
            raise ValueError("pixel_epsilon needs image_std (the per-channel std the images were normalised with) "
                             "to convert it to the model's input units; or give epsilon in those units instead")
        std = self._per_channel(self.image_std, x)
        eps = self.pixel_epsilon / std
        return eps, eps if alpha is None else alpha / std

    def valid_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Normalised values of pixels 0 and 1 (per channel), when the normalisation is known."""
        if self.image_mean is None or self.image_std is None:
            return None
        mean, std = self._per_channel(self.image_mean, x), self._per_channel(self.image_std, x)
        return (0 - mean) / std, (1 - mean) / std

    @staticmethod
    def _per_channel(values, x: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(values, dtype=x.dtype, device=x.device).reshape(-1)
        if x.dim() < 3 or t.numel() not in (1, x.shape[1]):
            raise ValueError(f"image normalisation with {t.numel()} channel(s) does not fit inputs of shape "
                             f"{tuple(x.shape)} (batch, channels, ...)")
        return t.reshape(1, -1, *([1] * (x.dim() - 2)))


def _as_tuple(values) -> tuple[float, ...]:
    return tuple(float(v) for v in values) if isinstance(values, (list, tuple)) else (float(values),)


# ---------------------------------------------------------------------------------------------- functional core
def signed_gradient_perturbation(loss_of: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                                 eps: torch.Tensor, alpha: torch.Tensor, random_start: float, targeted: bool,
                                 generator: torch.Generator,
                                 valid_range: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The perturbation ``x_adv - x`` of one signed-gradient step from a random start; ``|x_adv - x| <= eps``.

    ``loss_of(x')`` is the attack loss at ``x'`` (to be ascended; the targeted loss is negated here). Only the
    gradient with respect to ``x'`` is taken (``torch.autograd.grad``), so no parameter's ``.grad`` changes.
    """
    x = x.detach()
    per_example = (x.shape[0],) + (1,) * (x.dim() - 1)
    starts = torch.rand(x.shape[0], generator=generator, device=x.device) < random_start
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
    x0 = x + noise * eps * starts.reshape(per_example).to(x.dtype)
    if valid_range is not None:
        x0 = torch.clamp(x0, *valid_range)
    x0.requires_grad_(True)
    loss = loss_of(x0)
    (grad,) = torch.autograd.grad(-loss if targeted else loss, x0)
    x_adv = torch.clamp(x0.detach() + alpha * grad.sign(), x - eps, x + eps)
    if valid_range is not None:
        x_adv = torch.clamp(x_adv, *valid_range)
    return (x_adv - x).detach()


def attack_loss(logits: torch.Tensor, labels: torch.Tensor, shift_labels: bool) -> torch.Tensor:
    """Mean cross-entropy over examples (class labels) or label tokens (per-token labels, ``-100`` ignored)."""
    if loss_rules.is_token_level(labels):
        count = loss_rules.count_label_tokens(labels, shift_labels).clamp(min=1)
        return loss_rules.summed_token_cross_entropy(logits, labels, shift_labels) / count
    return F.cross_entropy(logits.float(), labels.to(logits.device))


def random_wrong_labels(labels: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random label different from the true one (``-100`` positions kept)."""
    offset = torch.randint(1, num_classes, labels.shape, generator=generator, device=labels.device)
    wrong = (labels + offset) % num_classes
    return torch.where(labels == loss_rules.IGNORE_INDEX, labels, wrong)


def perturbed_input_name(inputs: dict, input_name: str = "auto") -> str:
    if input_name != "auto":
        if input_name not in inputs:
            raise KeyError(f"ConAdv input_name={input_name!r} is not in the batch (it has {sorted(inputs)})")
        return input_name
    for key in (*_FLOAT_INPUTS, "input_ids"):
        if key in inputs:
            return key
    raise ValueError(f"ConAdv found no input to perturb in the batch (keys {sorted(inputs)}): it perturbs "
                     f"{', '.join(_FLOAT_INPUTS)} or, through the input embeddings, input_ids; set "
                     "adversarial_args='input_name=...' for another float input")


@contextlib.contextmanager
def embedding_perturbation(model, input_ids: torch.Tensor, delta: torch.Tensor):
    """While active, the model's input-embedding layer returns ``embedding + delta`` when it embeds ``input_ids``
    (and its plain output for anything else, e.g. a seq2seq decoder sharing the table)."""
    layer = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if layer is None:
        raise ValueError(f"{type(model).__name__} has no get_input_embeddings(): ConAdv on input_ids needs an "
                         "embedding layer to perturb")
    hits = []

    def add_delta(module, args, output):
        ids = args[0] if args else None
        if ids is input_ids or (isinstance(ids, torch.Tensor) and ids.shape == input_ids.shape
                                and torch.equal(ids, input_ids)):
            hits.append(True)
            return output + delta.to(output.dtype)
        return None

    handle = layer.register_forward_hook(add_delta)
    try:
        yield hits
    finally:
        handle.remove()
    if not hits:
        raise RuntimeError(f"{type(model).__name__} never embedded input_ids through get_input_embeddings(), so the "
                           "adversarial perturbation was not applied")


def perturbation(model, inputs: dict, config: ConAdvConfig, generator: torch.Generator,
                 shift_labels: bool) -> tuple[str, torch.Tensor, torch.Tensor]:
    """(perturbed input name, delta, attack loss at the start point) of one attack on ``model`` (used as it is:
    pass a copy for stale weights)."""
    labels = inputs.get("labels")
    if not isinstance(labels, torch.Tensor) or torch.is_floating_point(labels):
        raise ValueError("ConAdv's attack needs integer class or token `labels` in the batch")
    key = perturbed_input_name(inputs, config.input_name)
    if key == "input_ids":
        x = model.get_input_embeddings()(inputs["input_ids"]).detach()
        valid = None
    else:
        x = inputs[key]
        if not torch.is_floating_point(x):
            raise ValueError(f"ConAdv perturbs float inputs or input_ids; {key!r} is {x.dtype}")
        valid = config.valid_range(x)
    eps, alpha = config.radius_and_step(x)
    targets, start_loss = [None], []

    def loss_of(x_start):
        if key == "input_ids":
            with embedding_perturbation(model, inputs["input_ids"], x_start - x):
                logits = loss_rules.logits_of(model(**inputs))
        else:
            logits = loss_rules.logits_of(model(**{**inputs, key: x_start}))
        if targets[0] is None:
            targets[0] = (random_wrong_labels(labels, logits.shape[-1], generator) if config.targeted else labels)
        start_loss.append(attack_loss(logits, targets[0], shift_labels))
        return start_loss[0]

    delta = signed_gradient_perturbation(loss_of, x, eps, alpha, config.random_start, config.targeted, generator,
                                         valid)
    return key, delta, start_loss[0].detach()


def concatenated_batch(inputs: dict, key: str, delta: torch.Tensor) -> dict:
    """``[clean; adversarial]`` along the batch: every tensor input twice, the perturbed one with ``delta`` added
    to its second half (for ``input_ids`` the perturbation is added in the embedding: ``embedding_perturbation``)."""
    batch = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in inputs.items()}
    if key != "input_ids":
        batch[key] = torch.cat([inputs[key], inputs[key] + delta.to(inputs[key].dtype)])
    return batch


def micro_batch_seed(seed: int, step: int, micro_step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, micro_step, rank]).generate_state(1)[0])


def attack_copy(model) -> torch.nn.Module:
    """The model the attack runs on: a copy with frozen parameters, no hooks, dropout off, BatchNorm on batch
    statistics (as in the training forward) with running statistics of its own."""
    clone = copy.deepcopy(model)
    for module in clone.modules():
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
        module._backward_hooks.clear()
        module.training = isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
    for param in clone.parameters():
        param.requires_grad_(False)
        param.grad = None
    return clone


@torch.no_grad()
def copy_weights(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Parameters and buffers of ``source`` into ``target`` (same architecture), in place."""
    src = [*source.parameters(), *source.buffers()]
    dst = [*target.parameters(), *target.buffers()]
    torch._foreach_copy_(dst, src)


# ---------------------------------------------------------------------------------------------- Trainer glue
class ConAdv(Algorithm):
    """Adversarial training with a one-step attack on stale (``mode="conadv"``) or current (``"sequential"``)
    weights; it replaces every training micro-batch by ``[clean; adversarial]`` (``transform_micro_batch``).

    Add it through ``LargeBatchArguments(adversarial="conadv", adversarial_args="epsilon=...")`` or pass
    ``ConAdv(ConAdvConfig(...))`` in ``callbacks`` (then ``adversarial`` is 'none' or the same mode).
    """

    name = "conadv"
    unsupported_under_fsdp = "the attack runs on a full copy of the model, which FSDP shards across ranks"

    def check(self, plan) -> None:
        """No ZeRO-3 (the attack copy is a full model), no ``compute_loss_func``, no other ``adversarial`` mode."""
        option = plan.args.adversarial if hasattr(plan.args, "adversarial") else "none"
        if option not in ("none", self.mode):
            raise ValueError(f"a ConAdv callback in mode {self.mode!r} needs adversarial={self.mode!r} (or 'none'); "
                             f"got adversarial={option!r}")
        if plan.zero_stage == 3:
            raise ValueError(
                f"{self.option} is not supported under DeepSpeed ZeRO-3: the attack runs on a full copy of the "
                "model, which ZeRO-3 partitions across ranks. Use ZeRO-1/2 (recipes/configs/ds_zero2.json) or DDP.")
        if plan.custom_loss:
            raise ValueError(f"{self.option} builds the loss of [clean; adversarial] itself; it cannot be combined "
                             "with compute_loss_func")

    def __init__(self, config: ConAdvConfig, mode: str = "conadv"):
        if mode not in ADVERSARIAL_MODES[1:]:
            raise ValueError(f"ConAdv mode must be one of {ADVERSARIAL_MODES[1:]}, got {mode!r}")
        self.config = config
        self.mode = mode
        self.option = f"adversarial={mode!r}"
        self.attack_model: torch.nn.Module | None = None
        self._pending_state: dict | None = None
        self._loss_sum: torch.Tensor | float = 0.0
        self._loss_count = 0
        # concurrent attacks: the worker, this step's (micro-batch, attack) started ahead, and what the attacks
        # need from the training forward (learnt at the first step, which attacks in line)
        self._worker: ThreadPoolExecutor | None = None
        self._stream: AttackStream | None = None
        self._ahead: list[tuple[dict, Future]] = []
        self._shifts_labels: bool | None = None
        self._autocast: tuple[str, bool, torch.dtype] | None = None

    def settings(self) -> dict:
        return {"mode": self.mode, **super().settings()}

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        self.config = self.config.resolved(model, processing_class)

    @property
    def overlaps(self) -> bool:
        """Whether the attacks run ahead on a worker thread (conadv mode with ``concurrent``)."""
        return self.mode == "conadv" and self.config.concurrent

    def on_micro_batches_drawn(self, args, state, control, *, batches: list, **kwargs):
        """Start this step's attacks on the worker thread (on CUDA: on its side stream), in micro-batch order, on
        the stale copy ``w_{t-1}`` (from the second step on: the first makes the copy and learns the forward's
        autocast in line)."""
        if not (self.overlaps and self.attack_model is not None and self._autocast is not None):
            return
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="conadv-attack")
            self._stream = AttackStream.for_device(_device_of(batches[0]))
        ready = None if self._stream is None else self._stream.ready()
        self._ahead = [(batch, self._worker.submit(
            self._attack, batch, micro_batch_seed(args.seed, state.global_step, k, args.process_index), ready))
            for k, batch in enumerate(batches)]

    def _attack(self, inputs: dict, seed: int, ready) -> tuple:
        """One attack on the stale copy, seeded as in line, under the training forward's autocast (autocast is
        per thread: the worker enters it again): ``(key, delta, loss, done)``, ``done`` the side stream's event
        on CUDA, else ``None``."""
        device_type, enabled, dtype = self._autocast

        def attack():
            generator = torch.Generator(device=_device_of(inputs)).manual_seed(seed)
            with torch.autocast(device_type, dtype=dtype, enabled=enabled):
                return perturbation(self.attack_model, inputs, self.config, generator, self._shifts_labels)

        return (*attack(), None) if self._stream is None else self._stream.attack(ready, inputs, attack)

    def _take(self, future: Future) -> tuple:
        """An attack's ``(key, delta, loss)``, once the training stream may use them."""
        key, delta, loss, done = future.result()
        if done is not None:
            AttackStream.hand_over(done, delta, loss)
        return key, delta, loss

    def _attack_started_ahead(self, micro_step: int, inputs: dict) -> Future | None:
        """The attack started for this micro-batch, if it was started on these very tensors (on CPU the trainer
        hands the loader's tensors on); otherwise every attack in flight is finished first (they share the copy)."""
        if micro_step < len(self._ahead):
            batch, future = self._ahead[micro_step]
            if batch.keys() == inputs.keys() and all(batch[k] is v for k, v in inputs.items()
                                                     if isinstance(v, torch.Tensor)):
                return future
        self._finish_attacks_ahead()
        return None

    def _finish_attacks_ahead(self) -> None:
        """Wait for every attack in flight (on CUDA the training stream waits for their kernels too: the stale
        copy's BatchNorm statistics and weights are theirs until then)."""
        for _, future in self._ahead:
            self._take(future)
        self._ahead = []

    def on_train_end(self, args, state, control, **kwargs):
        self._finish_attacks_ahead()
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker, self._stream = None, None

    def transform_micro_batch(self, args, state, control, *, step, model, inputs: dict) -> MicroBatch:
        """The ``[clean; adversarial]`` batch for this micro-batch and the context to run the model's forward in
        (the loss then averages the two halves: ``copies=2``).

        ``model`` is the unwrapped trained model; the trainer calls this inside the training forward's autocast
        context. In conadv mode the attack copy holds the previous step's weights; it is refreshed with the current
        ones after the step's last attack, before the update changes them (under DeepSpeed the update happens inside
        the last micro-batch's backward)."""
        ahead = self._attack_started_ahead(step.micro_step, inputs) if self._ahead else None
        if ahead is not None:
            key, delta, loss = self._take(ahead)
        else:
            seed = micro_batch_seed(args.seed, state.global_step, step.micro_step, args.process_index)
            if self.attack_model is None:
                self.attack_model = attack_copy(model)
                if self._pending_state is not None:
                    self.attack_model.load_state_dict(self._pending_state)
                    self._pending_state = None
            if self.mode == "sequential":
                copy_weights(model, self.attack_model)
            generator = torch.Generator(device=_device_of(inputs)).manual_seed(seed)
            key, delta, loss = perturbation(self.attack_model, inputs, self.config, generator, step.shifts_labels)
            device_type = _device_of(inputs).type
            self._shifts_labels = step.shifts_labels
            self._autocast = (device_type, torch.is_autocast_enabled(device_type),
                              torch.get_autocast_dtype(device_type))
        if self.mode == "conadv" and step.last_micro_batch:
            self._finish_attacks_ahead()  # all done: the worker attacks in order
            copy_weights(model, self.attack_model)
        self._loss_sum = loss + self._loss_sum
        self._loss_count += 1
        batch = concatenated_batch(inputs, key, delta)
        if key != "input_ids":
            return MicroBatch(batch, contextlib.nullcontext(), copies=2)
        zeros = torch.zeros_like(delta)
        return MicroBatch(batch, embedding_perturbation(model, batch["input_ids"], torch.cat([zeros, delta])), copies=2)

    def log_metrics(self) -> dict[str, float]:
        """``adversarial_attack_loss``: the attack model's loss at the attack's start points (mean since the last
        log over every rank's micro-batches, as HF's ``loss``; for conadv that is the stale model's), read here so
        the training loop never waits for it. Every rank logs (HF's loss gather is a collective too) with the same
        count of attacks, so all take part in the one all-reduce or none does."""
        if not self._loss_count:
            return {}
        totals = torch.tensor([float(self._loss_sum), float(self._loss_count)], dtype=torch.float64,
                              device=backends.collective_device())
        total, count = backends.all_reduce_sum(totals).tolist()
        self._loss_sum, self._loss_count = 0.0, 0
        return {"adversarial_attack_loss": total / count}

    # checkpoint state: the attack copy's weights (the stale w_{t-1}); the generator needs none (seeded per step)
    def state_dict(self) -> dict[str, Any]:
        # relative_epsilon's RMS is the run start's: a resume must not re-read it from embeddings trained since
        rms = {} if self.config.embedding_rms is None else {"embedding_rms": self.config.embedding_rms}
        if self.attack_model is None:
            return rms if self._pending_state is None else {"attack_model": self._pending_state, **rms}
        return {"attack_model": {k: v.detach().clone() for k, v in self.attack_model.state_dict().items()}, **rms}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        weights = state["attack_model"]  # always saved after a step: never restart the stale copy silently
        if self.attack_model is None:
            self._pending_state = weights
        else:
            self.attack_model.load_state_dict(weights)
        if "embedding_rms" in state:
            self.config = replace(self.config, embedding_rms=float(state["embedding_rms"]))


def evaluate_under_attack(trainer, dataset, config: ConAdvConfig, metric_key_prefix: str = "eval_adv") -> dict:
    """Metrics on ``dataset`` with every batch attacked by the same one-step attack, on the current weights in
    eval mode (BatchNorm on running statistics, no dropout): ``<prefix>_accuracy`` for class labels, ``<prefix>_loss``
    (mean over examples or label tokens) and, for token labels, ``<prefix>_perplexity``. Random starts are seeded
    by batch, so two runs are attacked alike. Counts are summed over ranks."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    config = config.resolved(model, trainer.processing_class)
    was_training = model.training
    model.eval()
    shift = loss_rules.shifts_labels(model)
    totals = torch.zeros(3, dtype=torch.float64)  # correct (or 0), loss sum, examples (or label tokens)
    token_level = False
    try:
        for index, batch in enumerate(trainer.get_eval_dataloader(dataset)):
            batch = trainer._prepare_inputs(batch)
            seed = micro_batch_seed(trainer.args.seed, 2**32 - 1, index, trainer.args.process_index)
            generator = torch.Generator(device=_device_of(batch)).manual_seed(seed)
            key, delta, _ = perturbation(model, batch, config, generator, shift)
            perturbed = batch if key == "input_ids" else {**batch, key: batch[key] + delta}
            perturbing = (embedding_perturbation(model, batch["input_ids"], delta) if key == "input_ids"
                          else contextlib.nullcontext())
            with torch.no_grad(), perturbing:
                logits = loss_rules.logits_of(model(**perturbed)).float()
            labels = batch["labels"]
            token_level = loss_rules.is_token_level(labels)
            if token_level:
                totals[1] += float(loss_rules.summed_token_cross_entropy(logits, labels, shift))
                totals[2] += float(loss_rules.count_label_tokens(labels, shift))
            else:
                totals[0] += float((logits.argmax(-1) == labels).sum())
                totals[1] += float(F.cross_entropy(logits, labels, reduction="sum"))
                totals[2] += labels.shape[0]
    finally:
        model.train(was_training)
    correct, loss_sum, count = backends.all_reduce_sum(totals.to(trainer.args.device)).tolist()
    if not count:
        raise ValueError("evaluate_under_attack: the evaluation dataset is empty")
    metrics = {f"{metric_key_prefix}_loss": loss_sum / count}
    if token_level:
        metrics[f"{metric_key_prefix}_perplexity"] = float(np.exp(loss_sum / count))
    else:
        metrics[f"{metric_key_prefix}_accuracy"] = correct / count
    return metrics


class AttackStream:
    """The CUDA side stream the worker's attacks run on, and the events that order it against the training stream
    (none of this exists on CPU, where ``for_device`` gives ``None`` and the worker thread alone overlaps).

    * ``ready()``, on the training thread when a step's batches are drawn: an event on the training stream after
      everything the attacks read was written there (the inputs' copies to the device, the stale copy's weights).
    * ``attack(ready, inputs, fn)``, on the worker: the side stream waits for ``ready``, runs ``fn`` and records
      ``done``. The inputs, allocated on the training stream, are marked as used by the side stream so the caching
      allocator does not hand their memory out while the attack still reads it.
    * ``hand_over(done, *tensors)``, on the training thread before it uses an attack's results: the training
      stream waits for ``done``, and the results, allocated on the side stream, are marked as used by it.
    """

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device=device)

    @staticmethod
    def for_device(device: torch.device) -> "AttackStream | None":
        return AttackStream(device) if device.type == "cuda" else None

    def ready(self) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.stream.device))
        return event

    def attack(self, ready: torch.cuda.Event, inputs: dict, fn: Callable[[], tuple]) -> tuple:
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            for value in inputs.values():
                if isinstance(value, torch.Tensor) and value.device == self.stream.device:
                    value.record_stream(self.stream)
            result = fn()
            done = torch.cuda.Event()
            done.record(self.stream)
        return (*result, done)

    @staticmethod
    def hand_over(done: torch.cuda.Event, *tensors: torch.Tensor) -> None:
        training = torch.cuda.current_stream(tensors[0].device)
        training.wait_event(done)
        for tensor in tensors:
            tensor.record_stream(training)


def _device_of(inputs: dict) -> torch.device:
    return next(v.device for v in inputs.values() if isinstance(v, torch.Tensor))

