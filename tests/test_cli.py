"""The command line: demo (tiny settings), stripes, convert, and its errors."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

import asrfx
from asrfx.cli import load_model, main
from asrfx.zoo import cifar_resnet

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


def test_demo_tiny_run_writes_every_output(tmp_path, capsys):
    rc = main(["demo", "--depth", "8", "--epochs", "1", "--seeds", "2", "--out", str(tmp_path)])
    assert rc == 0
    out = json.loads((tmp_path / "results.json").read_text())
    names = [v["name"] for v in out["variants"]]
    assert names == ["backbone", "+SE", "+ASR(SE)", "+ASR(SE)+SE",
                     "+SE -> ASR (calibrated, no retraining)"]
    for v in out["variants"]:
        assert len(v["accuracies"]) == 2 and all(0 <= a <= 100 for a in v["accuracies"])
        assert v["params"] > 0 and v["flops"] > 0 and v["latency_ms"] > 0
    by = {v["name"]: v for v in out["variants"]}
    # deployed ASR models are the backbone: same parameter count and FLOPs
    assert by["+ASR(SE)"]["params"] == by["backbone"]["params"]
    assert by["+ASR(SE)"]["flops"] == by["backbone"]["flops"]
    assert by["+SE"]["params"] > by["backbone"]["params"]
    assert len(out["stripe_history"]) == 1  # one epoch tracked
    for f in ("results.md", "accuracy_latency.png", "stripe_history.png", "stripes.png"):
        assert (tmp_path / f).stat().st_size > 0
    assert (tmp_path / "stripes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "+ASR(SE)" in capsys.readouterr().out


def test_demo_mnist1d_runs_the_1d_path(tmp_path):
    pytest.importorskip("mnist1d")
    rc = main(["demo", "--dataset", "mnist1d", "--depth", "8", "--epochs", "1", "--seeds", "1",
               "--out", str(tmp_path)])
    assert rc == 0
    out = json.loads((tmp_path / "results.json").read_text())
    assert out["dataset"]["input_shape"] == [1, 40]


def test_stripes_and_convert_on_a_checkpoint(tmp_path, capsys):
    torch.manual_seed(0)
    model = cifar_resnet(8, attention="se", block="basic", num_classes=10, in_channels=1)
    ckpt = tmp_path / "se.pt"
    torch.save(model.state_dict(), ckpt)
    assert main(["stripes", "--model", "resnet8-se", "--checkpoint", str(ckpt), "--limit", "64",
                 "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "layer1.0.attention" in text and (tmp_path / "stripes.png").exists()
    assert main(["convert", "--model", "resnet8-se", "--checkpoint", str(ckpt), "--out",
                 str(tmp_path), "--formats", "pt2"]) == 0
    text = capsys.readouterr().out
    assert "converted and folded" in text and "stripe statistic" in text
    assert (tmp_path / "deploy.pt2").exists() and (tmp_path / "convert.txt").exists()
    # the calibrated ASR form it wrote folds again with `asrfx fold` (same files)
    assert main(["fold", "--model", "resnet8-se", "--checkpoint", str(tmp_path / "prepared.pt"),
                 "--out", str(tmp_path / "again"), "--size", "1", "8", "8", "--formats",
                 "pt2"]) == 0
    assert "loaded back" in capsys.readouterr().out


def test_bad_inputs_are_clear_errors(tmp_path, capsys):
    assert main(["stripes", "--model", "nosuchmodule:factory"]) == 2
    assert "cannot import" in capsys.readouterr().err
    assert main(["stripes", "--model", "resnet8"]) == 2  # no attention to record
    assert "channel attention" in capsys.readouterr().err
    # a checkpoint that needs unpickling of arbitrary objects is refused, never executed
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": object()}, f)
    with pytest.raises(asrfx.InputError, match="weights-only"):
        load_model("resnet8-se", str(evil))
    wrong = tmp_path / "wrong.pt"
    torch.save(cifar_resnet(8, block="basic", num_classes=10).state_dict(), wrong)
    with pytest.raises(asrfx.InputError, match="does not fit"):
        load_model("resnet8-se", str(wrong))
    assert main(["demo", "--dataset", "nope", "--epochs", "1"]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.parametrize("name,block", [("resnet20-se", "basic"), ("resnet56", "basic"),
                                        ("resnet164-se", "bottleneck"), ("resnet29", "bottleneck"),
                                        ("resnet20-bottleneck", "bottleneck")])
def test_zoo_names_follow_the_cifar_convention(name, block):
    from asrfx.zoo import BasicBlock, Bottleneck

    model = load_model(name)
    kind = {BasicBlock: "basic", Bottleneck: "bottleneck"}
    blocks = {kind[type(m)] for m in model.modules() if type(m) in kind}
    assert blocks == {block}
