"""The `pha` command: train -> eval on real files with a tiny model, params, and clear errors for bad input."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from pha_cli import main
from tests.support.tiny import SMALL_DIMS, TINY_BERT

TINY_YAML = {
    "model": {
        "backbone": {"kind": "minilm", "random_init": True, "decoder_layers": 1, "overrides": TINY_BERT},
        **SMALL_DIMS,
    },
    "train": {"steps": 3, "batch_size": 8, "n_train": 16, "max_eval": 12, "log_every": 1},
}


@pytest.fixture
def tiny_yaml(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_YAML))
    return path


@pytest.mark.data
def test_train_then_eval_writes_metrics_json(tmp_path, tiny_yaml, data_dir, capsys):
    out = tmp_path / "ckpt"
    code = main(
        [
            "train",
            "--config",
            str(tiny_yaml),
            "--tasks",
            "sst2",
            "rte",
            "--data-dir",
            str(data_dir),
            "--output",
            str(out),
            "--no-eval",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "hypernetwork H" in printed and "ce:" in printed
    assert (out / "model.safetensors").is_file() and (out / "train_log.json").is_file()
    from pha_core.content import ContentBank

    bank = ContentBank.load(out)  # the content check's bank of both tasks, fitted at the end of training
    assert bank is not None and "sst2" in bank and "rte" in bank
    report_file = tmp_path / "report.json"
    assert main(["eval", str(out), "--max-eval", "8", "--output", str(report_file)]) == 0
    report = json.loads(report_file.read_text())
    assert set(report["tasks"]) == {"sst2", "rte"}
    assert {"given", "retrieved", "routing_accuracy"} <= set(report["average"])
    assert report["tasks"]["sst2"]["n"] == 8
    from pha_core.label_prior import LabelPrior

    prior = LabelPrior.load(out)  # fitted on the validation rows at the end of training, applied by `pha eval`
    assert prior is not None and set(prior.offsets) == {"sst2", "rte"} and report["label_prior"] is True
    assert main(["eval", str(out), "--max-eval", "8", "--no-label-prior", "--output", str(report_file)]) == 0
    assert json.loads(report_file.read_text())["label_prior"] is False


@pytest.mark.data
def test_resume_continues_where_training_stopped(tmp_path, tiny_yaml, data_dir):
    out = tmp_path / "ckpt"
    args = [
        "train",
        "--config",
        str(tiny_yaml),
        "--tasks",
        "sst2",
        "--data-dir",
        str(data_dir),
        "--output",
        str(out),
        "--no-eval",
        "--save-every",
        "2",
        "--steps",
        "2",
    ]
    assert main(args) == 0
    assert main([*args[:-1], "4", "--resume"]) == 0
    meta = json.loads((out / "config.json").read_text())
    assert meta["recipe"]["steps_done"] == 4
    history = json.loads((out / "train_log.json").read_text())["history"]
    assert [row["step"] for row in history] == [1, 2, 3, 4]


@pytest.mark.data
def test_a_second_stage_starts_from_a_trained_checkpoint(tmp_path, tiny_yaml, data_dir):
    from safetensors.torch import load_file

    first, second = tmp_path / "first", tmp_path / "second"
    common = ["--config", str(tiny_yaml), "--tasks", "sst2", "cola", "--data-dir", str(data_dir), "--no-eval"]
    assert main(["train", *common, "--output", str(first)]) == 0
    # One step at a learning rate of 1e-9 (Adam moves each weight by ~lr): the weights are the first stage's.
    args = ["train", *common, "--output", str(second), "--init-from", str(first), "--steps", "1", "--lr", "1e-9"]
    assert main([*args, "--balance-labels", "--repeat", "cola=2"]) == 0
    a, b = load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors"))
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(not torch.allclose(a[k], torch.zeros_like(a[k])) for k in a)
    recipe = json.loads((second / "config.json").read_text())["recipe"]
    assert recipe["init_from"] == str(first) and recipe["balance_labels"] is True and recipe["repeat"] == ["cola=2"]
    first_recipe = json.loads((first / "config.json").read_text())["recipe"]
    assert first_recipe["earlier_stages"] == []
    assert recipe["earlier_stages"] == [{k: v for k, v in first_recipe.items() if k != "earlier_stages"}]
    code = main(["train", *common[:3], "sst2", *common[5:], "--output", str(tmp_path / "x"), "--init-from", str(first)])
    assert code != 0  # other tasks: another model, refused before any step


def test_params_prints_parts_and_formulas(tiny_yaml, capsys):
    assert main(["params", "--config", str(tiny_yaml), "--tasks", "sst2", "rte"]) == 0
    out = capsys.readouterr().out
    for part in ("encoder adapters", "retriever G", "task prototypes", "project network C", "hypernetwork H"):
        assert part in out
    assert "T*p = 2*16" in out


def test_unknown_task_is_a_clear_error(tiny_yaml, tmp_path, capsys):
    code = main(["train", "--config", str(tiny_yaml), "--tasks", "sst3", "--output", str(tmp_path / "x")])
    assert code == 2
    err = capsys.readouterr().err
    assert "sst3" in err and "sst2" in err  # names the bad task and the known ones
    assert not (tmp_path / "x").exists()


def test_missing_data_dir_is_a_clear_error(tiny_yaml, tmp_path, capsys):
    code = main(
        [
            "train",
            "--config",
            str(tiny_yaml),
            "--tasks",
            "sst2",
            "--data-dir",
            str(tmp_path / "none"),
            "--output",
            str(tmp_path / "x"),
        ]
    )
    assert code == 2
    assert "PHA_DATA_DIR" in capsys.readouterr().err


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert "config.json is missing" in capsys.readouterr().err


@pytest.mark.data
def test_report_draws_both_pictures(tmp_path, tiny_yaml, data_dir):
    out = tmp_path / "ckpt"
    assert (
        main(
            [
                "train",
                "--config",
                str(tiny_yaml),
                "--tasks",
                "sst2",
                "rte",
                "--data-dir",
                str(data_dir),
                "--output",
                str(out),
                "--no-eval",
                "--steps",
                "1",
            ]
        )
        == 0
    )
    img = tmp_path / "img"
    assert main(["report", str(out), "--output", str(img), "--max-eval", "6", "--data-dir", str(data_dir)]) == 0
    for name in ("prototype_heatmap.png", "retrieval_projection.png"):
        assert (img / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.data
def test_training_runs_under_torchrun_ddp(tmp_path, tiny_yaml, data_dir):
    """Two CPU processes (gloo): each rank draws its own batches, gradients are averaged, rank 0 saves."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        "-m",
        "pha_cli",
        "train",
        "--config",
        str(tiny_yaml),
        "--tasks",
        "sst2",
        "rte",
        "--data-dir",
        str(data_dir),
        "--output",
        str(out),
        "--no-eval",
        "--device",
        "cpu",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("hypernetwork H") == 1  # only rank 0 reports
    meta = json.loads((out / "config.json").read_text())
    assert meta["recipe"]["steps_done"] == 3


def test_recipe_fields_are_the_options_of_train():
    """Each documented field of the recipe dataclasses is a `pha train` option of its type; lists take several
    values after one flag."""
    import dataclasses

    from pha_cli import parse
    from pha_core.config import BackboneConfig, PHAConfig
    from pha_core.train import TrainConfig

    command, params = parse(
        ["train", "--steps", "5", "--tasks", "sst2", "rte", "--backbone-kind", "t5", "--lam", "0.5"]
    )
    assert command == "train"
    assert params["steps"] == 5 and params["tasks"] == ["sst2", "rte"]
    assert params["backbone_kind"] == "t5" and params["lam"] == 0.5
    assert params["bottleneck"] is None  # not typed: the config file's value (or the default) stands
    documented = [
        (f.metadata.get("flag") or f.name).replace("-", "_")
        for cls in (TrainConfig, PHAConfig, BackboneConfig)
        for f in dataclasses.fields(cls)
        if f.metadata.get("doc")
    ]
    assert len(documented) > 30 and set(documented) <= set(params)


def test_help_needs_no_torch_and_a_missing_config_file_is_one_line():
    import subprocess
    import sys

    probe = "import sys; from pha_cli import main; main(['--help']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False"), out  # the options come from torch-free recipe dataclasses
    err = subprocess.run(
        [sys.executable, "-m", "pha_cli", "train", "--config", "nowhere.yaml"], capture_output=True, text=True
    ).stderr.strip()
    assert err == "pha train: error: config file nowhere.yaml not found"


@pytest.mark.parametrize(
    ("entry", "says"),
    [("cola", "task=N"), ("cola=0", "task=N"), ("cola=x", "task=N"), ("wnli=2", "not trained")],
)
def test_a_bad_repeat_is_a_usage_error_that_says_the_form(capsys, entry, says):
    assert main(["train", "--tasks", "cola", "sst2", "--repeat", entry]) == 2
    err = capsys.readouterr().err
    assert says in err and entry in err


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[1].joinpath("pha_core", "configs").glob("*.yaml")))
def test_the_shipped_recipes_are_valid(path):
    from pha_cli.commands import load_yaml, model_config
    from pha_core.train import TrainConfig

    recipe = load_yaml(str(path))
    cfg = TrainConfig(**recipe["train"])
    assert model_config({}, recipe["model"]).backbone.kind == "minilm"  # the offline default backbone
    assert not Path(cfg.output).is_absolute() and not Path(cfg.init_from or ".").is_absolute()


def test_a_value_outside_the_choices_is_a_usage_error(capsys):
    assert main(["train", "--precision", "fp8"]) == 2
    assert "fp8" in capsys.readouterr().err


def test_serve_without_the_serving_extra_says_what_to_install(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    assert main(["serve"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "pha serve: error: fastapi is not installed; install the extra: pip install 'pha-serve[serve]'"


def test_the_method_package_imports_nothing_above_it():
    """pha_core knows nothing of HTTP, Redis or the command line (the service and the CLI import it, not back)."""
    import ast
    from pathlib import Path

    import pha_core

    for path in Path(pha_core.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            assert not [n for n in names if n.split(".")[0] in ("service", "pha_cli")], f"{path.name} imports {names}"
