"""A user's own model file in their own folder, named ``module:factory`` on the command line."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

import asrfx
from asrfx.cli import main
from asrfx.zoo import build_model, parse_model_spec

MODELS = textwrap.dedent('''
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self, cin=3, classes=10, width=8):
            super().__init__()
            self.conv = nn.Conv2d(cin, width, 3, padding=1)
            self.bn = nn.BatchNorm2d(width)
            self.fc1, self.fc2 = nn.Linear(width, 4), nn.Linear(4, width)
            self.head = nn.Linear(width, classes)

        def forward(self, x):
            y = torch.relu(self.bn(self.conv(x)))
            g = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3))))))
            y = y * g[:, :, None, None]
            return self.head(y.mean((2, 3)))


    def build(cin=3, classes=10, width=8):
        return Net(cin, classes, width)


    def broken(cin=3):
        raise RuntimeError("no weights for cin=%d" % cin)


    def plain(cin=3, classes=10):
        return nn.Sequential(nn.Conv2d(cin, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))
''')


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    """A folder holding ``mymodels.py``, as the working directory, not on the Python path (a
    console script does not put it there)."""
    (tmp_path / "mymodels.py").write_text(MODELS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "mymodels", raising=False)
    yield tmp_path
    sys.modules.pop("mymodels", None)


def test_factory_in_the_working_directory_is_found(user_folder):
    model = build_model("mymodels:build")
    assert type(model).__name__ == "Net" and model.conv.in_channels == 3


def test_factory_arguments_are_written_after_its_name(user_folder):
    spec = parse_model_spec("mymodels:build(cin=1, width=6, classes=4)")
    assert (spec.module, spec.factory, dict(spec.kwargs)) == \
        ("mymodels", "build", {"cin": 1, "width": 6, "classes": 4})
    model = build_model(spec)
    assert model.conv.in_channels == 1 and model.head.out_features == 4
    assert build_model("mymodels:build(1, 4)").head.out_features == 4  # positional too


@pytest.mark.parametrize("spec", ["mymodels:build(cin=)", "mymodels:build(cin=open('x'))",
                                  "mymodels:build(**{'cin': 1})", "mymodels:build(cin=1"])
def test_factory_arguments_that_are_not_literals_are_refused(user_folder, spec):
    with pytest.raises(asrfx.InputError, match="literals|expected"):
        parse_model_spec(spec)


def test_a_factory_that_raises_is_named_with_its_arguments(user_folder):
    with pytest.raises(asrfx.InputError, match=r"broken\(cin=2\) raised RuntimeError: "
                                               r"no weights for cin=2") as e:
        build_model("mymodels:broken(cin=2)")
    assert isinstance(e.value.__cause__, RuntimeError)


def test_fold_command_runs_on_the_users_model(user_folder, capsys):
    """``asrfx fold --model mymodels:build(cin=1)`` from the user's folder, on a checkpoint of
    the prepared model: deploy files written and loaded back, no PYTHONPATH needed."""
    torch.manual_seed(0)
    x = torch.randn(2, 1, 16, 16)
    prepared = asrfx.prepare(build_model("mymodels:build(cin=1)"), example_inputs=(x,))
    torch.save(prepared.state_dict(), user_folder / "prepared.pt")
    rc = main(["fold", "--model", "mymodels:build(cin=1)", "--checkpoint", "prepared.pt",
               "--out", "deploy", "--size", "1", "16", "16", "--formats", "pt2"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert (user_folder / "deploy" / "deploy.pt2").stat().st_size > 0
    assert "loaded back" in out
    # as the README loads it: torch alone, another batch size
    program = torch.export.load(str(user_folder / "deploy" / "deploy.pt2")).module()
    xs = torch.randn(5, 1, 16, 16)
    prepared.eval()
    with torch.no_grad():
        ref = prepared(xs)
        assert ((program(xs) - ref).abs().max() / ref.abs().max()).item() <= 1e-4


def test_commands_say_what_to_type_for_a_missing_module_or_a_raising_factory(user_folder,
                                                                              capsys):
    assert main(["stripes", "--model", "othermodels:build"]) == 2
    err = capsys.readouterr().err
    assert "cannot import othermodels.build" in err and str(user_folder) in err
    assert main(["fold", "--model", "mymodels:broken(cin=5)", "--checkpoint", "x.pt",
                 "--out", "d"]) == 2
    err = capsys.readouterr().err
    assert "broken(cin=5) raised RuntimeError" in err and "Traceback" not in err


# --- the user's data -----------------------------------------------------------------------------

from asrfx.data import load_dataset  # noqa: E402


def _arrays(n: int = 40, c: int = 1, size: int = 8, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, c, size, size, generator=g) + y.view(-1, 1, 1, 1).float()
    return x.numpy(), y.numpy()


def test_npz_file_is_split_and_normalised(user_folder):
    import numpy as np

    x, y = _arrays()
    np.savez(user_folder / "mine.npz", x=x, y=y)
    split = load_dataset("mine.npz")
    assert (split.name, split.num_classes, split.in_channels, split.dims) == ("mine", 3, 1, 2)
    assert len(split.y_train) + len(split.y_test) == 40 and len(split.y_test) == 8
    assert abs(float(split.x_train.mean())) < 1e-5 and abs(float(split.x_train.std()) - 1) < 0.05
    again = load_dataset("mine.npz")  # the split is seeded: the same twice
    assert torch.equal(again.y_test, split.y_test)


def test_npz_with_its_own_split_keeps_it(user_folder):
    import numpy as np

    x, y = _arrays()
    np.savez(user_folder / "own.npz", x_train=x[:30], y_train=y[:30], x_test=x[30:],
             y_test=y[30:])
    split = load_dataset("own.npz")
    assert torch.equal(split.y_test, torch.from_numpy(y[30:]).long())


def test_image_folder_reads_class_folders(user_folder):
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(0)
    for k, cls in enumerate(["cat", "dog"]):
        (user_folder / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (6, 5, 3), dtype=np.uint8)).save(
                user_folder / "imgs" / cls / f"{i}.png")
    split = load_dataset("imgs")
    assert (split.num_classes, split.input_shape) == (2, (3, 6, 5))
    assert len(split.y_train) + len(split.y_test) == 6


def test_function_returning_batches(user_folder):
    (user_folder / "mydata.py").write_text(textwrap.dedent('''
        import torch

        def batches(n=4):
            for i in range(n):
                yield torch.randn(5, 2, 4, 4), torch.arange(5) % 2
    '''))
    split = load_dataset("mydata:batches(n=3)")
    assert (split.num_classes, split.input_shape) == (2, (2, 4, 4))
    assert len(split.y_train) + len(split.y_test) == 15
    sys.modules.pop("mydata", None)


@pytest.mark.parametrize("case, match", [
    ("keys", "expected x and y"),
    ("float-labels", "integer classes"),
    ("sizes", "resize them"),
    ("missing", "no such file"),
    ("raises", "the function raised ValueError"),
])
def test_bad_user_data_is_a_clear_error(user_folder, case, match):
    import numpy as np
    from PIL import Image

    spec = {"keys": "bad.npz", "float-labels": "bad.npz", "sizes": "imgs", "missing": "nope.npz",
            "raises": "baddata:load"}[case]
    if case == "keys":
        np.savez(user_folder / "bad.npz", inputs=np.zeros((4, 1, 2, 2)))
    elif case == "float-labels":
        np.savez(user_folder / "bad.npz", x=np.zeros((4, 1, 2, 2)), y=np.array([0.5] * 4))
    elif case == "sizes":
        for cls, size in (("a", (4, 4)), ("b", (5, 4))):
            (user_folder / "imgs" / cls).mkdir(parents=True)
            Image.new("L", size).save(user_folder / "imgs" / cls / "0.png")
    elif case == "raises":
        (user_folder / "baddata.py").write_text("def load():\n    raise ValueError('no')\n")
    with pytest.raises(asrfx.InputError, match=match):
        load_dataset(spec)
    sys.modules.pop("baddata", None)


def test_stripes_and_convert_run_on_the_users_model_and_data(user_folder, capsys):
    import numpy as np

    x, y = _arrays()
    np.savez(user_folder / "mine.npz", x=x, y=y)
    torch.manual_seed(0)
    model = build_model("mymodels:build(cin=1, classes=3)")
    torch.save(model.state_dict(), user_folder / "se.pt")
    spec = "mymodels:build(cin=1, classes=3)"
    assert main(["stripes", "--model", spec, "--checkpoint", "se.pt", "--data", "mine.npz"]) == 0
    assert "stripe statistic" in capsys.readouterr().out
    assert main(["convert", "--model", spec, "--checkpoint", "se.pt", "--data", "mine.npz"]) == 0
    assert "converted and folded" in capsys.readouterr().out
    # a model with fewer outputs than the data's classes: what to type instead
    assert main(["stripes", "--model", "mymodels:build(cin=1, classes=2)", "--data",
                 "mine.npz"]) == 2
    err = capsys.readouterr().err
    assert "outputs 2 classes" in err and "classes=3" in err
    assert main(["convert", "--model", "mymodels:build()", "--checkpoint", "se.pt", "--data",
                 "mine.npz"]) == 2
    assert "does not fit" in capsys.readouterr().err  # the checkpoint's shapes differ


BENCH_QUICK = ["--batch", "2", "--reps", "2", "--warmup", "0", "--train-batch", "4",
               "--train-reps", "1", "--runtimes", "--quiet", "--threads", "1"]


def test_bench_on_the_users_model_and_data(user_folder, capsys):
    """Rows named by what they are, the data's shape and the model's own class count (3, not
    the zoo's 100: no out-of-range targets), no project targets for a user's model."""
    import numpy as np

    x, y = _arrays()
    np.savez(user_folder / "mine.npz", x=x, y=y)
    rc = main(["bench", "--model", "mymodels:build(cin=1, classes=3)", "--data", "mine.npz",
               *BENCH_QUICK])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "its own attention" in out and "targets" not in out
    for row in ("backbone", "+attention", "ASR(attention) train form", "ASR(attention) folded"):
        assert row in out
    assert "Net" not in out  # rows are not named after the user's class


def test_bench_says_when_a_model_has_no_attention_and_refuses_attention_for_it(user_folder,
                                                                                capsys):
    rc = main(["bench", "--model", "mymodels:plain(classes=4)", "--size", "3", "8", "8",
               *BENCH_QUICK])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "no channel attention asrfx converts" in out
    assert main(["bench", "--model", "mymodels:build", "--attention", "eca",
                 *BENCH_QUICK]) == 2
    assert "drop --attention" in capsys.readouterr().err


def test_help_lists_defaults_and_choices(capsys):
    for cmd in ("demo", "stripes", "convert", "bench", "fold"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        text = capsys.readouterr().out
        assert "(default:" in text and "--data" in text or cmd == "fold"
    with pytest.raises(SystemExit):
        main(["fold", "--help"])
    assert "{pt2,onnx}" in capsys.readouterr().out


def test_help_does_not_load_torch():
    """``asrfx --help`` starts at once: the package and the command line load torch only
    when a command runs."""
    import subprocess

    code = ("import sys, asrfx.cli\n"
            "try:\n    asrfx.cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize("argv, says", [
    (["bench", "--model", "mymodels:build", "--size", "1", "8", "8", *BENCH_QUICK],
     "give --size (the input shape without batch) or --data"),
    (["bench", "--model", "mymodels:build", *BENCH_QUICK], "give the input size with --size"),
    (["fold", "--model", "mymodels:build", "--checkpoint", "c.pt", "--out", "d", "--size", "3",
      "8"], "does not take inputs of shape (3, 8)"),
    (["convert", "--model", "mymodels:build(cin=1)", "--checkpoint", "c.pt", "--data",
      "nope.npz"], "no such file"),
    (["demo", "--data", "nope.npz", "--epochs", "1", "--seeds", "1"], "no such file"),
    (["stripes", "--model", "mymodels:build", "--data", "digits"], "module:factory(cin=1)"),
    (["stripes", "--model", "mymodels:build(cin=1)", "--data", "digits", "--out",
      "c.pt/inside"], "give a path you can write to"),
])
def test_user_mistakes_say_what_to_type(user_folder, capsys, argv, says):
    torch.save(build_model("mymodels:build").state_dict(), user_folder / "c.pt")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err, err
    assert err.startswith(f"asrfx {argv[0]}: ")
