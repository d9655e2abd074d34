"""Translation: the Multi30k loader and tokenizer, LargeBatchSeq2SeqTrainer / LargeBatchSeq2SeqArguments, and the
recipe end to end on real data (smoke, BLEU recomputed from its generations, fine-tuning a saved model, 2-process
DDP evaluation, missing data)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from transformers import (AutoModelForSeq2SeqLM, AutoTokenizer, DataCollatorForSeq2Seq, HfArgumentParser,
                          MarianConfig, MarianMTModel, Seq2SeqTrainingArguments)

from hf_largebatch import LargeBatchArguments
from hf_largebatch.data import DATA_ENV
from hf_largebatch.data.translation import SPECIAL_TOKENS, load_multi30k, load_pairs, multi30k_tokenizer
from hf_largebatch.core.seq2seq_trainer import LargeBatchSeq2SeqArguments, LargeBatchSeq2SeqTrainer
from helpers import REPO, launch

RECIPE = REPO / "recipes" / "translation.py"
SUBPROCESS_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                  "TOKENIZERS_PARALLELISM": "false"}
# CI-sized recipe runs: the tiny preset, a 2k vocabulary, short sentences (generation stops at 33 tokens).
SMALL_RUN = ["--preset", "tiny", "--max_source_length", "32", "--max_target_length", "32", "--disable_tqdm", "true",
             "--report_to", "none", "--seed", "0"]


@pytest.fixture(autouse=True)
def one_cpu_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    tokenizer = multi30k_tokenizer(vocab_size=2000)
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(path)
    return path


def import_recipe(monkeypatch):
    spec = importlib.util.spec_from_file_location("translation_recipe", RECIPE)
    recipe = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, recipe)  # dataclasses look their module up
    spec.loader.exec_module(recipe)
    return recipe


def run_recipe(args, env=None):
    full_env = {**os.environ, **SUBPROCESS_ENV, **(env or {})}
    proc = subprocess.run([sys.executable, str(RECIPE), *map(str, args)], env=full_env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"recipe failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def read_summary(out):
    return json.loads((out / "summary.json").read_text())


def assert_bleu_matches_generations(out, summary, references):
    import sacrebleu

    bleu = summary["metrics"]["eval_bleu"]
    assert math.isfinite(bleu) and bleu >= 0
    hypotheses = (out / summary["generations_file"]).read_text(encoding="utf-8").splitlines()
    assert len(hypotheses) == len(references)
    assert bleu == pytest.approx(sacrebleu.corpus_bleu(hypotheses, [references]).score, abs=1e-9)


# ---------------------------------------------------------------------------------------------- data and tokenizer
def test_multi30k_splits_are_complete_and_aligned():
    sizes = {"train": 29000, "val": 1014, "test_2016_flickr": 1000}
    for split, n in sizes.items():
        en, de = load_pairs(split, "en", "de")
        assert len(en) == len(de) == n
        assert all(s.strip() for s in en) and all(s.strip() for s in de)
    en, de = load_pairs("train", "en", "de", max_samples=3)
    assert en[0] == "Two young, White males are outside near many bushes."
    assert de[0] == "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche."
    de_en = load_pairs("val", "de", "en", max_samples=5)  # the other direction swaps the columns
    assert de_en == tuple(reversed(load_pairs("val", "en", "de", max_samples=5)))
    ds = load_multi30k(("val", "test_2016_flickr"))
    assert ds["val"].num_rows == 1014 and ds["test_2016_flickr"].num_rows == 1000
    assert ds["val"][0] == {"source": load_pairs("val")[0][0], "target": load_pairs("val")[1][0]}


def test_tokenizer_round_trips_and_reloads(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert len(tokenizer) == 2000
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == \
        (0, 1, 2, 3)
    for sentence in ("Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche.",
                     "A little girl climbing into a wooden playhouse."):
        ids = tokenizer(sentence).input_ids
        assert ids[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == sentence
    labels = tokenizer(text_target=["Ein Hund läuft."]).input_ids[0]
    assert labels[-1] == tokenizer.eos_token_id


# ---------------------------------------------------------------------------------------------- trainer and arguments
def test_seq2seq_arguments_compose_with_hf_argument_parser(tmp_path):
    assert issubclass(LargeBatchSeq2SeqArguments, LargeBatchArguments)
    assert issubclass(LargeBatchSeq2SeqArguments, Seq2SeqTrainingArguments)
    parser = HfArgumentParser(LargeBatchSeq2SeqArguments)
    (args,) = parser.parse_args_into_dataclasses(args=[
        "--output_dir", str(tmp_path), "--use_cpu", "--predict_with_generate", "--generation_num_beams", "3",
        "--generation_max_length", "40", "--per_device_train_batch_size", "64", "--lr_scaling", "legw",
        "--base_batch_size", "16", "--legw_base_warmup_epochs", "0.5", "--loss_normalization", "tokens"])
    assert args.predict_with_generate and args.generation_num_beams == 3 and args.generation_max_length == 40
    assert (args.lr_scaling, args.base_batch_size, args.legw_base_warmup_epochs) == ("legw", 16, 0.5)
    assert args.loss_normalization == "tokens" and args.per_device_train_batch_size == 64
    assert json.loads(args.to_json_string())["generation_num_beams"] == 3
    with pytest.raises(ValueError, match="base_batch_size"):  # LargeBatchArguments' checks still run
        parser.parse_args_into_dataclasses(args=["--output_dir", str(tmp_path), "--use_cpu", "--lr_scaling",
                                                 "sqrt"])


def tiny_marian(tokenizer, seed=0, **overrides):
    torch.manual_seed(seed)
    config = dict(vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1,
                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                  max_position_embeddings=64, dropout=0.0, scale_embedding=True, pad_token_id=0, eos_token_id=3,
                  bos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=3)
    return MarianMTModel(MarianConfig(**{**config, **overrides}))


def test_token_loss_is_the_marian_loss(tmp_path, tokenizer_dir):
    """On one micro-batch (real sentences of different lengths, labels padded with -100, not shifted) the trainer's
    token-normalised loss and its gradient are the model's own mean cross-entropy."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = tiny_marian(tokenizer)
    sources, targets = load_pairs("val", max_samples=8)
    features = [{"input_ids": s, "attention_mask": [1] * len(s), "labels": t} for s, t in
                zip(tokenizer(sources).input_ids, tokenizer(text_target=targets).input_ids)]
    batch = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100)(features)
    assert (batch["labels"] == -100).any()
    args = LargeBatchSeq2SeqArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[],
                                      per_device_train_batch_size=8)
    trainer = LargeBatchSeq2SeqTrainer(model=model, args=args, processing_class=tokenizer)
    _, num_items = trainer.get_batch_samples(iter([batch]), 1, torch.device("cpu"))
    assert int(num_items) == int((batch["labels"] != -100).sum())
    model.train()
    ours = trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items)
    reference = model(**batch).loss
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    params = [p for p in model.parameters() if p.requires_grad]
    for g_ours, g_ref in zip(torch.autograd.grad(ours, params, allow_unused=True),
                             torch.autograd.grad(reference, params, allow_unused=True)):
        if g_ref is not None:
            torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------- the recipe
def test_bleu_pairs_generations_with_references_in_any_order(tmp_path, tokenizer_dir, monkeypatch):
    """Evaluation order is not the dataset's under group_by_length or several ranks: generations are paired with
    their references through their labels, written in dataset order; lost or repeated predictions are errors."""
    import numpy as np
    from transformers import EvalPrediction

    recipe = import_recipe(monkeypatch)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    data_args = recipe.DataArguments()
    split = recipe.make_split("val", tokenizer, data_args, 12, tmp_path / "generations.txt")
    width = max(len(t) for t in split.labels) + 3
    labels = np.full((12, width), -100)
    preds = np.full((12, width), tokenizer.pad_token_id)
    for i, ids in enumerate(split.labels):
        labels[i, :len(ids)] = ids
        preds[i, 1:len(ids) + 1] = ids  # a perfect translation after the decoder start token
    preds[:, 0] = tokenizer.bos_token_id
    bleu = recipe.Bleu(tokenizer, write=True)
    bleu.split = split
    perm = np.random.default_rng(0).permutation(12)
    metrics = bleu(EvalPrediction(predictions=preds[perm], label_ids=labels[perm]))
    assert metrics["bleu"] == pytest.approx(100.0)
    assert (tmp_path / "generations.txt").read_text(encoding="utf-8").splitlines() == split.references
    preds[3] = preds[4]  # one wrong generation: BLEU drops, the others stay paired
    assert bleu(EvalPrediction(predictions=preds[perm], label_ids=labels[perm]))["bleu"] < 100
    repeated = np.concatenate([perm[:-1], perm[:1]])  # one sentence lost, another twice
    with pytest.raises(RuntimeError, match="match no remaining sentence"):
        bleu(EvalPrediction(predictions=preds[repeated], label_ids=labels[repeated]))
    with pytest.raises(RuntimeError, match="lost or repeated"):
        bleu(EvalPrediction(predictions=preds[:11], label_ids=labels[:11]))


def test_recipe_smoke_bleu_in_logs_summary_and_generations(tmp_path):
    out = tmp_path / "run"
    proc = run_recipe(["--output_dir", out, *SMALL_RUN, "--vocab_size", "2000", "--max_train_samples", "512",
                       "--max_eval_samples", "64", "--per_device_train_batch_size", "32", "--max_steps", "30",
                       "--learning_rate", "2e-3", "--warmup_steps", "6", "--logging_steps", "10",
                       "--eval_strategy", "steps", "--eval_steps", "15"])
    summary = read_summary(out)
    assert summary["task"] == "translation" and summary["dataset"] == "multi30k"
    assert summary["metric_name"] == "eval_bleu" and summary["optimizer_steps"] == 30
    assert (summary["train_examples"], summary["eval_examples"]) == (512, 64)
    evals = [e for e in summary["log_history"] if "eval_loss" in e]
    assert [e["step"] for e in evals] == [15, 30]  # eval_steps; the one at the last step is the final evaluation
    assert all(math.isfinite(e["eval_bleu"]) and e["eval_bleu"] >= 0 for e in evals)
    assert evals[-1]["eval_bleu"] == summary["metrics"]["eval_bleu"]
    assert f"eval_bleu = {summary['metrics']['eval_bleu']:.2f}" in proc.stdout
    assert_bleu_matches_generations(out, summary, load_pairs("val", max_samples=64)[1])
    # the output folder is a model + tokenizer that reload with from_pretrained
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSeq2SeqLM.from_pretrained(out)
    assert len(tokenizer) == 2000 and model.config.d_model == 128 and model.config.encoder_layers == 2
    assert summary["num_parameters"] == sum(p.numel() for p in model.parameters())


def test_recipe_fine_tunes_a_saved_model(tmp_path, tokenizer_dir):
    """--model_name_or_path loads the architecture, weights and tokenizer of the folder (learning rate 0: the
    saved weights come back unchanged), then trains and evaluates as usual."""
    from safetensors.torch import load_file

    source = tmp_path / "pretrained"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tiny_marian(tokenizer, seed=1, d_model=48, dropout=0.1).save_pretrained(source)
    tokenizer.save_pretrained(source)
    out = tmp_path / "finetuned"
    run_recipe(["--output_dir", out, *SMALL_RUN, "--model_name_or_path", source, "--max_train_samples", "64",
                "--max_eval_samples", "16", "--per_device_train_batch_size", "16", "--max_steps", "2",
                "--learning_rate", "0", "--weight_decay", "0"])
    summary = read_summary(out)
    assert summary["model_name_or_path"] == str(source) and summary["preset"] is None
    assert summary["tokenizer"] == str(source) and summary["vocab_size"] == 2000
    assert summary["model"]["d_model"] == 48 and summary["optimizer_steps"] == 2
    before, after = load_file(source / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == tokenizer.get_vocab()
    assert_bleu_matches_generations(out, summary, load_pairs("val", max_samples=16)[1])


@pytest.mark.multiprocess
def test_recipe_ddp_two_ranks_evaluate_every_sentence_once(tmp_path):
    """2 ranks (gloo): the tokenizer is trained once and shared, and 50 eval sentences on 2 x 16 give exactly
    50 generations in order (transformers' Seq2SeqTrainer would hand compute_metrics 64)."""
    out = tmp_path / "ddp"
    launch(str(RECIPE), ["--output_dir", str(out), *SMALL_RUN, "--use_cpu", "--vocab_size", "2000",
                         "--max_train_samples", "256", "--max_eval_samples", "50", "--per_device_train_batch_size",
                         "16", "--per_device_eval_batch_size", "16", "--max_steps", "4", "--logging_steps", "2"])
    summary = read_summary(out)
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 32
    assert summary["eval_examples"] == 50
    assert_bleu_matches_generations(out, summary, load_pairs("val", max_samples=50)[1])


def test_missing_data_names_the_path_and_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        load_pairs("train")
    assert str(tmp_path / "multi30k") in str(err.value) and DATA_ENV in str(err.value)
    (tmp_path / "multi30k").mkdir()
    (tmp_path / "multi30k" / "val.en.gz").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"val\.de\.gz") as err:
        load_pairs("val")
    assert DATA_ENV in str(err.value)
    # the recipe fails the same way, before it trains a tokenizer or builds a model
    recipe = import_recipe(monkeypatch)
    with pytest.raises(FileNotFoundError) as err:
        recipe.main(["--output_dir", str(tmp_path / "out"), "--use_cpu", "--report_to", "none"])
    assert str(tmp_path / "multi30k") in str(err.value) and DATA_ENV in str(err.value)
    assert not (tmp_path / "out").exists()
