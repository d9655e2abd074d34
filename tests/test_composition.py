"""One composition check over the algorithms a run has (composition.py): every pair of algorithms, configured by
arguments and by callbacks, either trains or is refused at ``train()`` with the same message."""

import itertools

import pytest
import torch
import transformers

from hf_largebatch import Algorithm, Clock, LargeBatchArguments, LargeBatchTrainer, NoiseScaleMonitor
from hf_largebatch.algorithms.adascale import AdaScale
from hf_largebatch.algorithms.autowu import AutoWU
from hf_largebatch import AdaptiveBatch, AdaptiveBatchConfig, LocalSGD
from hf_largebatch.core.composition import RunPlan, check_composition
from hf_largebatch.algorithms.conadv import ConAdv, ConAdvConfig
from hf_largebatch.algorithms.extrapolation import Extrapolation
from helpers import TinyLinearClassifier, random_points

# name: (arguments that turn it on, arguments the callback form still needs, the callback)
ALGORITHMS = {
    "adascale": ({"lr_scaling": "adascale", "base_batch_size": 8}, {"lr_scaling": "adascale", "base_batch_size": 8},
                 lambda: AdaScale()),
    "autowu": ({"lr_schedule": "autowu"}, {"lr_schedule": "autowu"}, lambda: AutoWU()),
    "conadv": ({"adversarial": "conadv", "adversarial_args": "epsilon=0.1,input_name=x"}, {},
               lambda: ConAdv(ConAdvConfig(epsilon=0.1, input_name="x"))),
    "extrapolation": ({"extrapolation": "fresh"}, {}, lambda: Extrapolation("fresh")),
    "adaptive_batch": ({"adaptive_batch": "norm", "adaptive_batch_args": "max_batch_size=64"}, {},
                       lambda local=0: AdaptiveBatch("norm", AdaptiveBatchConfig(max_batch_size=64),
                                                     local_sgd_steps=local)),
    "local_sgd": ({"local_sgd_steps": 2}, {}, lambda: LocalSGD(2)),
    "noise_scale_monitor": (None, {}, lambda: NoiseScaleMonitor()),
}

# combinations the specification rules out (each must be refused, whichever way it is configured)
MUST_REFUSE = {frozenset(p) for p in [("adascale", "local_sgd"), ("adascale", "adaptive_batch"), ("adascale", "autowu"),
                                      ("conadv", "extrapolation"), ("adaptive_batch", "conadv"),
                                      ("adaptive_batch", "extrapolation"), ("adaptive_batch", "autowu"),
                                      ("local_sgd", "conadv"), ("local_sgd", "extrapolation"),
                                      ("local_sgd", "noise_scale_monitor"), ("autowu", "local_sgd")]}
MUST_TRAIN = {frozenset(p) for p in [("adaptive_batch", "noise_scale_monitor"), ("adaptive_batch", "local_sgd"),
                                     ("adascale", "noise_scale_monitor"), ("adascale", "conadv"),
                                     ("autowu", "conadv"), ("extrapolation", "noise_scale_monitor")]}


def outcome(tmp_path, names, by_callbacks):
    """``"trained"`` or the message of the ValueError that refused the run."""
    kwargs, callbacks = {}, []
    for name in names:
        by_args, needs, make = ALGORITHMS[name]
        if by_callbacks or by_args is None:
            kwargs.update(needs)
            callback = make(2) if name == "adaptive_batch" and "local_sgd" in names else make()
            callbacks.append(callback)
        else:
            kwargs.update(by_args)
    try:
        args = LargeBatchArguments(output_dir=str(tmp_path), per_device_train_batch_size=4,
                                   gradient_accumulation_steps=2, max_steps=2, learning_rate=0.1, optim="sgd",
                                   use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, **kwargs)
        trainer = LargeBatchTrainer(model=TinyLinearClassifier(), args=args, train_dataset=random_points(64),
                                    callbacks=callbacks)
        trainer.train()
    except ValueError as error:
        return str(error)
    return "trained"


@pytest.mark.parametrize("pair", list(itertools.combinations(ALGORITHMS, 2)), ids="+".join)
def test_every_pair_trains_or_is_refused_alike(tmp_path, pair):
    by_callbacks = outcome(tmp_path / "callbacks", pair, by_callbacks=True)
    by_arguments = outcome(tmp_path / "arguments", pair, by_callbacks=False)
    assert by_callbacks == by_arguments
    if frozenset(pair) in MUST_REFUSE:
        assert by_callbacks != "trained"
        assert "cannot be combined" in by_callbacks
    if frozenset(pair) in MUST_TRAIN:
        assert by_callbacks == "trained"


def test_adascale_with_a_local_sgd_callback_names_both_options(tmp_path):
    """The review's case: AdaScale by option, local SGD by callback (it trained, with rank-local statistics)."""
    args = LargeBatchArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                               max_steps=2, optim="sgd", use_cpu=True, report_to=[], save_strategy="no",
                               lr_scaling="adascale", base_batch_size=8)
    trainer = LargeBatchTrainer(model=TinyLinearClassifier(), args=args, train_dataset=random_points(64),
                                callbacks=[LocalSGD(2)])
    with pytest.raises(ValueError, match=r"AdaScale \(lr_scaling='adascale'\) cannot be combined with LocalSGD "
                                         r"\(local_sgd_steps=2\): under local SGD the reduced gradient is rank-local"):
        trainer.train()
    assert trainer.state.global_step == 0


# ---------------------------------------------------------------- what each algorithm needs of the run
def plan(**overrides):
    """A RunPlan as LargeBatchTrainer.run_plan() builds it, for refusals that need a backend not runnable in one
    CPU process (DeepSpeed: its 2-rank runs are in test_multiprocess.py)."""
    values = dict(world_size=1, accumulation=2, per_device_batch_size=8, base_batch_size=8, backend="single",
                  zero_stage=0, optimizer_cls=torch.optim.SGD, lr_scaling="adascale",
                  lr_schedule="hf", warmup=False, custom_loss=False, user_scheduler=False, algorithms=(),
                  args=LargeBatchArguments(output_dir="unused", use_cpu=True, report_to=[]))
    values.update(overrides)
    return RunPlan(**values)


ZERO2, ZERO3 = {"backend": "deepspeed", "zero_stage": 2}, {"backend": "deepspeed", "zero_stage": 3}


@pytest.mark.parametrize("algorithm, overrides, message", [
    (lambda: AdaptiveBatch("norm", AdaptiveBatchConfig(max_batch_size=64)), ZERO2, "not supported under DeepSpeed"),
    (lambda: LocalSGD(2), ZERO2, "not supported under DeepSpeed"),
    (lambda: Extrapolation("fresh"), ZERO3, "ZeRO-3"),
    (lambda: Extrapolation("past"), ZERO2, "'past' is not supported under DeepSpeed"),
    (lambda: ConAdv(ConAdvConfig(epsilon=0.1)), ZERO3, "ZeRO-3"),
    (lambda: ConAdv(ConAdvConfig(epsilon=0.1)), {"custom_loss": True}, "compute_loss_func"),
    (lambda: AdaScale(), {**ZERO2, "optimizer_cls": torch.optim.AdamW}, r"\(AdamScale\) is not supported under "
                                                                           r"DeepSpeed.*Use DDP"),
    (lambda: AdaScale(), {"optimizer_cls": transformers.optimization.Adafactor}, "does not know the optimizer "
                                                                                "Adafactor"),
    (lambda: AdaScale(), {"per_device_batch_size": 2}, r"S = 0.5 < 1"),
    (lambda: AdaScale(), {"lr_scaling": "linear"}, "needs lr_scaling='adascale'"),
    (lambda: AdaScale(), {"accumulation": 1}, "at least 2 micro-batch gradients"),
    (lambda: AutoWU(), {"lr_schedule": "autowu", "lr_scaling": "linear"}, "cannot be combined with lr_scaling"),
    (lambda: AutoWU(), {"lr_schedule": "autowu", "lr_scaling": "none", "warmup": True}, "owns the warm-up"),
    (lambda: AdaptiveBatch("norm", AdaptiveBatchConfig(max_batch_size=64)), {"user_scheduler": True},
     "runs the LR schedule on samples"),
])
def test_what_an_algorithm_cannot_run_under_is_refused(algorithm, overrides, message):
    with pytest.raises(ValueError, match=message):
        check_composition([algorithm()], plan(**overrides))


def test_what_they_can_run_under_passes():
    check_composition([AdaScale()], plan(**ZERO2))  # AdaScale (SGD) under ZeRO: tested against DDP elsewhere
    check_composition([AdaScale()], plan(optimizer_cls=torch.optim.AdamW))  # AdamScale under DDP / one process
    check_composition([Extrapolation("fresh"), NoiseScaleMonitor()], plan(**ZERO2))


def test_user_scheduler_with_adaptive_batch_is_refused_at_train(tmp_path):
    """The user's scheduler counts optimizer steps, the adaptive batch's LR must follow samples (it ran on steps)."""
    model = TinyLinearClassifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    args = LargeBatchArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                               max_steps=4, use_cpu=True, report_to=[], save_strategy="no", adaptive_batch="norm",
                               adaptive_batch_args="max_batch_size=64")
    trainer = LargeBatchTrainer(model=model, args=args, train_dataset=random_points(64),
                                optimizers=(optimizer, scheduler))
    with pytest.raises(ValueError, match=r"counts optimizer steps.*pass \(optimizer, None\)"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_two_algorithms_deciding_the_same_owned_event_are_refused():
    """Only one algorithm may decide the schedule's clock (or a step's micro-batches, ...): two that do, and do not
    exclude each other by name, are refused with both named, before any work."""

    class ClockOnSamples(Algorithm):
        name, option = "clock_on_samples", "callbacks=[ClockOnSamples()]"

        def schedule_clock(self, num_training_steps):
            return Clock(lambda: 0, "a schedule of samples")

    class ClockOnTokens(ClockOnSamples):
        name, option = "clock_on_tokens", "callbacks=[ClockOnTokens()]"

    with pytest.raises(ValueError, match=r"ClockOnSamples .* and ClockOnTokens .* both decide schedule_clock"):
        check_composition([ClockOnTokens(), ClockOnSamples()], plan(lr_scaling="none"))
    check_composition([ClockOnSamples(), NoiseScaleMonitor()], plan(lr_scaling="none"))


# ---------------------------------------------------------------- FSDP
FSDP = {"backend": "fsdp"}


@pytest.mark.parametrize("algorithm, reason", [
    (AdaScale, "reduce-scatters gradients during the backward"),
    (NoiseScaleMonitor, "reduce-scatters gradients during the backward"),
    (lambda: AdaptiveBatch("norm", AdaptiveBatchConfig(max_batch_size=64)), "reduce-scatters gradients"),
    (lambda: ConAdv(ConAdvConfig(epsilon=0.1)), "full copy of the model"),
    (lambda: Extrapolation("fresh"), "holds as shards"),
    (lambda: LocalSGD(2), "no local step"),
])
def test_what_reads_local_gradients_or_whole_weights_is_refused_under_fsdp(algorithm, reason):
    with pytest.raises(ValueError, match=f"is not supported under FSDP: .*{reason}"):
        check_composition([algorithm()], plan(**FSDP))


def test_lr_rules_and_autowu_pass_under_fsdp_and_trust_ratio_optimizers_do_not():
    check_composition([], plan(**FSDP, lr_scaling="legw"))
    check_composition([AutoWU()], plan(**FSDP, lr_schedule="autowu", lr_scaling="none"))
    lars = LargeBatchArguments(output_dir="unused", use_cpu=True, report_to=[], optim="lars")
    with pytest.raises(ValueError, match="optim='lars' is not supported under FSDP: its per-layer trust ratios"):
        check_composition([], plan(**FSDP, lr_scaling="none", args=lars))


def test_fsdp_on_cpu_is_refused_at_the_arguments():
    """accelerate builds FSDP only on accelerators; on CPU transformers trained with DDP instead, silently."""
    for options in ({"fsdp": "full_shard"}, {"fsdp": True, "fsdp_config": {"version": 2}}):
        with pytest.raises(ValueError, match="fsdp with use_cpu: .*train with DDP instead, silently"):
            LargeBatchArguments(output_dir="unused", use_cpu=True, report_to=[], **options)


def test_an_fsdp_trainer_refuses_adascale_before_any_step(tmp_path):
    """FSDP cannot run on CPU (see above), so this marks a CPU trainer as HF marks an FSDP one
    (``is_fsdp_enabled``, set from accelerate's FSDP plugin): the run plan says fsdp and train() refuses."""
    args = LargeBatchArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                               lr_scaling="adascale", base_batch_size=4, max_steps=2, use_cpu=True, report_to=[])
    trainer = LargeBatchTrainer(model=TinyLinearClassifier(), args=args, train_dataset=random_points(64))
    trainer.is_fsdp_enabled = True
    assert trainer.run_plan().backend == "fsdp"
    with pytest.raises(ValueError, match=r"AdaScale \(lr_scaling='adascale'\) is not supported under FSDP"):
        trainer.train()
    assert trainer.state.global_step == 0
