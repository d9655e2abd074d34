"""Small models and datasets shared by the tests and by the multi-process workers they launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


class DictDataset(torch.utils.data.Dataset):
    def __init__(self, **columns):
        self.columns = columns
        self.n = len(next(iter(columns.values())))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.columns.items()}


class TinyLinearClassifier(torch.nn.Module):
    """A linear layer with a cross-entropy loss: fast enough to train hundreds of steps in a test."""

    def __init__(self, in_features: int = 8, num_classes: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.linear = torch.nn.Linear(in_features, num_classes)

    def forward(self, x, labels=None):
        logits = self.linear(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = torch.nn.functional.cross_entropy(logits, labels)
        return out


def random_points(n: int = 2048, in_features: int = 8, num_classes: int = 4, seed: int = 0) -> DictDataset:
    g = torch.Generator().manual_seed(seed)
    return DictDataset(x=torch.randn(n, in_features, generator=g),
                       labels=torch.randint(0, num_classes, (n,), generator=g))


class IndexedClassifier(TinyLinearClassifier):
    """Records the dataset index of every example of every training forward (data-order checks)."""

    def __init__(self):
        super().__init__()
        self.seen: list[int] = []

    def forward(self, x, labels=None, index=None):
        if self.training and index is not None:
            self.seen.extend(index.tolist())
        return super().forward(x, labels)


class IndexedBatchNormClassifier(IndexedClassifier):
    """``IndexedClassifier`` behind a BatchNorm: running statistics that each rank updates from its own data."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.BatchNorm1d(self.linear.in_features)

    def forward(self, x, labels=None, index=None):
        return super().forward(self.norm(x), labels, index)


def flat_buffers(model) -> list[float]:
    return [float(v) for b in model.buffers() if b.is_floating_point() for v in b.detach().reshape(-1)]


def indexed_points(n: int = 256) -> DictDataset:
    """Learnable points (label: the largest of the first 4 features) with their dataset index."""
    data = random_points(n)
    data.columns["labels"] = data.columns["x"][:, :4].argmax(dim=1)
    data.columns["index"] = torch.arange(n)
    return data


def digits_dataset(n: int | None = None) -> DictDataset:
    """scikit-learn's bundled digits (real data, no download) as 1x8x8 images in [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    if n is not None:
        x, y = x[:n], y[:n]
    return DictDataset(pixel_values=x, labels=y)


class BatchNormClassifier(torch.nn.Module):
    """An MLP with BatchNorm: running statistics that a forward on a NaN input poisons."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                        torch.nn.Linear(16, 4))

    def forward(self, x, labels=None):
        logits = self.body(x)
        return {"logits": logits, "loss": torch.nn.functional.cross_entropy(logits, labels)}


def poisoned_points(n: int = 64, poisoned=(5,)) -> DictDataset:
    """``random_points`` with NaN inputs at the ``poisoned`` indices."""
    data = random_points(n)
    x = data.columns["x"].clone()
    x[list(poisoned)] = float("nan")
    return DictDataset(x=x, labels=data.columns["labels"])


def tiny_resnet(seed: int = 0):
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    cfg = ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                       layer_type="basic", num_labels=10, downsample_in_first_stage=False)
    return ResNetForImageClassification(cfg)


def freeze_batchnorm_statistics(model):
    """BatchNorm normalises within each micro-batch, so its gradient depends on the split by design; tests of the
    loss weighting run BN on its running statistics to isolate what the trainer owns."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.register_forward_pre_hook(lambda mod, inp: setattr(mod, "training", False))
    return model


def tiny_bert_classifier(seed: int = 0, vocab_size: int = 64, num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=num_labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def zipf_token_classification(n: int, seq_len: int, vocab: int, seed: int = 0) -> DictDataset:
    """Sequences of tokens 1..vocab-1 drawn with probability ~ 1/rank (as words in text: a few rows in every step,
    most rows rarely or never), labelled by the parity of their first token."""
    g = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, vocab, dtype=torch.float)
    ids = torch.multinomial(weights, n * seq_len, replacement=True, generator=g).reshape(n, seq_len) + 1
    return DictDataset(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids[:, 0] % 2)


def tiny_gpt2_lm(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def tiny_lstm_lm(seed: int = 0, vocab_size: int = 64):
    from hf_largebatch.models import LSTMForCausalLM, LSTMLMConfig

    torch.manual_seed(seed)
    return LSTMForCausalLM(LSTMLMConfig(vocab_size=vocab_size, embedding_size=8, hidden_size=8, num_layers=2,
                                        init_range=0.3))


def token_stream(n: int, vocab: int = 64, seed: int = 0) -> torch.Tensor:
    """A learnable token stream: each token mostly follows from the one before (so a carried state matters)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.empty(n, dtype=torch.long)
    ids[0] = 1
    noise = torch.randint(0, vocab, (n,), generator=g)
    keep = torch.rand(n, generator=g) < 0.7
    for i in range(1, n):
        ids[i] = (3 * ids[i - 1] + 1) % vocab if keep[i] else noise[i]
    return ids


def token_streams(num_streams: int = 8, seq_len: int = 6, positions: int = 6):
    """``LMStreams`` of ``token_stream``: ``positions`` steps of ``num_streams`` streams."""
    from hf_largebatch.data.text import LMStreams

    return LMStreams(token_stream(num_streams * positions * seq_len + 1), num_streams, seq_len)


def token_dataset(n: int, seq_len: int, vocab: int, num_labels: int | None, seed: int = 0) -> DictDataset:
    """Token sequences of varied length (right-padded): what makes per-micro-batch means differ from the
    token-level mean. ``num_labels=None`` gives LM labels (-100 on padding), else one class per sequence."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, seq_len), generator=g)
    lengths = torch.randint(3, seq_len + 1, (n,), generator=g)
    mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    if num_labels is None:
        labels = ids.masked_fill(mask == 0, -100)
    else:
        labels = torch.randint(0, num_labels, (n,), generator=g)
    return DictDataset(input_ids=ids, attention_mask=mask, labels=labels)


def single_thread():
    """Tiny models gain nothing from intra-op threads, and OpenMP spinning against other processes on a small CPU
    box slows each step 10-100x: run such tests on one thread (use as an autouse fixture)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def launch(script: str, args: list[str], nproc: int = 2, timeout: int = 600, env: dict | None = None):
    """Run ``script`` under ``torchrun --nproc_per_node nproc`` on CPU; raise with the output if it fails."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), full_env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(_free_port()), script, *args]
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-8000:]}")
    return proc


def launch_nodes(script: str, args: list[str], nodes: int = 2, timeout: int = 600):
    """Run ``script`` as ``nodes`` one-process "nodes" on this machine, as a multi-node launch does: one
    ``torchrun --nnodes N`` per node, meeting through a c10d rendezvous on 127.0.0.1; raise with the output if any
    fails."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false"}
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), full_env.get("PYTHONPATH", "")])
    endpoint = f"127.0.0.1:{_free_port()}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc_per_node", "1",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "hf_largebatch_test", script, *args]
    procs = [subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
             for _ in range(nodes)]
    outputs = [proc.communicate(timeout=timeout) for proc in procs]
    for proc, (out, err) in zip(procs, outputs):
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-4000:]}\n{err[-8000:]}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_rank_results(out_dir, nproc: int = 2) -> list[dict]:
    return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(nproc)]


#: marks of a test case that needs CUDA (``pytest -m gpu`` selects them; skipped on CPU)
ON_CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def flat_params(model) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()]).cpu().numpy()


def use_cpu_grad_scaler(trainer, init_scale: float = 2.0 ** 16):
    """fp16 mixed precision with its GradScaler, on CPU. accelerate builds the scaler (and turns on native autocast)
    only on an accelerator; for a trainer made with ``fp16=True, use_cpu=True`` this turns on the same machinery:
    fp16 autocast on CPU and a real ``torch.amp.GradScaler`` (not a mock: the loss is scaled, the gradients carry
    the scale, clipping unscales them, overflowed steps are skipped and the scale halves, as on CUDA)."""
    assert trainer.accelerator.mixed_precision == "fp16", "make the trainer with fp16=True"
    trainer.accelerator.native_amp = True
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return trainer


def event_trace_class():
    """An ``Algorithm`` that records the names of the events of the first two optimizer steps, in order (repeats of
    the same event in a row, e.g. one ``on_local_gradient`` per parameter, recorded once)."""
    from hf_largebatch import Algorithm

    class EventTrace(Algorithm):
        name = "event_trace"

        def __init__(self):
            self.events: list[str] = []
            self._steps_begun = 0

        def _add(self, event):
            if self._steps_begun <= 2 and (not self.events or self.events[-1] != event):
                self.events.append(event)

        def on_step_begin(self, args, state, control, **kwargs):
            self._steps_begun += 1
            self._add("on_step_begin")

        def on_micro_batch_end(self, args, state, control, *, micro_step, num_micro_batches, **kwargs):
            self._add(f"on_micro_batch_end[{micro_step}/{num_micro_batches}]")

        def lr_factor(self) -> float:
            self._add("lr_factor")
            return 1.0

        def gradient_sync_context(self, model, accelerator):
            self._add("gradient_sync_context")

    # every event but the owned ones (answering those would make the trace their owner and change the run)
    for event in ("on_setup", "on_train_begin", "on_epoch_position", "on_train_step_begin", "on_local_gradient",
                  "on_reduced_gradients", "on_step_loss", "on_before_update", "on_lr_applied", "on_substep_end",
                  "on_pre_optimizer_step", "on_optimizer_step", "on_step_end"):
        setattr(EventTrace, event, lambda self, args, state, control, _e=event, **kw: self._add(_e))
    return EventTrace


def conadv_batch(algorithm, model, inputs, step: int = 0, shifts_labels: bool = False):
    """``(batch, context)`` of ConAdv's ``transform_micro_batch`` for the last micro-batch of optimizer step
    ``step`` (seed 0, rank 0), outside a trainer."""
    from types import SimpleNamespace

    from hf_largebatch.core.step import StepContext

    micro_batch = algorithm.transform_micro_batch(
        SimpleNamespace(seed=0, process_index=0), SimpleNamespace(global_step=step), None,
        step=StepContext(shifts_labels=shifts_labels), model=model, inputs=inputs)
    return micro_batch.inputs, micro_batch.context
