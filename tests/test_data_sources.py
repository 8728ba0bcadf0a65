"""The user's own --data: image folders (labelled, unlabelled, pre-split), .npz files and file.py:factory
sources, read from real files; each bad input is refused with a message naming what to fix."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset
from typer.testing import CliRunner

from hwmpq.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataSourceError,
    Splits,
    check_input_shape,
    load_data,
    load_dataset,
    parse_floats,
    parse_image_size,
    require_labels,
)

PINK = (255, 0, 128)


def _png(path: Path, size=(6, 4), color=PINK, mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def _folder(root: Path, classes=("dog", "cat"), per_class=5, mode="RGB", color=PINK) -> Path:
    for c in classes:
        for i in range(per_class):
            _png(root / c / f"{i}.png", color=color, mode=mode)
    return root


def _files(ds) -> list[str]:
    return list(ds.files)


def _all_labels(s: Splits) -> list[int]:
    return [int(y) for ds in (s.train, s.val, s.test) for _, y in (ds[i] for i in range(len(ds)))]


# ---------------------------------------------------------------- image folders

def test_labelled_rgb_folder(tmp_path: Path):
    s = load_data(str(_folder(tmp_path / "pets")), image_size=4)
    assert s.classes == ("cat", "dog") and s.num_classes == 2 and s.labelled  # sorted by name -> 0, 1
    assert s.input_shape == (3, 4, 4) and (len(s.train), len(s.val), len(s.test)) == (8, 1, 1)
    x, y = s.train[0]
    assert x.shape == (3, 4, 4) and x.dtype == torch.float32 and y.dtype == torch.int64
    expected = (torch.tensor(PINK) / 255.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(x[:, 2, 1], expected, atol=1e-6)  # a uniform image stays uniform when resized
    for ds in (s.train, s.val, s.test):
        for f, label in zip(ds.files, ds.labels, strict=True):
            assert label == s.classes.index(Path(f).parent.name)
    assert sorted(_all_labels(s)) == [0] * 5 + [1] * 5


def test_resize_shorter_side_then_centre_crop(tmp_path: Path):
    im = Image.new("RGB", (8, 4), (255, 0, 0))  # W 8, H 4: left half red, right half blue
    im.paste((0, 0, 255), (4, 0, 8, 4))
    (tmp_path / "flat").mkdir()
    for i in range(3):
        im.save(tmp_path / "flat" / f"{i}.png")
    s = load_data(str(tmp_path / "flat"), image_size=4, mean=[0.0], std=[1.0])
    x, _ = s.train[0]
    assert x.shape == (3, 4, 4)  # the centre 4 columns of 8: two red, two blue
    assert x[:, 0, 0].tolist() == [1.0, 0.0, 0.0] and x[:, 0, 3].tolist() == [0.0, 0.0, 1.0]
    small = load_data(str(tmp_path / "flat"), image_size=(2, 2), mean=[0.0], std=[1.0])
    assert small.train[0][0].shape == (3, 2, 2)  # shorter side 4 -> 2, width 8 -> 4, centre 2 columns


def test_grayscale_folder_stays_one_channel_and_converts_on_request(tmp_path: Path):
    root = _folder(tmp_path / "g", mode="L", color=51)  # 51 / 255 = 0.2
    s = load_data(str(root), image_size=3, mean=[0.5], std=[0.25])
    assert s.input_shape == (1, 3, 3)
    assert torch.allclose(s.train[0][0], torch.full((1, 3, 3), (0.2 - 0.5) / 0.25), atol=1e-6)
    rgb = load_data(str(root), image_size=3, channels=3)
    assert rgb.input_shape == (3, 3, 3) and rgb.train[0][0].shape == (3, 3, 3)


def test_mixed_channels_must_be_asked_for(tmp_path: Path):
    root = _folder(tmp_path / "mix")
    _png(root / "cat" / "gray.png", mode="L", color=10)
    with pytest.raises(DataSourceError, match=r"mixes grayscale images \(1, e\.g\. .*gray\.png\).*--channels 1"):
        load_data(str(root))
    assert load_data(str(root), image_size=2, channels=1).input_shape == (1, 2, 2)


def test_unlabelled_folder_calibrates_but_does_not_train(tmp_path: Path):
    for i in range(4):
        _png(tmp_path / "u" / f"{i}.jpg")
    s = load_data(str(tmp_path / "u"), image_size=4)
    assert s.num_classes == 0 and not s.labelled and s.classes == ()
    assert set(_all_labels(s)) == {-1} and len(s.train) + len(s.val) + len(s.test) == 4
    x, _ = next(iter(s.loader("train", batch_size=8)))
    assert x.shape == (2, 3, 4, 4)
    with pytest.raises(DataSourceError, match=r"has no labels: training needs labelled data.*DIR/<class>"):
        require_labels(s, "training")


def test_split_is_deterministic_seeded_disjoint_and_complete(tmp_path: Path):
    root = _folder(tmp_path / "d", classes=("a", "b"), per_class=10)
    a, again, other = (load_data(str(root), image_size=2, seed=seed) for seed in (0, 0, 1))
    assert all(_files(getattr(a, s)) == _files(getattr(again, s)) for s in ("train", "val", "test"))
    assert _files(a.val) + _files(a.test) != _files(other.val) + _files(other.test)
    every = _files(a.train) + _files(a.val) + _files(a.test)
    assert len(every) == len(set(every)) == 20 and (len(a.val), len(a.test)) == (2, 2)


def test_train_val_test_subfolders_are_the_splits(tmp_path: Path):
    root = tmp_path / "pre"
    for split, n in (("train", 4), ("val", 2), ("test", 3)):
        _folder(root / split, classes=("x", "y"), per_class=n)
    s = load_data(str(root), image_size=2)
    assert (len(s.train), len(s.val), len(s.test)) == (8, 4, 6) and s.classes == ("x", "y")
    assert all(Path(f).parts[-3] == "val" for f in s.val.files)
    (root / "test" / "x").rename(tmp_path / "moved_x")
    (root / "test" / "y").rename(tmp_path / "moved_y")
    (root / "test").rmdir()  # no test/: split off train, val kept as given
    s = load_data(str(root), image_size=2)
    assert (len(s.train), len(s.val), len(s.test)) == (7, 4, 1)
    assert all(Path(f).parts[-3] == "train" for f in s.test.files)


def test_image_dataset_pickles_and_stacks(tmp_path: Path):
    s = load_data(str(_folder(tmp_path / "p")), image_size=2, limit=3)
    assert (len(s.train), len(s.val), len(s.test)) == (3, 1, 1)
    x, y = s.train.tensors
    assert x.shape == (3, 3, 2, 2) and y.dtype == torch.int64
    copy = pickle.loads(pickle.dumps(s.train))
    assert torch.equal(copy[0][0], s.train[0][0])


@pytest.mark.parametrize("make,message", [
    (lambda d: d.mkdir(), "holds no images"),
    (lambda d: (d / "cat").mkdir(parents=True), "holds no images"),
    (lambda d: (_folder(d), (d / "cat" / "bad.png").write_bytes(b"not a png at all")), r"cat/bad\.png: not a readable image"),
    (lambda d: (_folder(d), (d / "cat" / "cut.png").write_bytes(
        (d / "cat" / "0.png").read_bytes()[:40])), r"cut\.png: not a readable image"),
    (lambda d: (_folder(d), _png(d / "loose.png")), "holds images .* and class subfolders"),
    (lambda d: (_folder(d), (d / "bird").mkdir()), r"class folder .*bird holds no images"),
    (lambda d: _folder(d, classes=("only",), per_class=2), "too few to split off val and test"),
], ids=["empty", "empty-class-folders", "corrupt", "truncated", "loose-image", "empty-class", "too-few"])
def test_bad_image_folders(tmp_path: Path, make, message):
    make(tmp_path / "bad")
    with pytest.raises(DataSourceError, match=message):
        load_data(str(tmp_path / "bad"))


def test_missing_sources_and_options_they_do_not_take(tmp_path: Path):
    with pytest.raises(DataSourceError, match=r"unknown dataset 'cifar'; known: \('fashion-mnist', 'digits'\)"):
        load_data("cifar")
    with pytest.raises(DataSourceError, match="no such file or folder"):
        load_data(str(tmp_path / "nowhere"))
    with pytest.raises(DataSourceError, match="does not take --image-size"):
        load_data("digits", image_size=32)
    with pytest.raises(DataSourceError, match="--mean has 2 values but the data has 3 channels"):
        load_data(str(_folder(tmp_path / "f")), mean=[0.5, 0.5])
    with pytest.raises(DataSourceError, match="--image-size 'big'"):
        parse_image_size("big")
    assert parse_image_size("32") == (32, 32) and parse_image_size("24,16") == (24, 16)
    assert parse_floats("0.5,0.25", "--std") == (0.5, 0.25)
    assert load_dataset("digits").input_shape == (1, 8, 8)  # the built-in names still work


# ---------------------------------------------------------------- the model's input shape

def test_check_input_shape_names_the_mismatch(tmp_path: Path):
    gray = load_data(str(_folder(tmp_path / "g", mode="L", color=0)), image_size=8)
    check_input_shape(gray, (1, 1, 8, 8))
    with pytest.raises(DataSourceError, match=r"has 1 channel, the model expects 3 .*--channels 3"):
        check_input_shape(gray, (1, 3, 8, 8))
    with pytest.raises(DataSourceError, match=r"has 8x8 images, the model expects 32x32 .*--image-size 32"):
        check_input_shape(gray, (1, 1, 32, 32))


# ---------------------------------------------------------------- .npz

def test_npz_uint8_with_labels_and_test_split(tmp_path: Path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 5, 5), dtype=np.uint8)
    x[0, 0, 0] = 255
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(20) % 4, x_test=x[:6], y_test=np.arange(6) % 4)
    s = load_data(str(tmp_path / "d.npz"))
    assert s.input_shape == (1, 5, 5) and s.num_classes == 4
    assert (len(s.train), len(s.val), len(s.test)) == (18, 2, 6)
    assert torch.equal(s.test.tensors[0], torch.from_numpy(x[:6, None] / np.float32(255.0)))
    assert float(s.test.tensors[0][0, 0, 0, 0]) == 1.0
    normed = load_data(str(tmp_path / "d.npz"), mean=[0.5], std=[0.5])
    assert float(normed.test.tensors[0][0, 0, 0, 0]) == 1.0 and float(normed.test.tensors[0].min()) >= -1.0


def test_npz_float_nchw_unlabelled(tmp_path: Path):
    x = np.random.default_rng(1).standard_normal((10, 3, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "u.npz", x=x)
    s = load_data(str(tmp_path / "u.npz"), seed=3)
    assert s.input_shape == (3, 4, 4) and s.num_classes == 0
    assert set(s.train.tensors[1].tolist()) == {-1}
    stacked = torch.cat([s.train.tensors[0], s.val.tensors[0], s.test.tensors[0]])
    assert sorted(stacked.sum((1, 2, 3)).tolist()) == sorted(torch.from_numpy(x).sum((1, 2, 3)).tolist())


@pytest.mark.parametrize("arrays,message", [
    ({"images": np.zeros((4, 2, 2))}, r"has no array 'x' \(it holds \['images'\]\)"),
    ({"x": np.zeros((4, 2, 2)), "y": np.zeros(3, dtype=np.int64)}, "y must be 4 integer labels"),
    ({"x": np.zeros((4, 8, 8, 3), dtype=np.uint8)}, "looks channels-last"),
    ({"x": np.zeros((4, 2, 2), dtype=np.int32)}, "dtype int32; expected float"),
    ({"x": np.zeros((4, 2, 2)), "y": np.zeros(4, dtype=np.int64), "x_test": np.zeros((2, 2, 2))},
     "labels are given for some image arrays only"),
    ({"x": np.zeros((4, 2, 2)), "x_test": np.zeros((2, 3, 3))}, "differ in shape"),
], ids=["no-x", "short-y", "channels-last", "int-dtype", "y-without-y_test", "shape-mismatch"])
def test_bad_npz(tmp_path: Path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataSourceError, match=message):
        load_data(str(tmp_path / "bad.npz"))


def test_npz_that_is_not_one(tmp_path: Path):
    (tmp_path / "junk.npz").write_bytes(b"PK nonsense")
    with pytest.raises(DataSourceError, match=r"junk\.npz: not a readable \.npz file"):
        load_data(str(tmp_path / "junk.npz"))
    np.savez(tmp_path / "c.npz", x=np.zeros((4, 1, 2, 2), dtype=np.float32))
    with pytest.raises(DataSourceError, match="x has 1 channel.*--channels asks for 3"):
        load_data(str(tmp_path / "c.npz"), channels=3)
    with pytest.raises(DataSourceError, match="does not take --image-size"):
        load_data(str(tmp_path / "c.npz"), image_size=4)


# ---------------------------------------------------------------- path/to/file.py:factory

FACTORIES = '''
import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset


class Squares(Dataset):
    """H,W numpy images with int labels, made on demand."""

    def __init__(self, n, offset=0):
        self.n, self.offset = n, offset

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return np.full((6, 6), float(i + self.offset), dtype=np.float32), (i + self.offset) % 3


def one():
    return TensorDataset(torch.randn(20, 3, 4, 4), torch.arange(20) % 5)


def triple():
    return Squares(8), Squares(2, 100), Squares(3, 200)


def as_dict():
    return {"train": Squares(4), "val": Squares(2), "test": Squares(2), "num_classes": 7}


def images_only():
    return TensorDataset(torch.zeros(10, 1, 2, 2))


not_callable = 3


def wrong():
    return 42


def wrong_keys():
    return {"train": Squares(4), "validation": Squares(2)}


def empty_val():
    return Squares(4), Squares(0), Squares(2)


def explodes():
    raise RuntimeError("no data today")


class Words(Squares):
    def __getitem__(self, i):
        return "text", 1


def odd_sample():
    return Words(5)


def samples_list():
    return [(torch.zeros(1, 2, 2), 0)] * 5
'''


@pytest.fixture
def factories(tmp_path: Path) -> str:
    path = tmp_path / "my_data.py"
    path.write_text(FACTORIES)
    return str(path)


def test_factory_single_dataset_is_split(factories: str):
    s = load_data(f"{factories}:one")
    assert isinstance(s.train, TensorDataset) and s.input_shape == (3, 4, 4) and s.num_classes == 5
    assert (len(s.train), len(s.val), len(s.test)) == (16, 2, 2)
    again = load_data(f"{factories}:one", seed=0)
    assert s.val.tensors[1].tolist() == again.val.tensors[1].tolist()


def test_factory_tuple_and_dict(factories: str):
    s = load_data(f"{factories}:triple")
    assert s.input_shape == (1, 6, 6) and s.num_classes == 3 and len(s.val) == 2
    x, y = s.val[1]
    assert x.shape == (1, 6, 6) and float(x[0, 0, 0]) == 101.0 and y.dtype == torch.int64 and int(y) == 101 % 3
    assert next(iter(s.loader("train", batch_size=4)))[0].shape == (4, 1, 6, 6)
    assert load_data(f"{factories}:as_dict").num_classes == 7
    unlabelled = load_data(f"{factories}:images_only")
    assert unlabelled.num_classes == 0 and int(unlabelled.train[0][1]) == -1


@pytest.mark.parametrize("name,message", [
    ("not_callable", "has no callable 'not_callable'"),
    ("missing", "has no callable 'missing'"),
    ("wrong", "the factory returned int; expected a torch Dataset"),
    ("wrong_keys", r"returned a dict with keys \['train', 'validation'\]"),
    ("empty_val", "the val split is empty"),
    ("explodes", r"factory explodes\(\) raised RuntimeError: no data today"),
    ("odd_sample", "the image is a str, expected a tensor or array"),
    ("samples_list", r"returned a list of 5: \(tuple, .*expected a torch Dataset"),
], ids=["not-callable", "missing", "wrong", "wrong-keys", "empty-val", "explodes", "odd-sample", "samples-list"])
def test_bad_factories(factories: str, name, message):
    with pytest.raises(DataSourceError, match=message):
        load_data(f"{factories}:{name}")


def test_factory_file_and_name_must_exist(tmp_path: Path, factories: str):
    with pytest.raises(DataSourceError, match="does not exist"):
        load_data(f"{tmp_path / 'nope.py'}:one")
    with pytest.raises(DataSourceError, match="give the factory too"):
        load_data(factories)
    with pytest.raises(DataSourceError, match="does not take --mean"):
        load_data(f"{factories}:one", mean=[0.5])


# ---------------------------------------------------------------- the command line

@pytest.fixture(scope="module")
def app():
    from hwmpq import cli

    if not getattr(cli, "_test_registered", False):
        cli._register()
        cli._test_registered = True
    return cli.app


def test_cli_train_on_a_png_folder(app, tmp_path: Path):
    root = tmp_path / "shapes"
    for c, value in (("bright", 230), ("dark", 20)):
        for i in range(6):
            _png(root / c / f"{i}.png", size=(10, 10), mode="L", color=value + i)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = ["train", "--model", "test_tiny", "--data", str(root), "--image-size", "8", "--mean", "0.5",
                "--std", "0.5", "--epochs", "1", "--batch-size", "4", "--no-progress", "--out", str(tmp_path / "c.pt")]
        res = CliRunner().invoke(app, args)
    finally:
        torch.set_num_threads(n)
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "c.json").read_text())
    assert summary["args"]["image_size"] == "8" and 0 <= summary["test_acc"] <= 1
    assert torch.load(tmp_path / "c.pt", weights_only=True)["model"]["fc.weight"].shape[0] == 2  # two classes

    for i in range(3):
        _png(tmp_path / "flat" / f"{i}.png", mode="L", color=0)
    res = CliRunner().invoke(app, [*args[:4], str(tmp_path / "flat"), *args[5:]])
    assert res.exit_code == 2 and "has no labels: training needs labelled data" in res.output
    assert "Traceback" not in res.output


def test_cli_export_refuses_data_the_model_cannot_take(app, tmp_path: Path):
    from hwmpq.records import BitPlan, Precision, save_plan

    save_plan(BitPlan.from_dict({n: Precision(8, 8) for n in ("conv1", "conv2", "dw", "pw", "fc")}),
              tmp_path / "plan.json")
    rgb = _folder(tmp_path / "rgb")
    res = CliRunner().invoke(app, ["export", "--model", "test_tiny", "--plan", str(tmp_path / "plan.json"),
                                   "--out", str(tmp_path / "out"), "--data", str(rgb)])
    assert res.exit_code == 2, res.output
    assert "has 3 channels, the model expects 1" in res.output and "--channels 1" in res.output
    assert not (tmp_path / "out").exists()
