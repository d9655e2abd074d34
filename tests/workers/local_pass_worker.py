"""Multi-process worker: rank 0 alone runs the local passes (ConAdv attacks, EXTRAP-SGD's local gradients) on a DDP
model's module; then both ranks train a DDP step and all-reduce a check value. Had a local pass issued any
collective, rank 0 would be ahead by those calls and the following collectives would pair up wrongly (gloo then
fails, hangs into the timeout, or sums the wrong tensors).

Usage (under torchrun): local_pass_worker.py OUT_DIR
"""

import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from hf_largebatch.algorithms.conadv import ConAdv, ConAdvConfig
from hf_largebatch.core.backends import run_recipe
from hf_largebatch.core.local_gradients import local_gradient
from helpers import conadv_batch, flat_params, tiny_bert_classifier, token_dataset


def main():
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    torch.set_num_threads(1)
    ddp = DistributedDataParallel(tiny_bert_classifier())
    ddp.train()
    data = token_dataset(16, 12, 64, 3, seed=rank).columns
    local_passes = 0
    if rank == 0:
        algorithm = ConAdv(ConAdvConfig(epsilon=0.05))
        params = list(ddp.module.parameters())
        for step in range(3):
            conadv_batch(algorithm, ddp.module, data, step=step)
            local_gradient(ddp.module, params, lambda: ddp.module(**data)["loss"])
            local_passes += 2
    grads_before = [p.grad for p in ddp.parameters()]
    ddp(**data)["loss"].backward()  # DDP all-reduces the gradients
    check = torch.tensor([float(rank + 1)])
    dist.all_reduce(check)
    grads = torch.cat([p.grad.reshape(-1) for p in ddp.parameters()])
    gathered = [torch.zeros_like(grads) for _ in range(2)]
    dist.all_gather(gathered, grads)
    result = {"local_passes": local_passes, "check": check.item(), "grads_before_none": all(g is None for g in grads_before),
              "grads_equal_across_ranks": bool(torch.equal(gathered[0], gathered[1])),
              "params": flat_params(ddp.module).tolist()}
    Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    run_recipe(main)
