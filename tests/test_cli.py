"""The command-line contract: Hydra groups, run records, clear errors with exit code 2."""

from __future__ import annotations

import json
import time

import pytest

from conftest import FAST, make_cfg, read_summary, run_cli
from projbench.errors import ConfigError


def test_help_and_cfg_job_show_groups(tmp_path):
    out = run_cli(["--help"], tmp_path)
    assert out.returncode == 0
    for group in ("task:", "optim:", "trainer:", "logger:", "paths:"):
        assert group in out.stdout
    cfg = run_cli(["task=digits", "optim=adamp", "--cfg", "job"], tmp_path)
    assert cfg.returncode == 0
    assert "_target_: projbench.optim.AdamP" in cfg.stdout
    assert "name: digits" in cfg.stdout


def test_unknown_optimizer_lists_valid_ones(tmp_path):
    out = run_cli(["optim=lambada"], tmp_path)
    assert out.returncode == 2
    assert out.stderr.startswith("error: optim=lambada: no such config; choose one of adam, adam_p, adamp, adamw, ")
    assert "lion_p" in out.stderr and "sgdp" in out.stderr
    assert out.stderr.count("\n") == 1


@pytest.mark.parametrize("override, message", [
    ("optim.lr=abc", "optim.lr: must be a number like its default 0.1, got 'abc'"),
    ("trainer.foo=1", "trainer.foo: Key 'foo' is not in struct; To append to your config use +trainer.foo=1"),
    ("optim.lr=[1", "optim.lr=[1: no viable alternative at input '[1'"),
])
def test_wrong_types_unknown_keys_and_hydra_errors_are_one_line_with_exit_2(tmp_path, override, message):
    out = run_cli([override, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert (out.returncode, out.stderr) == (2, f"error: {message}\n")
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.parametrize("override, message", [
    ("seed=1.5", "seed: must be an integer like its default 0, got 1.5"),
    ("seed=abc", "seed: must be an integer like its default 0, got 'abc'"),
    ("task.data.image_size=null", "task.data.image_size: must not be null (its default is 32)"),
    ("optim=adam optim.betas=[0.9,abc]", "optim.betas[1]: must be a number like its default 0.999, got 'abc'"),
    ("trainer.max_steps=null", None),                 # documented: then max_epochs decides
    ("optim.lr=nan", "optim.lr: must be a finite number, got nan"),
    ("resume=maybe", "resume: must be auto or true or false, got 'maybe'"),
])
def test_each_value_keeps_the_type_of_its_default(override, message):
    """What the command line checks (projbench/cli.py prepare), in process."""
    from projbench.runconfig import override_key
    from projbench.validation import check_loop_config, check_override_types

    overrides = override.split()
    cfg, defaults = make_cfg(overrides), make_cfg([o for o in overrides if o.startswith("optim=")])
    check = lambda: (check_override_types(cfg, defaults, [override_key(o) for o in overrides]),  # noqa: E731
                     check_loop_config(cfg))
    if message is None:
        check()
        return
    with pytest.raises(ConfigError) as err:
        check()
    assert str(err.value) == message


def test_an_unwritable_run_directory_is_one_line_and_full_error_shows_the_traceback(tmp_path):
    (tmp_path / "a_file").write_text("")
    args = [f"hydra.run.dir={tmp_path / 'a_file' / 'run'}"]
    out = run_cli(args, tmp_path)
    assert (out.returncode, out.stderr) == (2, f"error: {tmp_path / 'a_file' / 'run'}: Not a directory\n")
    traced = run_cli(["optim.lr=abc"], tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert traced.returncode != 0 and "Traceback" in traced.stderr and "ConfigError" in traced.stderr


def test_bad_values_fail_fast_with_exit_2_and_no_traceback(tmp_path):
    for override, key in [("optim.lr=0", "optim.lr"), ("trainer.schedule.name=linear", "trainer.schedule.name"),
                          ("trainer.precision=fp8", "trainer.precision"),
                          ("optim.decay.convention=l2", "optim.decay.convention")]:
        out = run_cli(FAST + [override, f"hydra.run.dir={tmp_path / key}"], tmp_path)
        assert out.returncode == 2, (override, out.stderr)
        assert key in out.stderr
        assert "Traceback" not in out.stderr
        assert not (tmp_path / key / "metrics.jsonl").exists(), "training must not start"


def test_config_error_raised_in_a_resolver_is_one_line(tmp_path):
    """A recipe row without an entry for the optimizer (projbench.optim_entry) stops with one line."""
    out = run_cli(["task=imagenet", "optim=lion", "optim.recipe_as.entries=[]", "logger=none",
                   f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert out.returncode == 2, out.stderr
    assert "error: task.recipes.resnet18: has no entry for optim=lion" in out.stderr
    assert "Traceback" not in out.stderr


def test_single_run_writes_its_records(tmp_path):
    run_dir = tmp_path / "run"
    out = run_cli(FAST + ["trainer.max_steps=4", "trainer.log_every=2", "trainer.eval_every=4",
                          "trainer.diagnostics_every=2", f"hydra.run.dir={run_dir}"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert (run_dir / ".hydra" / "config.yaml").exists()
    assert (run_dir / "checkpoint.pt").exists()
    points = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {p["split"] for p in points} == {"train", "test", "diag"}
    assert all(set(p) == {"step", "epoch", "split", "name", "value"} for p in points)
    assert [p["step"] for p in points if p["name"] == "loss" and p["split"] == "train"] == [2, 4]
    summary = read_summary(run_dir)
    assert summary["status"] == "completed"
    assert (summary["task"], summary["optim"], summary["seed"]) == ("digits", "sgdp", 0)
    assert summary["steps"] == 4 and summary["primary_metric"] == "top1"
    top1 = summary["metrics"]["test/top1"]
    assert top1["direction"] == "max" and 0 <= top1["final"] <= 100
    for key in ("git_commit", "torch_version", "device", "wall_seconds", "model"):
        assert key in summary
    # the recipe card: every recipe value with its source, command-line values marked, logged first
    rows = {e["key"]: e for e in json.loads((run_dir / "recipe.json").read_text())["entries"]}
    assert rows["task.model.arch"]["value"] == "resnet10t" and rows["task.model.arch"]["origin"] == "command line"
    assert rows["optim.delta"]["source"].startswith("paper") and rows["optim.decay"]["value"]["convention"]
    assert "| `task.model.arch` | resnet10t | command line |" in (run_dir / "recipe.md").read_text()
    assert "recipe task.model.arch = resnet10t" in (run_dir / "__main__.log").read_text().splitlines()[0]


def test_nan_loss_stops_the_run_and_marks_it_failed(tmp_path):
    run_dir = tmp_path / "nan"
    out = run_cli(FAST + ["optim=sgd", "optim.lr=1e12", "trainer.max_steps=30", "trainer.log_every=5",
                          f"hydra.run.dir={run_dir}"], tmp_path)
    assert out.returncode == 1
    assert "at step" in out.stderr and "Traceback" not in out.stderr
    summary = read_summary(run_dir)
    assert summary["status"] == "failed" and "at step" in summary["error"]
    assert summary["steps"] < 30


def test_wandb_offline_run_is_written_under_the_run_dir(tmp_path):
    run_dir = tmp_path / "wb"
    args = [a for a in FAST if not a.startswith("logger=")]
    out = run_cli(args + ["logger=wandb", "trainer.max_steps=2", f"hydra.run.dir={run_dir}"], tmp_path,
                  env={"WANDB_MODE": "offline"})
    assert out.returncode == 0, out.stderr
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline, list(run_dir.rglob("*"))
    assert "W&B" not in out.stderr, out.stderr[-2000:]  # it started, logged and finished cleanly
    assert read_summary(run_dir)["status"] == "completed"


def test_wandb_with_a_key_and_no_network_starts_within_its_timeout_and_logs_offline(tmp_path, monkeypatch):
    from projbench.records import WandbLogger

    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = make_cfg(["logger=wandb", "logger.mode=online", "logger.init_timeout=3"])
    start = time.perf_counter()
    with pytest.warns(UserWarning, match="could not start online within logger.init_timeout=3 s .* logging offline"):
        logger = WandbLogger(cfg.logger, cfg, tmp_path, "run-id")
    assert time.perf_counter() - start < 30  # W&B's own default waits 90 s
    assert logger.run is not None and logger.run.settings.mode == "offline"
    logger.log({"train/loss": 1.0}, step=1)
    logger.finish({"status": "completed"})
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_data_error_from_a_loader_worker_keeps_its_one_line_message():
    from torch.utils.data import DataLoader, Dataset

    from projbench.errors import DataError

    class Broken(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise DataError("/data/clip.wav", "unreadable", "check the file")

    try:
        next(iter(DataLoader(Broken(), num_workers=1)))
    except DataError as exc:
        assert str(exc) == "/data/clip.wav: unreadable. check the file"
    else:
        raise AssertionError("the worker's DataError was not re-raised as a DataError")
