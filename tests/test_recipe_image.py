"""recipes/image_classification.py and hf_largebatch.data.images on the real offline data (Fashion-MNIST, CIFAR-10
JPEG): a single-process smoke run, the CIFAR-10 decoder and its cache, a ``datasets`` image folder, a 2-process DDP
run, fine-tuning a saved checkpoint, and the error when the data is missing."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import REPO, launch
from hf_largebatch.data import DATA_ENV, dataset_dir
from hf_largebatch.data import images as image_data

RECIPE = REPO / "recipes" / "image_classification.py"
TINY = ["--preset", "tiny", "--use_cpu", "--disable_tqdm", "True", "--seed", "0"]

def _available(name: str) -> bool:
    try:
        image_data.check_available(name)
        return True
    except FileNotFoundError:
        return False


fashion_mnist = pytest.mark.skipif(not _available("fashion_mnist"), reason=f"Fashion-MNIST not under ${DATA_ENV}")
cifar10 = pytest.mark.skipif(not _available("cifar10"), reason=f"CIFAR-10 JPEG not under ${DATA_ENV}")


def run_recipe(args, tmp_path, env=None, check=True):
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false", "HF_LARGEBATCH_CACHE": str(tmp_path / "cache"), **(env or {})}
    proc = subprocess.run([sys.executable, str(RECIPE), *args], env=full_env, capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"recipe failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def load_recipe_module():
    """The recipe as a module, to run ``main([...])`` in this process (saves a Python start-up)."""
    name = "image_classification_recipe"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, RECIPE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture
def one_thread():
    """In-process training with one intra-op thread, as the subprocesses run (OMP_NUM_THREADS=1): on a busy
    2-core machine two OpenMP threads are several times slower, not faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def read_summary(out_dir) -> dict:
    return json.loads((out_dir / "summary.json").read_text())


def eval_logs(summary) -> list[dict]:
    return [entry for entry in summary["log_history"] if "eval_accuracy" in entry]


# ------------------------------------------------------------------------------------------------ (a) smoke
@fashion_mnist
def test_recipe_fashion_mnist_single_process(tmp_path):
    out = tmp_path / "out"
    proc = run_recipe([*TINY, "--output_dir", str(out), "--dataset", "fashion_mnist", "--max_train_samples", "512",
                       "--max_eval_samples", "256", "--per_device_train_batch_size", "64",
                       # 256 = 2 x 100 + 56: the last, partial eval batch must not be dropped
                       "--per_device_eval_batch_size", "100", "--num_train_epochs", "1", "--logging_steps", "2"],
                      tmp_path)
    summary = read_summary(out)
    assert summary["task"] == "image_classification" and summary["dataset"] == "fashion_mnist"
    assert summary["metric_name"] == "eval_accuracy"
    assert summary["world_size"] == 1 and summary["global_batch_size"] == 64
    assert summary["optimizer_steps"] == 512 // 64 and summary["examples_seen"] == 512
    assert summary["train_examples"] == 512 and summary["eval_examples"] == 256
    accuracy = summary["metrics"]["eval_accuracy"]
    assert 0.0 <= accuracy <= 1.0
    assert summary["metrics"]["eval_examples"] == 256  # every eval example counted, drop_last notwithstanding
    (final_eval,) = eval_logs(summary)
    assert final_eval["eval_accuracy"] == accuracy and final_eval["step"] == 8
    losses = [e["loss"] for e in summary["log_history"] if "loss" in e]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert f"eval_accuracy = {accuracy:.4f}" in proc.stdout
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


# ------------------------------------------------------------------------------------------------ (b) loaders
@cifar10
def test_cifar10_decode_stats_and_cache(tmp_path, monkeypatch):
    # A private copy of the test tarball, so the cache key can be exercised by touching it.
    data = tmp_path / "data"
    (data / "cifar10-jpeg").mkdir(parents=True)
    source = dataset_dir("cifar10-jpeg") / "cifar10_jpeg_test.tar.gz"
    tarball = data / "cifar10-jpeg" / "cifar10_jpeg_test.tar.gz"
    shutil.copy(source, tarball)
    monkeypatch.setenv(DATA_ENV, str(data))
    monkeypatch.setenv(image_data.CACHE_ENV, str(tmp_path / "cache"))
    decodes = []
    real_decode = image_data._decode_cifar_tar
    monkeypatch.setattr(image_data, "_decode_cifar_tar", lambda *a, **k: decodes.append(a) or real_decode(*a, **k))

    test = image_data.load_cifar10("test")
    assert test.images.shape == (10_000, 32, 32, 3) and test.images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(test.labels), [1000] * 10)
    mean, std = image_data.channel_stats(test.images)
    # MANIFEST.md: decoded test set mean (0.494, 0.485, 0.450), std (0.245, 0.242, 0.261)
    np.testing.assert_allclose(mean, [0.494, 0.485, 0.450], atol=1.5e-3)
    np.testing.assert_allclose(std, [0.245, 0.242, 0.261], atol=1.5e-3)
    assert len(decodes) == 1

    again = image_data.load_cifar10("test")  # from the cache
    assert len(decodes) == 1
    np.testing.assert_array_equal(again.images, test.images)
    np.testing.assert_array_equal(again.labels, test.labels)
    assert sorted(p.name for p in (data / "cifar10-jpeg").iterdir()) == ["cifar10_jpeg_test.tar.gz"]
    assert list((tmp_path / "cache").rglob("*.npz"))

    os.utime(tarball, ns=(1_000_000_000, 1_000_000_000))  # a changed source is decoded again
    image_data.load_cifar10("test")
    assert len(decodes) == 2

    subset = image_data.load_cifar10("test", per_class=7)  # quick partial decode, never cached
    assert subset.images.shape == (70, 32, 32, 3)
    np.testing.assert_array_equal(np.bincount(subset.labels), [7] * 10)
    np.testing.assert_array_equal(subset.images[:7], test.images[:7])  # tarball order: by class, then name


@cifar10
def test_cifar10_train_subset_and_augmentation():
    train = image_data.load_cifar10("train", per_class=30)
    assert train.images.shape == (300, 32, 32, 3)
    np.testing.assert_array_equal(np.bincount(train.labels), [30] * 10)
    assert train.class_names[0] == "airplane" and train.class_names[9] == "truck"
    mean, _ = image_data.channel_stats(train.images)
    np.testing.assert_allclose(mean, [0.4913, 0.4821, 0.4465], atol=0.05)  # MANIFEST train mean, 300 images

    mean, std = [0.4913, 0.4821, 0.4465], [0.2452, 0.2428, 0.2606]
    plain = image_data.ImageClassificationDataset(train, mean, std)
    x = plain[5]["pixel_values"]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and plain[5]["labels"].dtype == torch.long
    expected = (torch.from_numpy(train.images[5]).permute(2, 0, 1).float() / 255 - torch.tensor(mean)[:, None, None]
                ) / torch.tensor(std)[:, None, None]
    torch.testing.assert_close(x, expected)

    # Every augmented image is a shifted (4-pixel zero padding) and maybe flipped copy of the original.
    aug = image_data.ImageClassificationDataset(train, mean, std, image_data.Augmentation(pad=4, flip=True))
    raw = torch.from_numpy(train.images[5]).permute(2, 0, 1)
    padded = torch.nn.functional.pad(raw, (4, 4, 4, 4))
    candidates = {(dy, dx, f): padded[:, dy:dy + 32, dx:dx + 32].flip(-1) if f else padded[:, dy:dy + 32, dx:dx + 32]
                  for dy in range(9) for dx in range(9) for f in (0, 1)}
    seen = set()
    torch.manual_seed(0)
    for _ in range(40):
        y = aug[5]["pixel_values"]
        match = [k for k, c in candidates.items()
                 if torch.allclose(y, (c.float() * plain.scale + plain.shift), atol=1e-5)]
        assert match, "augmented image is not a crop/flip of the original"
        seen.add(match[0])
    assert len(seen) > 10 and {k[2] for k in seen} == {0, 1}


@fashion_mnist
def test_fashion_mnist_splits():
    splits = image_data.load_image_splits("fashion_mnist")
    assert splits.train.images.shape == (60_000, 28, 28, 1) and splits.eval.images.shape == (10_000, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(splits.train.labels), [6000] * 10)
    assert splits.num_labels == 10 and splits.class_names[9] == "Ankle boot"
    np.testing.assert_allclose(splits.mean, [0.2860], atol=1e-3)
    np.testing.assert_allclose(splits.std, [0.3530], atol=1e-3)
    assert splits.augmentation.flip is False  # canonical orientation: no flips on Fashion-MNIST
    ds = image_data.ImageClassificationDataset(splits.eval.subset(2000), splits.mean, splits.std, num_channels=3)
    x = torch.stack([ds[i]["pixel_values"] for i in range(len(ds))])
    assert x.shape == (2000, 3, 28, 28)  # grayscale repeated for an RGB model
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05


def test_datasets_image_folder_through_the_recipe(tmp_path, one_thread):
    """Any `datasets` image dataset: a save_to_disk folder with `img` + ClassLabel `label`, end to end."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)

    def split(n):
        labels = rng.integers(0, 3, n)
        # class c: a bright square in the c-th third of the image, so the task is learnable
        arrays = rng.integers(0, 60, (n, 12, 12, 3)).astype(np.uint8)
        for i, c in enumerate(labels):
            arrays[i, :, 4 * c:4 * c + 4] = 220
        return datasets.Dataset.from_dict(
            {"img": [Image.fromarray(a) for a in arrays], "label": labels.tolist()},
            features=datasets.Features({"img": datasets.Image(),
                                        "label": datasets.ClassLabel(names=["left", "middle", "right"])}))

    path = tmp_path / "toy_images"
    datasets.DatasetDict({"train": split(96), "test": split(30)}).save_to_disk(str(path))
    splits = image_data.load_image_splits(str(path))
    assert splits.train.images.shape == (96, 12, 12, 3) and splits.eval.images.shape == (30, 12, 12, 3)
    assert splits.class_names == ["left", "middle", "right"] and splits.augmentation.pad == 2

    out = tmp_path / "out"
    summary = load_recipe_module().main(
        [*TINY, "--dataset", str(path), "--output_dir", str(out), "--per_device_train_batch_size", "32",
         "--num_train_epochs", "3", "--learning_rate", "0.05", "--report_to", "none"])
    assert summary["optimizer_steps"] == 9 and summary["model"]["num_labels"] == 3
    assert summary["metrics"]["eval_examples"] == 30 and 0 <= summary["metrics"]["eval_accuracy"] <= 1
    assert read_summary(out)["dataset"] == str(path)


def test_datasets_single_split_arrays_and_string_labels(tmp_path):
    """A bare `Dataset` (no test split: 10% held out), grayscale arrays in `image`, string labels, mixed sizes."""
    import datasets

    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (10, 10) if i % 3 else (12, 12)).astype(np.uint8) for i in range(50)]
    labels = [["cat", "ant", "bee"][i % 3] for i in range(50)]
    path = tmp_path / "flat"
    datasets.Dataset.from_dict({"image": images, "label": labels}).save_to_disk(str(path))
    with pytest.raises(ValueError, match="image_size"):
        image_data.load_image_splits(str(path))
    splits = image_data.load_image_splits(str(path), image_size=8)
    assert len(splits.train) == 45 and len(splits.eval) == 5
    assert splits.train.images.shape[1:] == (8, 8, 1) and splits.class_names == ["ant", "bee", "cat"]
    assert set(splits.train.labels.tolist()) <= {0, 1, 2} and len(splits.mean) == 1


# ------------------------------------------------------------------------------------------------ (c) DDP
@fashion_mnist
@pytest.mark.multiprocess
def test_recipe_ddp_two_processes(tmp_path):
    out = tmp_path / "out"
    launch(str(RECIPE), [*TINY, "--output_dir", str(out), "--max_train_samples", "1024", "--max_eval_samples", "250",
                         "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", "64",
                         "--num_train_epochs", "1", "--logging_steps", "4", "--no_augment"],
           env={"HF_LARGEBATCH_CACHE": str(tmp_path / "cache")})
    summary = read_summary(out)
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 64
    assert summary["optimizer_steps"] == 1024 // 64  # 2 ranks x 32: each rank sees half of every global batch
    assert summary["metrics"]["eval_examples"] == 250  # gathered from both ranks without the padding duplicates
    losses = [e["loss"] for e in summary["log_history"] if "loss" in e]
    assert len(losses) == 4 and losses[-1] < losses[0]  # it trained
    assert summary["metrics"]["eval_accuracy"] > 0.3  # 10 classes: chance is 0.1


# ------------------------------------------------------------------------------------------------ (d) fine-tune
def _checkpoint(path, num_labels, seed):
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    config = ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 24], depths=[1, 1],
                          layer_type="basic", num_labels=num_labels, downsample_in_first_stage=False)
    model = ResNetForImageClassification(config)
    model.save_pretrained(path)
    return model


def _embedder_weight(model_or_state):
    key = "resnet.embedder.embedder.convolution.weight"
    if isinstance(model_or_state, dict):
        return model_or_state[key]
    return model_or_state.state_dict()[key]


@fashion_mnist
def test_recipe_evaluates_a_saved_checkpoint(tmp_path, one_thread):
    ckpt = tmp_path / "ckpt"
    model = _checkpoint(ckpt, num_labels=10, seed=123).eval()
    summary = load_recipe_module().main(
        [*TINY, "--model_name_or_path", str(ckpt), "--output_dir", str(tmp_path / "out"), "--do_train", "False",
         "--max_eval_samples", "300", "--report_to", "none"])
    assert summary["model"]["hidden_sizes"] == [8, 24]  # the checkpoint's architecture, not the preset's
    # The recipe's eval loss is the saved model's own loss on the same images: it ran those weights.
    splits = image_data.load_image_splits("fashion_mnist")
    eval_ds = image_data.ImageClassificationDataset(splits.eval.subset(300, seed=1), splits.mean, splits.std)
    batch = torch.utils.data.default_collate([eval_ds[i] for i in range(len(eval_ds))])
    with torch.no_grad():
        expected = model(**batch).loss.item()
    assert summary["optimizer_steps"] == 0
    assert summary["metrics"]["eval_loss"] == pytest.approx(expected, rel=1e-5)


@fashion_mnist
def test_recipe_fine_tunes_a_checkpoint_with_other_labels(tmp_path, one_thread, capsys):
    from safetensors.torch import load_file

    ckpt = tmp_path / "ckpt"
    saved = _embedder_weight(_checkpoint(ckpt, num_labels=4, seed=7)).clone()  # 4 labels, the data has 10
    out = tmp_path / "out"
    load_recipe_module().main(["--model_name_or_path", str(ckpt), "--use_cpu", "--disable_tqdm", "True",
                               "--output_dir", str(out), "--max_train_samples", "256", "--max_eval_samples", "256",
                               "--per_device_train_batch_size", "64", "--max_steps", "4", "--learning_rate", "0.05",
                               "--logging_steps", "1", "--report_to", "none"])
    assert "initialised afresh" in capsys.readouterr().err
    summary = read_summary(out)
    assert summary["optimizer_steps"] == 4 and summary["model"]["num_labels"] == 10
    assert summary["model"]["hidden_sizes"] == [8, 24] and summary["model"]["name_or_path"] == str(ckpt)
    tuned = load_file(str(out / "model.safetensors"))
    assert tuned["classifier.1.weight"].shape == (10, 24)
    moved = float((_embedder_weight(tuned) - saved).norm() / saved.norm())
    # Fine-tuned from the saved weights: moved, but only a little (a fresh init would be ~sqrt(2) away).
    assert 0 < moved < 0.3, moved


# ------------------------------------------------------------------------------------------------ (e) no data
def test_recipe_missing_data_fails_before_training(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(DATA_ENV, str(empty))
    recipe = load_recipe_module()
    monkeypatch.setattr(recipe, "load_image_splits", lambda *a, **k: pytest.fail("loaded data"))
    for dataset, folder in (("fashion_mnist", "fashion-mnist"), ("cifar10", "cifar10-jpeg")):
        with pytest.raises(SystemExit) as err:  # SystemExit(message): exit status 1, the message on stderr
            recipe.main([*TINY, "--dataset", dataset, "--output_dir", str(tmp_path / "out")])
        message = str(err.value.code)
        assert message.startswith("error: ") and str(empty / folder) in message and DATA_ENV in message
    assert not (tmp_path / "out" / "summary.json").exists()


def test_missing_cifar10_names_path_and_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=DATA_ENV) as err:
        image_data.load_cifar10("test")
    assert str(tmp_path / "cifar10-jpeg") in str(err.value)
    with pytest.raises(FileNotFoundError, match=DATA_ENV):
        image_data.check_available("cifar10")


# ------------------------------------------------------------------------------------------------ ConAdv
@fashion_mnist
def test_recipe_conadv_pixel_epsilon(tmp_path):
    """pixel_epsilon is converted with the data's normalisation; the model is evaluated clean and under the attack
    (accuracy under attack is the lower one), and the run logs the attack's loss."""
    out = tmp_path / "out"
    run_recipe([*TINY, "--output_dir", str(out), "--max_train_samples", "1024", "--max_eval_samples", "256",
                "--per_device_train_batch_size", "64", "--num_train_epochs", "1", "--logging_steps", "4",
                "--adversarial", "conadv", "--adversarial_args", "pixel_epsilon=0.1"], tmp_path)
    metrics = read_summary(out)["metrics"]
    assert metrics["eval_adv_accuracy"] < metrics["eval_accuracy"]
    assert metrics["eval_adv_loss"] > metrics["eval_loss"]
    attack_losses = [e["adversarial_attack_loss"] for e in read_summary(out)["log_history"]
                     if "adversarial_attack_loss" in e]
    assert len(attack_losses) == 4


@fashion_mnist
def test_recipe_refuses_a_bad_eval_attack_before_training(tmp_path):
    proc = run_recipe([*TINY, "--output_dir", str(tmp_path / "out"), "--eval_adversarial_args", "radius=0.1"],
                      tmp_path, check=False)
    assert proc.returncode != 0 and "valid keys: epsilon" in proc.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()


@cifar10
def test_recipe_trains_the_cifar_resnet20_and_reloads_it(tmp_path, one_thread):
    recipe = load_recipe_module()
    out = tmp_path / "r20"
    summary = recipe.main(["--dataset", "cifar10", "--preset", "resnet20", "--use_cpu", "--disable_tqdm", "True",
                           "--output_dir", str(out), "--max_train_samples", "256", "--max_eval_samples", "200",
                           "--per_device_train_batch_size", "64", "--max_steps", "3", "--report_to", "none"])
    assert summary["model"]["model_type"] == "cifar_resnet" and summary["model"]["depths"] == [3, 3, 3]
    assert summary["model"]["num_parameters"] == 269_722 and summary["optimizer_steps"] == 3
    assert summary["peak_gpu_memory_gib"] is None  # on the CPU; on CUDA the most the run's GPU held
    # the saved model comes back through the recipe's --model_name_or_path (Auto classes) with the same eval loss
    again = recipe.main(["--dataset", "cifar10", "--model_name_or_path", str(out), "--use_cpu", "--do_train",
                         "False", "--output_dir", str(tmp_path / "eval"), "--max_eval_samples", "200",
                         "--report_to", "none", "--disable_tqdm", "True"])
    assert again["metrics"]["eval_loss"] == pytest.approx(summary["metrics"]["eval_loss"], rel=1e-6)
    with pytest.raises(ValueError, match="--embedding_size is not a setting of the CIFAR ResNets"):
        recipe.build_model(recipe.ModelArguments(preset="resnet20", embedding_size=32), 3, [str(i) for i in range(10)])


def test_cifar_resnet18_preset_is_resnet18_with_a_cifar_stem():
    """The preset of AdaScale's CIFAR-10 model: 3x3 stem at full resolution, four stages of two basic blocks at
    64-128-256-512 channels, each later stage halving the resolution (32 -> 4), option-A shortcuts (no weights)."""
    recipe = load_recipe_module()
    model = recipe.build_model(recipe.ModelArguments(preset="cifar_resnet18"), 3, [str(i) for i in range(10)])
    convs = 3 * 64 * 9 + 4 * 64 * 64 * 9  # stem, stage 1
    for width in (128, 256, 512):  # a stride-2 block from width / 2, then three convs at width
        convs += (width // 2) * width * 9 + 3 * width * width * 9
    batch_norms = 2 * (64 + 4 * (64 + 128 + 256 + 512))
    assert sum(p.numel() for p in model.parameters()) == convs + batch_norms + 512 * 10 + 10
    features = model.blocks(model.stem(torch.zeros(2, 3, 32, 32)))
    assert features.shape == (2, 512, 4, 4)
