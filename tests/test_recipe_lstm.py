"""The LSTM language model (hf_largebatch.models), the offline text loaders (hf_largebatch.data.text) and
recipes/language_modeling_lstm.py on real PTB: loader counts against the MANIFEST, chunking, the model's HF
conventions (save/load, Auto classes, shifted labels matching LargeBatchTrainer's token normalisation), a
single-process smoke run, a 2-process DeepSpeed ZeRO-2 run, fine-tuning a saved checkpoint, and the error when the
data is missing."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from test_stateful_lm import hand_stream_losses
from helpers import REPO, launch
from hf_largebatch import LargeBatchArguments, LargeBatchTrainer
from hf_largebatch.core import loss as loss_rules
from hf_largebatch.data import DATA_ENV
from hf_largebatch.data import text as text_data
from hf_largebatch.models import LSTMForCausalLM, LSTMLMConfig

RECIPE = REPO / "recipes" / "language_modeling_lstm.py"
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
# A 1x32 LSTM on 640 PTB examples of 35 tokens; Adam makes a few steps visibly learn (the unigram distribution).
SMALL = ["--preset", "tiny", "--embedding_size", "32", "--hidden_size", "32", "--seq_len", "35",
         "--optim", "adamw_torch", "--learning_rate", "0.01", "--lr_scheduler_type", "constant",
         "--max_grad_norm", "5", "--per_device_eval_batch_size", "64", "--max_train_samples", "640",
         "--max_eval_samples", "128", "--logging_steps", "5", "--report_to", "none", "--save_strategy", "no",
         "--disable_tqdm", "True", "--seed", "0"]


def _ptb_available() -> bool:
    try:
        text_data.dataset_dir("ptb", text_data.PTB_FILES)
        return True
    except FileNotFoundError:
        return False


needs_ptb = pytest.mark.skipif(not _ptb_available(), reason=f"PTB not under ${DATA_ENV}")


def run_recipe(args, env=None, check=True):
    proc = subprocess.run([sys.executable, str(RECIPE), *args], env={**os.environ, **ENV, **(env or {})},
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"recipe failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def load_recipe_module():
    spec = importlib.util.spec_from_file_location("language_modeling_lstm_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def read_summary(out_dir) -> dict:
    return json.loads((out_dir / "summary.json").read_text())


def eval_logs(summary) -> list[dict]:
    return [e for e in summary["log_history"] if "eval_loss" in e]


@pytest.fixture(scope="module")
def ptb():
    return text_data.load_ptb()


# ------------------------------------------------------------------------------------------------ (a) data
@needs_ptb
def test_ptb_loader_matches_manifest(ptb):
    assert len(ptb.vocab) == 10000 and "<unk>" in ptb.vocab and "<eos>" in ptb.vocab
    # MANIFEST.md: tokens including one <eos> per line, and the line counts.
    assert {s: ptb.num_tokens(s) for s in ptb.splits} == {"train": 929589, "validation": 73760, "test": 82430}
    eos = ptb.vocab.stoi["<eos>"]
    assert {s: int(ids.eq(eos).sum()) for s, ids in ptb.splits.items()} == {
        "train": 42068, "validation": 3370, "test": 3761}
    assert ptb.vocab.decode(ptb.splits["train"][:3]) == ["aer", "banknote", "berlitz"]
    assert ptb.vocab.decode(ptb.splits["validation"][-1:]) == ["<eos>"]
    # Every valid/test word is a training word (Mikolov's PTB has no OOV beyond its own <unk>): nothing was mapped.
    for split in ("valid", "test"):
        with text_data._open_text(text_data.dataset_dir("ptb") / f"ptb.{split}.txt.gz") as f:
            assert set(text_data.tokenize_lines(f)) <= set(ptb.vocab.itos)


@needs_ptb
def test_ptb_chunks_overlap_by_one_and_predict_every_token_once(ptb):
    seq_len = 35
    train = ptb.chunks("train", seq_len)
    ids = ptb.splits["train"]
    assert len(train) == (929589 - 1) // seq_len == 26559
    first, second, last = train[0], train[1], train[len(train) - 1]
    assert first["input_ids"].shape == (seq_len + 1,) and torch.equal(first["labels"], first["input_ids"])
    assert torch.equal(first["input_ids"], ids[:36]) and torch.equal(second["input_ids"], ids[35:71])
    assert first["input_ids"][-1] == second["input_ids"][0]
    assert torch.equal(last["input_ids"], ids[(len(train) - 1) * 35: len(train) * 35 + 1])
    # Predicted tokens (positions 1..seq_len of each chunk), concatenated, are the stream's tokens 1..n*L.
    predicted = torch.cat([train[i]["labels"][1:] for i in range(len(train))])
    assert torch.equal(predicted, ids[1: len(train) * seq_len + 1])
    assert train.num_predicted_tokens == len(train) * seq_len
    assert len(ptb.chunks("validation", seq_len, max_samples=10)) == 10
    with pytest.raises(IndexError):
        train[len(train)]


def test_chunks_of_a_short_stream():
    chunks = text_data.LMChunks(torch.arange(11), seq_len=3)
    assert [c["input_ids"].tolist() for c in chunks] == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert len(text_data.LMChunks(torch.arange(3), seq_len=3)) == 0


def test_local_text_folder_file_and_datasets(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "train.txt").write_text("the cat sat\nthe dog sat\n\nthe cat ran\n")
    (tmp_path / "corpus" / "valid.txt").write_text("the bird sat\n")
    corpus = text_data.load_lm_corpus(str(tmp_path / "corpus"))
    assert corpus.vocab.itos[:4] == ["<unk>", "<eos>", "the", "cat"]  # <unk> added, then by count (ties a-z)
    assert corpus.num_tokens("train") == 12 and set(corpus.splits) == {"train", "validation"}
    assert corpus.vocab.decode(corpus.splits["validation"]) == ["the", "<unk>", "sat", "<eos>"]

    from datasets import Dataset, DatasetDict

    ds = DatasetDict({"train": Dataset.from_dict({"text": ["the cat sat", "the dog sat"]}),
                      "validation": Dataset.from_dict({"text": ["the cat"]})})
    ds.save_to_disk(str(tmp_path / "saved"))
    corpus = text_data.load_lm_corpus(str(tmp_path / "saved"))
    assert corpus.num_tokens("train") == 8 and corpus.num_tokens("validation") == 3

    (tmp_path / "one.txt").write_text("abcd\n" * 10)
    corpus = text_data.load_lm_corpus(str(tmp_path / "one.txt"), level="char")
    assert len(corpus.vocab) == 5 and corpus.num_tokens("train") + corpus.num_tokens("validation") == 50

    vocab_path = tmp_path / "vocab.json"
    corpus.vocab.save(vocab_path)
    assert text_data.Vocabulary.load(vocab_path).itos == corpus.vocab.itos


# ------------------------------------------------------------------------------------------------ (b) model
def _tiny_config(**kw):
    return LSTMLMConfig(**{"vocab_size": 50, "embedding_size": 12, "hidden_size": 12, "num_layers": 2,
                           "dropout": 0.3, **kw})


def test_model_save_load_round_trip_and_auto_classes(tmp_path):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from hf_largebatch.models import LSTMModel

    torch.manual_seed(0)
    model = LSTMForCausalLM(_tiny_config()).eval()
    ids = torch.randint(0, 50, (3, 9))
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "lstm_lm"

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(loaded) is LSTMForCausalLM and loaded.config.dropout == 0.3
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    config = AutoConfig.from_pretrained(tmp_path / "m")
    assert type(config) is LSTMLMConfig and type(AutoModelForCausalLM.from_config(config)) is LSTMForCausalLM
    base = AutoModel.from_config(config)
    assert type(base) is LSTMModel and base(input_ids=ids).last_hidden_state.shape == (3, 9, 12)

    tied = LSTMForCausalLM(_tiny_config(tie_word_embeddings=True))
    tied.save_pretrained(tmp_path / "tied")
    tied_loaded = LSTMForCausalLM.from_pretrained(tmp_path / "tied")
    assert tied_loaded.lm_head.weight is tied_loaded.model.embed_tokens.weight
    assert torch.equal(tied_loaded.lm_head.weight, tied.lm_head.weight)
    with pytest.raises(Exception, match="embedding_size == hidden_size"):
        LSTMLMConfig(embedding_size=8, hidden_size=16, tie_word_embeddings=True)


def test_model_shifts_labels_like_large_batch_trainer(tmp_path):
    torch.manual_seed(0)
    model = LSTMForCausalLM(_tiny_config()).eval()
    ids = torch.randint(0, 50, (4, 10))
    labels = ids.clone()
    labels[0, 6:] = -100  # right padding
    mask = labels.ne(-100).long()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)

    # The model's own loss: mean CE of labels[:, 1:] predicted from logits[:, :-1], -100 ignored.
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)

    # LargeBatchTrainer's token normalisation shifts the same way, so its recomputed loss is the model's.
    assert model.loss_type == "ForCausalLM" and loss_rules.shifts_labels(model)
    trainer = LargeBatchTrainer(model=model, args=LargeBatchArguments(output_dir=str(tmp_path), use_cpu=True,
                                                                      report_to=[]))
    assert trainer._shifts_labels
    summed = loss_rules.summed_token_cross_entropy(out.logits, labels, trainer._shifts_labels)
    count = loss_rules.count_label_tokens(labels, trainer._shifts_labels)
    assert int(count) == 4 * 9 - 4
    torch.testing.assert_close(summed / count, out.loss, rtol=1e-6, atol=1e-6)

    # Right padding cannot change the outputs at real positions; left padding is refused.
    alone = model(input_ids=ids[:1, :6]).logits
    torch.testing.assert_close(out.logits[:1, :6], alone)
    with pytest.raises(ValueError, match="right padding"):
        model(input_ids=ids, attention_mask=mask.flip(1))


def test_model_carries_state_and_initialises_uniformly():
    torch.manual_seed(0)
    model = LSTMForCausalLM(_tiny_config(dropout=0.0, init_range=0.05)).eval()
    assert all(p.abs().max() <= 0.05 for p in model.parameters())
    ids = torch.randint(0, 50, (2, 12))
    whole = model(input_ids=ids).logits
    first = model(input_ids=ids[:, :5], return_state=True)
    second = model(input_ids=ids[:, 5:], state=first.state)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), whole, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ (c) recipe smoke
@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lstm") / "smoke"
    proc = run_recipe([*SMALL, "--output_dir", str(out), "--dataset", "ptb", "--per_device_train_batch_size",
                       "16", "--max_steps", "20", "--eval_on_start", "True"])
    return out, proc


@needs_ptb
def test_recipe_ptb_single_process(smoke_run, ptb):
    out, proc = smoke_run
    summary = read_summary(out)
    assert summary["task"] == "language_modeling" and summary["dataset"] == "ptb"
    assert summary["metric_name"] == "eval_perplexity" and summary["vocab_size"] == 10000
    assert summary["world_size"] == 1 and summary["global_batch_size"] == 16 and summary["optimizer_steps"] == 20
    assert summary["train_examples"] == 640 and summary["eval_examples"] == 128

    metrics = summary["metrics"]
    ppl = metrics["eval_perplexity"]
    assert math.isfinite(ppl) and ppl == pytest.approx(math.exp(metrics["eval_loss"]), rel=1e-12)
    start, final = eval_logs(summary)
    assert start["step"] == 0 and final["step"] == 20
    assert final["eval_perplexity"] == ppl and start["eval_perplexity"] == pytest.approx(
        math.exp(start["eval_loss"]))
    assert ppl < 0.5 * start["eval_perplexity"], "20 Adam steps should at least learn the unigram distribution"
    assert f"eval_perplexity = {ppl:.3f}" in proc.stdout

    # The reported perplexity is exactly exp(mean token CE) over the 128 x 35 predicted validation tokens, read as
    # 64 streams of 2 positions with the state carried (the recipe's default, stateful evaluation)
    model = LSTMForCausalLM.from_pretrained(out)
    total, count = hand_stream_losses(model, ptb.streams("validation", 64, 35, 2))
    assert count == 128 * 35 and math.exp(total / count) == pytest.approx(ppl, rel=1e-5)
    assert text_data.Vocabulary.load(out / "vocab.json").itos == ptb.vocab.itos


def test_zaremba_presets_default_to_zarembas_training_unless_a_flag_is_given():
    recipe = load_recipe_module()
    argv = recipe.with_preset_training(["--output_dir", "x", "--learning_rate=10"])
    parser = recipe.HfArgumentParser((recipe.ModelArguments, recipe.DataArguments, recipe.LargeBatchArguments))
    model_args, data_args, args = parser.parse_args_into_dataclasses(args=[*argv, "--use_cpu"])
    assert model_args.preset == "zaremba_small" and data_args.seq_len == 20 and data_args.stateful
    assert args.learning_rate == 10  # given: kept
    assert (args.max_grad_norm, args.num_train_epochs, args.per_device_train_batch_size) == (0.25, 13, 20)
    assert args.lr_decay_epochs == [4, 5, 6, 7, 8, 9, 10, 11, 12] and args.lr_decay_factor == 0.5
    assert recipe.with_preset_training(["--preset", "tiny"]) == ["--preset", "tiny"]
    medium = recipe.with_preset_training(["--preset", "zaremba_medium", "--max_steps", "5"])
    assert "--lr_decay_epochs" not in medium and medium[medium.index("--seq_len") + 1] == "35"


@needs_ptb
def test_stateless_mode_reads_shuffled_chunks(ptb):
    recipe = load_recipe_module()
    args = recipe.LargeBatchArguments(output_dir="x", per_device_train_batch_size=4, use_cpu=True)
    train, valid = recipe.lm_datasets(ptb, recipe.DataArguments(stateful=False, max_train_samples=40), args)
    assert isinstance(train, text_data.LMChunks) and len(train) == 40 and args.train_sampling_strategy == "random"
    train, valid = recipe.lm_datasets(ptb, recipe.DataArguments(max_train_samples=40), args)
    assert isinstance(train, text_data.LMStreams) and train.num_streams == 4 and len(train) == 40
    assert args.train_sampling_strategy == "sequential" and valid.num_streams == args.per_device_eval_batch_size


# ------------------------------------------------------------------------------------------------ (e) fine-tuning
@needs_ptb
def test_recipe_fine_tunes_a_saved_checkpoint(smoke_run, tmp_path):
    saved, _ = smoke_run
    saved_ppl = read_summary(saved)["metrics"]["eval_perplexity"]
    out = tmp_path / "ft"
    run_recipe([*SMALL, "--output_dir", str(out), "--model_name_or_path", str(saved), "--dataset", "ptb",
                "--per_device_train_batch_size", "16", "--max_steps", "10", "--eval_on_start", "True",
                "--seed", "1"])
    summary = read_summary(out)
    assert summary["model_name_or_path"] == str(saved)
    start, final = eval_logs(summary)
    # Before any update the model is the saved one (weights and vocabulary), not a fresh initialisation.
    assert start["eval_perplexity"] == pytest.approx(saved_ppl, rel=1e-5)
    assert final["eval_perplexity"] < start["eval_perplexity"]
    assert summary["model"]["hidden_size"] == 32

    # Size flags must agree with the checkpoint (SMALL repeats its sizes); only the dropout may be changed.
    recipe = load_recipe_module()
    with pytest.raises(ValueError, match="--hidden_size 64"):
        recipe.build_model(recipe.ModelArguments(model_name_or_path=str(saved), hidden_size=64), 10000)
    model = recipe.build_model(recipe.ModelArguments(model_name_or_path=str(saved), dropout=0.25), 10000)
    assert model.config.dropout == 0.25 and model.config.hidden_size == 32


# ------------------------------------------------------------------------------------------------ (d) DeepSpeed
@needs_ptb
@pytest.mark.multiprocess
def test_recipe_deepspeed_zero2_two_processes(tmp_path):
    out = tmp_path / "ds"
    args = [*SMALL, "--output_dir", str(out), "--dataset", "ptb", "--per_device_train_batch_size", "8",
            "--max_steps", "20", "--eval_on_start", "True", "--deepspeed", "recipes/configs/ds_zero2.json"]
    proc = launch(str(RECIPE.relative_to(REPO)), args)
    summary = read_summary(out)
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 16
    assert summary["optimizer_steps"] == 20 and summary["examples_seen"] == 320
    start, final = eval_logs(summary)
    ppl = summary["metrics"]["eval_perplexity"]
    assert final["eval_perplexity"] == ppl and ppl == pytest.approx(math.exp(summary["metrics"]["eval_loss"]))
    assert ppl < 0.5 * start["eval_perplexity"], "the 2-process ZeRO-2 run did not train"
    assert proc.stdout.count("eval_perplexity = ") == 1  # printed by rank 0 only


# ------------------------------------------------------------------------------------------------ (f) missing data
def test_missing_data_names_path_and_variable(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(DATA_ENV, str(empty))
    with pytest.raises(FileNotFoundError, match=DATA_ENV) as err:
        text_data.load_ptb()
    assert str(empty / "ptb") in str(err.value)

    proc = run_recipe(["--output_dir", str(tmp_path / "out"), "--dataset", "ptb", "--max_steps", "1",
                       "--report_to", "none"], env={DATA_ENV: str(empty)}, check=False)
    assert proc.returncode != 0
    assert "FileNotFoundError" in proc.stderr and str(empty / "ptb") in proc.stderr and DATA_ENV in proc.stderr
    with pytest.raises(FileNotFoundError, match=DATA_ENV) as err:
        text_data.load_lm_corpus("tinyshakespeare-word")
    assert str(empty / "tinyshakespeare") in str(err.value)


# ------------------------------------------------------------------------------------------------ (f) ConAdv
@needs_ptb
def test_recipe_conadv_on_embeddings(tmp_path):
    """ConAdv on a text model: the attack perturbs the LSTM's input embeddings; the final model is evaluated
    clean and under the same attack (its perplexity must be the worse one)."""
    out = tmp_path / "out"
    run_recipe([*SMALL, "--output_dir", str(out), "--use_cpu", "--per_device_train_batch_size", "32",
                "--max_steps", "10", "--adversarial", "conadv", "--adversarial_args", "epsilon=0.05"])
    summary = read_summary(out)
    metrics = summary["metrics"]
    assert metrics["eval_adv_perplexity"] == pytest.approx(math.exp(metrics["eval_adv_loss"]), rel=1e-9)
    assert metrics["eval_adv_perplexity"] > metrics["eval_perplexity"]
    attack_losses = [e["adversarial_attack_loss"] for e in summary["log_history"] if "adversarial_attack_loss" in e]
    assert len(attack_losses) == 2 and all(math.isfinite(v) for v in attack_losses)
