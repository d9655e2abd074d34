"""Stateful language modelling (truncated BPTT over B streams): the data layout (``LMStreams``), the carried
state (``core.carried_state``) in training, evaluation, resume and every split of the batch, and the checks that
refuse an order or batch the streams were not built for. The 2-rank split is in test_multiprocess.py."""

import numpy as np
import pytest
import torch

from hf_largebatch import LargeBatchArguments, LargeBatchTrainer
from hf_largebatch.core.carried_state import CarriedState
from hf_largebatch.data.text import LMStreams
from helpers import flat_params, tiny_lstm_lm, token_streams
from workers.train_worker import run_one

STREAMS_RUN = {"model": "lstm_streams", "steps": 5, "lr": 0.5, "args": {"train_sampling_strategy": "sequential"}}


def hand_stream_losses(model, streams: LMStreams) -> tuple[float, int]:
    """(summed token cross-entropy, token count) of every stream read in order with its (h, c) carried by hand,
    from zeros at position 0: the definition, independent of ``CarriedState``."""
    model.eval()
    total, count, state = 0.0, 0, None
    with torch.no_grad():
        for t in range(streams.num_positions):
            batch = [streams[t * streams.num_streams + s] for s in range(streams.num_streams)]
            ids = torch.stack([b["input_ids"] for b in batch])
            out = model(input_ids=ids[:, :-1], state=state, return_state=True)  # the last token is a target only
            state = out.state
            total += torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten(),
                                                       reduction="sum").item()
            count += ids[:, 1:].numel()
    return total, count


# ------------------------------------------------------------------------------------------------ data layout
def test_streams_cut_the_corpus_into_contiguous_streams_read_position_by_position():
    ids = torch.arange(101)
    streams = LMStreams(ids, num_streams=4, seq_len=5)
    assert streams.stream_length == 25 and streams.num_positions == 5 and len(streams) == 20
    for t in range(5):
        for s in range(4):
            example = streams[t * 4 + s]
            start = s * 25 + t * 5
            assert example["input_ids"].tolist() == list(range(start, start + 6))
            assert int(example["stream_ids"]) == s and int(example["stream_positions"]) == t
    # each stream's examples overlap by one token: every token of a stream but its first is predicted once
    stream0 = [streams[t * 4]["input_ids"][1:].tolist() for t in range(5)]
    assert sum(stream0, []) == list(range(1, 26))
    with pytest.raises(ValueError, match="too few"):
        LMStreams(torch.arange(20), num_streams=8, seq_len=5)


# ------------------------------------------------------------------------------------------------ the model
def test_model_carries_each_streams_state_as_a_hand_loop_does():
    model = tiny_lstm_lm().eval()
    streams = token_streams(num_streams=4, seq_len=6, positions=5)
    with torch.no_grad():
        carried = []
        for t in range(streams.num_positions):
            batch = torch.utils.data.default_collate([streams[t * 4 + s] for s in range(4)])
            carried.append(model(**{k: v for k, v in batch.items() if k != "labels"}).logits)
        ids = torch.stack([torch.cat([streams[t * 4 + s]["input_ids"][:-1] for t in range(5)]) for s in range(4)])
        whole = model(input_ids=ids).logits  # each stream read in one go: the state flows through every position
    # an example's last token is the next one's first: read once, from the state before it
    torch.testing.assert_close(torch.cat([logits[:, :-1] for logits in carried], 1), whole, rtol=1e-5, atol=1e-6)
    for before, after in zip(carried, carried[1:]):
        torch.testing.assert_close(before[:, -1], after[:, 0], rtol=1e-5, atol=1e-6)
    # and it matters: from zeros at every position the logits differ
    with torch.no_grad():
        batch = torch.utils.data.default_collate([streams[4 + s] for s in range(4)])
        fresh = model(input_ids=batch["input_ids"]).logits
    assert (fresh - carried[1]).abs().max() > 1e-3


def test_a_repeated_forward_starts_from_the_same_state_and_a_skipped_position_is_refused():
    model = tiny_lstm_lm().eval()
    streams = token_streams(num_streams=2, seq_len=4, positions=4)

    def forward(t):
        batch = torch.utils.data.default_collate([streams[t * 2 + s] for s in range(2)])
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits

    with torch.no_grad():
        forward(0)
        first = forward(1)
        again = forward(1)  # an attack, a per-example gradient or a look-ahead runs the batch again
        torch.testing.assert_close(again, first, rtol=0, atol=0)
        with pytest.raises(RuntimeError, match="train_sampling_strategy='sequential'"):
            forward(3)


def test_training_and_evaluation_keep_separate_streams():
    state = CarriedState()
    ids, zeros = torch.tensor([0, 1]), (torch.zeros(1, 2, 3), torch.zeros(1, 2, 3))
    state.read(True, ids, torch.tensor([0, 0]), zeros)
    state.write(True, ids, (torch.ones(1, 2, 3), torch.ones(1, 2, 3)))
    state.read(False, ids, torch.tensor([0, 0]), zeros)  # an evaluation starts its own streams
    state.write(False, ids, (torch.full((1, 2, 3), 5.0), torch.full((1, 2, 3), 5.0)))
    h, _ = state.read(True, ids, torch.tensor([1, 1]), zeros)
    assert torch.equal(h, torch.ones(1, 2, 3))


# ------------------------------------------------------------------------------------------------ the trainer
def test_split_of_the_batch_does_not_change_the_streams_updates(tmp_path):
    """8 streams as 1 x 8 and as 4 x 2 micro-batches (the 2-rank split: test_multiprocess.py): each micro-batch slot
    carries the same streams from step to step, so the updates agree; without the state they would differ."""
    whole = run_one({**STREAMS_RUN, "per_device": 8, "ga": 1}, None)
    split = run_one({**STREAMS_RUN, "per_device": 2, "ga": 4}, None)
    start = flat_params(tiny_lstm_lm())
    assert np.abs(np.array(whole["params"]) - start).max() > 1e-3, "the model did not train"
    np.testing.assert_allclose(split["params"], whole["params"], rtol=0, atol=2e-6)

    model = tiny_lstm_lm()
    stateless = token_streams()
    stateless.ordered = False  # read as plain chunks: the model gets no stream ids
    chunks = [{k: v for k, v in stateless[i].items() if not k.startswith("stream_")} for i in range(len(stateless))]
    args = LargeBatchArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=5, optim="sgd",
                               learning_rate=0.5, lr_scheduler_type="constant", use_cpu=True, report_to=[],
                               save_strategy="no", disable_tqdm=True, seed=0, max_grad_norm=0.0,
                               train_sampling_strategy="sequential")
    LargeBatchTrainer(model=model, args=args, train_dataset=chunks).train()
    assert np.abs(flat_params(model) - np.array(whole["params"])).max() > 1e-4, "the carried state changed nothing"


def test_resume_mid_epoch_continues_every_stream(tmp_path):
    straight = run_one({**STREAMS_RUN, "per_device": 4, "ga": 2}, None)
    out = str(tmp_path / "run")
    run_one({**STREAMS_RUN, "per_device": 4, "ga": 2, "steps": 2, "output_dir": out, "save_steps": 2}, None)
    # the checkpoint holds the streams' state after position 1; a new process (a fresh model) resumes at 2
    resumed = run_one({**STREAMS_RUN, "per_device": 4, "ga": 2, "output_dir": out, "save_steps": 100,
                       "resume": f"{out}/checkpoint-2"}, None)
    np.testing.assert_array_equal(resumed["params"], straight["params"])


def test_evaluation_is_the_hand_computed_stateful_loss(tmp_path):
    model = tiny_lstm_lm()
    streams = token_streams(num_streams=6, seq_len=5, positions=4)
    args = LargeBatchArguments(output_dir=str(tmp_path), per_device_eval_batch_size=6, use_cpu=True, report_to=[])
    metrics = LargeBatchTrainer(model=model, args=args).evaluate(streams)
    total, count = hand_stream_losses(model, streams)
    assert count == len(streams) * 5
    assert metrics["eval_loss"] == pytest.approx(total / count, rel=1e-6)


@pytest.mark.parametrize("change, message", [
    ({"train_sampling_strategy": "random"}, "train_sampling_strategy='sequential'"),
    ({"per_device_train_batch_size": 4}, "8 streams but the training global batch is 4"),
    ({"adaptive_batch": "norm", "adaptive_batch_args": "max_batch_size=32"}, "adaptive_batch"),
])
def test_streams_read_in_another_order_or_batch_are_refused_before_training(tmp_path, change, message):
    model = tiny_lstm_lm()
    before = flat_params(model)
    settings = {"output_dir": str(tmp_path), "per_device_train_batch_size": 8, "max_steps": 2, "use_cpu": True,
                "report_to": [], "train_sampling_strategy": "sequential", "save_strategy": "no"} | change
    trainer = LargeBatchTrainer(model=model, args=LargeBatchArguments(**settings), train_dataset=token_streams())
    with pytest.raises(ValueError, match=message):
        trainer.train()
    np.testing.assert_array_equal(flat_params(model), before)


def test_an_evaluation_batch_other_than_the_streams_is_refused(tmp_path):
    args = LargeBatchArguments(output_dir=str(tmp_path), per_device_eval_batch_size=4, use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="per_device_eval_batch_size"):
        LargeBatchTrainer(model=tiny_lstm_lm(), args=args).evaluate(token_streams(num_streams=6))

