"""The training progress bar on the clock the run's budget is counted in.

HF's bar counts optimizer steps up to ``max_steps``. When an algorithm owns the schedule's clock, the budget is
counted in that clock: AdaScale's ``max_steps`` is the base run's budget in base-batch steps of progress, which a
run at scale S spends in about ``max_steps / gain`` optimizer steps, so HF's bar read ``11/40`` when the run ended,
which looks like a crash; the adaptive batch's budget is samples. This bar advances by the clock's own steps, ends
full, and names its unit.
"""

from __future__ import annotations

from transformers.trainer_callback import ProgressCallback


class ClockProgressCallback(ProgressCallback):
    """HF's ``ProgressCallback`` advanced on ``clock()`` (the trainer's ``events.Clock``, known once the schedule
    is built), its total the clock's length or ``max_steps`` (then already in the clock's steps)."""

    def __init__(self, clock):
        super().__init__()
        self._clock = clock

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        clock = self._clock()
        if self.training_bar is not None and clock is not None:
            self.training_bar.total = clock.length or state.max_steps
            self.training_bar.set_description(clock.unit)
            self.current_step = clock.now()  # a resumed run starts where its clock stands
            self.training_bar.update(self.current_step)

    def on_step_end(self, args, state, control, **kwargs):
        clock = self._clock()
        if self.training_bar is None or clock is None:
            return super().on_step_end(args, state, control, **kwargs)
        now = min(clock.now(), self.training_bar.total)
        self.training_bar.update(now - self.current_step)
        self.current_step = now
