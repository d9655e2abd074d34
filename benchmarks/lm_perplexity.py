"""Stateful perplexity of a saved LSTM language model on any PTB split (or the first tokens of one), the way the
recipe evaluates: the split cut into B contiguous streams, read ``seq_len`` tokens at a time with the state carried.
It tells a generalisation gap from an evaluation artefact: training-split perplexity far below validation's on the
same weights is over-fitting.

    python benchmarks/lm_perplexity.py benchmarks/results/lstm/runs/16x_adascale_r0/checkpoint-2428 \\
        --split train --max_tokens 73760
"""

from __future__ import annotations

import argparse
import math

import torch

from hf_largebatch.data.text import load_ptb
from hf_largebatch.models.lstm_lm import LSTMForCausalLM


def stateful_perplexity(model, tokens: torch.Tensor, streams: int, seq_len: int) -> float:
    """exp(mean next-token loss) over ``streams`` contiguous streams, ``seq_len`` tokens a forward, state carried."""
    length = (len(tokens) - 1) // streams
    inputs = tokens[:length * streams].view(streams, length)
    targets = tokens[1:length * streams + 1].view(streams, length)
    state, total = None, 0.0
    with torch.no_grad():
        for start in range(0, length, seq_len):
            out = model(inputs[:, start:start + seq_len], state=state, return_state=True)
            state = out.state
            total += torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(),
                                                       targets[:, start:start + seq_len].flatten(),
                                                       reduction="sum").item()
    return math.exp(total / targets.numel())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a run's checkpoint folder (or any saved LSTMForCausalLM)")
    p.add_argument("--split", default="validation", choices=("train", "validation", "test"))
    p.add_argument("--max_tokens", type=int, help="only the split's first N tokens")
    p.add_argument("--streams", type=int, default=20)
    p.add_argument("--seq_len", type=int, default=20)
    opts = p.parse_args(argv)
    model = LSTMForCausalLM.from_pretrained(opts.checkpoint).eval()
    tokens = torch.as_tensor(load_ptb().splits[opts.split])[:opts.max_tokens]
    print(f"{opts.split} perplexity ({len(tokens)} tokens, {opts.streams} streams of {opts.seq_len}): "
          f"{stateful_perplexity(model, tokens, opts.streams, opts.seq_len):.1f}")


if __name__ == "__main__":
    main()
