"""A recurrent model's state carried across steps, one slot per stream (truncated BPTT, Zaremba et al. 2014).

The corpus is cut into B parallel streams (``data.text.LMStreams``); the example of stream ``s`` at position
``t`` continues the one at ``t - 1``. A model that owns a ``CarriedState`` (as ``model.carried_state``) starts
each example from the final state its stream reached one position earlier, detached, and from zeros at position
0 (each epoch's and each evaluation's start).

Why the state is keyed by stream and position, not by "the previous batch": the same micro-batch is run more than
once in a step by some methods (per-example gradients, ConAdv's attack, EXTRAP-SGD's look-ahead), a rank holds
several micro-batches of different streams, and a resume must continue every stream. ``read`` at the position the
stream already stands on returns the same start state again (a repeated forward is exact); at the next position
it advances; any other position means the data order is not the streams' (a shuffled sampler) and is refused.

Training and evaluation keep separate stores, so an evaluation between training steps leaves the training streams
as they were. The trainer saves the training store in each rank's checkpoint (each rank holds its own streams).
"""

from __future__ import annotations

import torch

State = tuple[torch.Tensor, ...]


class _Store:
    """The start and end states of every stream seen, at ``position`` (the position whose start state is held)."""

    def __init__(self):
        self.start: list[torch.Tensor] | None = None  # per state tensor: (layers, streams, hidden)
        self.end: list[torch.Tensor] | None = None
        # on the CPU explicitly: from_pretrained builds the model under a meta-device context
        self.position = torch.empty(0, dtype=torch.long, device="cpu")
        self.has_end = torch.empty(0, dtype=torch.bool, device="cpu")

    def grow(self, streams: int, like: State) -> None:
        """Room for stream ids below ``streams``, shaped like ``like`` (each (layers, batch, hidden))."""
        old = self.position.numel()
        if old >= streams and self.start is not None:
            return
        streams = max(streams, old)

        def widen(tensors):
            new = [t.new_zeros(t.shape[0], streams, *t.shape[2:]) for t in like]
            if tensors is not None:
                for n, t in zip(new, tensors):
                    n[:, :old] = t
            return new

        self.start, self.end = widen(self.start), widen(self.end)
        self.position = torch.cat([self.position, torch.full((streams - old,), -1, dtype=torch.long, device="cpu")])
        self.has_end = torch.cat([self.has_end, torch.zeros(streams - old, dtype=torch.bool, device="cpu")])

    def state_dict(self) -> dict:
        return {"start": self.start, "end": self.end, "position": self.position, "has_end": self.has_end}

    def load_state_dict(self, state: dict) -> None:
        self.start, self.end = state["start"], state["end"]
        self.position, self.has_end = state["position"], state["has_end"]


class CarriedState:
    """Per-stream recurrent state for ``model.forward(..., stream_ids, stream_positions)``."""

    def __init__(self):
        self._stores = {True: _Store(), False: _Store()}  # by model.training

    def read(self, training: bool, stream_ids: torch.Tensor, positions: torch.Tensor, zeros: State) -> State:
        """The start state of each example: its stream's state after ``position - 1``, zeros at position 0.
        ``zeros``: a zero state for this batch (each (layers, batch, hidden)), which also gives dtype and device."""
        store = self._stores[training]
        ids, positions = stream_ids.cpu().long(), positions.cpu().long()
        store.grow(int(ids.max()) + 1, zeros)
        current = store.position[ids]
        fresh = positions == 0
        advance = (positions == current + 1) & store.has_end[ids] & ~fresh
        again = (positions == current) & ~fresh
        wrong = ~(fresh | advance | again)
        if bool(wrong.any()):
            i = int(wrong.nonzero()[0])
            if int(current[i]) < 0:
                raise RuntimeError(
                    f"stream {int(ids[i])} is fed position {int(positions[i])} but has no carried state: a resume "
                    "from a checkpoint that holds no streams' state (written by another version, or stateless); "
                    "resume from one this version wrote, or restart the epoch")
            raise RuntimeError(
                f"stream {int(ids[i])} is fed position {int(positions[i])}, but its carried state is for position "
                f"{int(current[i])}: the batches are not the streams' order. Train stateful streams with "
                "train_sampling_strategy='sequential' and the global batch the streams were built for")
        moved = ids[advance]
        for start, end in zip(store.start, store.end):
            start[:, ids[fresh]] = 0
            start[:, moved] = end[:, moved]
        store.position[ids] = positions
        store.has_end[ids[fresh | advance]] = False
        device = zeros[0].device
        return tuple(start[:, ids.to(start.device)].to(device) for start in store.start)

    def write(self, training: bool, stream_ids: torch.Tensor, state: State) -> None:
        """Keep each example's final state (detached) as its stream's end state."""
        store = self._stores[training]
        ids = stream_ids.cpu().long()
        for end, final in zip(store.end, state):
            end[:, ids.to(end.device)] = final.detach().to(end.dtype)
        store.has_end[ids] = True

    def state_dict(self) -> dict:
        """The training streams only: an evaluation always starts its own at position 0."""
        return self._stores[True].state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._stores[True].load_state_dict(state)


def check_stream_order(dataset, global_batch: int, training: bool, sampling_strategy: str,
                       batch_changes: bool) -> None:
    """Refuse, before any work, a stream dataset (``ordered``, with ``num_streams``) read in another order or
    with another global batch than the one its streams were built for: the carried states would belong to other
    streams (``read`` would stop the run at its second step, this says why and what to set at the start)."""
    streams = getattr(dataset, "num_streams", None)
    if not getattr(dataset, "ordered", False) or streams is None:
        return
    what = "training" if training else "evaluation"
    if training and sampling_strategy != "sequential":
        raise ValueError(f"the training set is {streams} stateful streams, which must be read in order: set "
                         f"train_sampling_strategy='sequential' (it is {sampling_strategy!r})")
    if training and batch_changes:
        raise ValueError("the training set is stateful streams built for one global batch, and an algorithm "
                         "changes the batch during the run (adaptive_batch): use stateless chunks with it")
    if streams != global_batch:
        flag = "per_device_train_batch_size" if training else "per_device_eval_batch_size"
        raise ValueError(f"the {what} set has {streams} streams but the {what} global batch is {global_batch}: "
                         f"build the streams for the global batch ({flag} x processes"
                         f"{' x gradient_accumulation_steps' if training else ''}) or change {flag}")
