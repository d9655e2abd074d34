"""Multi-process worker: ``ddp_timeout`` holds on CPU. Rank 1 never joins rank 0's barrier (it sleeps, then leaves);
rank 0 records how long its barrier waited and how it failed.

Usage (under torchrun, 2 ranks): timeout_worker.py OUT_DIR
"""

import json
import os
import sys
import time
from pathlib import Path

import torch.distributed as dist

from hf_largebatch import LargeBatchArguments

SLEEP = 12.0
TIMEOUT = 2


def wait_for_peer(out_dir: str) -> None:
    """Both ranks past their imports before the process group starts: gloo's connection also runs under
    ``ddp_timeout``, and two ranks importing torch under load arrive seconds apart (a 1 s timeout failed there)."""
    rank = int(os.environ["RANK"])
    Path(out_dir, f"ready{rank}").touch()
    while not Path(out_dir, f"ready{1 - rank}").exists():
        time.sleep(0.01)


def main(out_dir: str) -> None:
    wait_for_peer(out_dir)
    args = LargeBatchArguments(output_dir=out_dir, use_cpu=True, ddp_timeout=TIMEOUT, report_to=[])
    args.device  # noqa: B018 -- HF sets up the process group here
    if args.process_index == 1:
        time.sleep(SLEEP)
        return
    start = time.monotonic()
    try:
        dist.barrier()
        error = None
    except Exception as exc:  # gloo's timeout (or, without one, the peer's exit)
        error = f"{type(exc).__name__}: {exc}"
    Path(out_dir, "rank0.json").write_text(json.dumps({"waited": time.monotonic() - start, "error": error}))


if __name__ == "__main__":
    main(sys.argv[1])
