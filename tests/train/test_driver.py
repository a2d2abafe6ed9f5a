"""Driver-side checks of `webcurate train` that need no training run (runs: test_resume.py, test_methods_run.py)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from webcurate.shards.errors import ConfigError
from webcurate.train.config import load_config, to_yaml


def _fake_checkpoint(output: str, step: int = 2) -> None:
    d = os.path.join(output, "train", f"checkpoint_{step:08d}")
    os.makedirs(d)
    for name in ("state.pt", "meta.json"):
        open(os.path.join(d, name), "w").close()


def test_existing_run_is_not_overwritten_without_resume(tiny_dataset, tmp_path, train_helpers):
    from webcurate.train.driver import train

    out = str(tmp_path / "run")
    _fake_checkpoint(out)
    with pytest.raises(ConfigError, match="already holds a training run.*--resume"):
        train(tiny_dataset, out, load_config(None, train_helpers.TINY))


def test_resume_with_a_changed_recipe_is_refused(tiny_dataset, tmp_path, train_helpers):
    from webcurate.train.driver import train

    out = str(tmp_path / "run")
    _fake_checkpoint(out)
    with open(os.path.join(out, "train_config.yaml"), "w") as f:
        f.write(to_yaml(load_config(None, train_helpers.TINY)))
    changed = load_config(None, train_helpers.TINY + ["optim.base_lr=0.1", "run.max_steps=9"])
    with pytest.raises(ConfigError, match=r"optim.base_lr: 0.004 -> 0.1"):
        train(tiny_dataset, out, changed, resume=True)


def test_dataset_smaller_than_a_batch_per_worker_is_a_clear_error(tiny_dataset, tmp_path, train_helpers):
    from webcurate.train.driver import train

    cfg = load_config(None, train_helpers.TINY + ["loader.batch_size=16"])  # 24 images / 2 workers = 12
    with pytest.raises(ConfigError, match="24 samples: fewer than one batch of loader.batch_size=16"):
        train(tiny_dataset, str(tmp_path / "run"), cfg)


def test_local_crop_size_must_fit_the_patch_size(train_helpers):
    from webcurate.train.models import resolve_config

    cfg = load_config(None, train_helpers.TINY + ["loader.local_size=20"])
    with pytest.raises(ConfigError, match="local_size=20 is not a multiple of the patch size 8"):
        resolve_config(cfg)


def test_cli_reports_a_bad_override_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "webcurate.pipeline.cli", "train", "--data", str(tmp_path),
                        "--output", str(tmp_path / "o"), "optim.bogus=1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: config: optim.bogus: unknown key; allowed:")
    assert "Traceback" not in r.stderr


def test_cli_help_documents_every_option():
    from click.testing import CliRunner

    from webcurate.train.cli import train

    out = CliRunner().invoke(train, ["--help"]).output
    for opt in ("--data", "--output", "--config", "--method", "--time-budget", "--epochs", "--max-steps", "--model",
                "--num-workers", "--resume", "SECTION.KEY=VALUE", "simclr", "barlow_twins", "mae"):
        assert opt in out


def test_metrics_parts_are_cut_back_to_the_resumed_step(tmp_path):
    from webcurate.train.metrics import read_metrics, truncate_metrics, write_metrics

    out = str(tmp_path)
    write_metrics(out, [{"step": s, "loss": float(s)} for s in (1, 2, 3)])
    write_metrics(out, [{"step": s, "loss": float(s)} for s in (4, 5, 6)])  # a run that died after step 6
    write_metrics(out, [{"step": s, "loss": float(s)} for s in (7, 8)])
    truncate_metrics(out, 4)  # its last checkpoint was at step 4
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
    write_metrics(out, [{"step": s, "loss": -float(s)} for s in (5, 6)])  # the resumed run
    assert [(r["step"], r["loss"]) for r in read_metrics(out)][-3:] == [(4, 4.0), (5, -5.0), (6, -6.0)]
    assert sorted(os.listdir(os.path.join(out, "metrics"))) == [
        "00000001-00000003.jsonl", "00000004-00000004.jsonl", "00000005-00000006.jsonl"]


def test_worker_runtime_env_carries_s3_settings_but_never_credentials():
    from webcurate.train.driver import worker_env_vars

    env = worker_env_vars({"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_REGION": "eu-west-1",
                           "AWS_ACCESS_KEY_ID": "AKIAABCDEFGHIJKLMNOP", "AWS_SECRET_ACCESS_KEY": "s3cr3t-value",
                           "AWS_SESSION_TOKEN": "tok-123456"})
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000" and env["AWS_REGION"] == "eu-west-1"
    leaked = [k for k in env if k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")]
    assert not leaked, f"credentials would be stored in Ray's runtime_env: {leaked}"


def test_memory_check_names_the_batch_size_and_a_value_that_fits(train_helpers):
    from webcurate.train.memory import check_fits, estimate_worker_memory
    from webcurate.train.models import resolve_config

    cfg = resolve_config(load_config(None, train_helpers.TINY + ["loader.batch_size=2000000"]))
    est = estimate_worker_memory(cfg)
    assert est.per_image > 0 and est.param_bytes > 0
    with pytest.raises(ConfigError, match=r"loader.batch_size=2000000 with 2 x 32 px \+ 2 x 16 px crops needs "
                                          r"~.* GiB per worker .* loader.batch_size=(\d+) fits") as e:
        check_fits(cfg, 2, local=True, estimate=est)
    fits = int(re.search(r"loader.batch_size=(\d+) fits", str(e.value)).group(1))
    assert 2 <= fits < 2000000
    check_fits(resolve_config(load_config(None, train_helpers.TINY + [f"loader.batch_size={fits}"])), 2,
               local=True, estimate=est)  # the value it names does fit


def test_no_config_on_a_cpu_only_machine_picks_a_cpu_recipe_that_fits(capsys):
    from webcurate.train.cli import _cpu_recipe_if_no_gpu
    from webcurate.train.memory import check_fits
    from webcurate.train.models import resolve_config

    recipe = _cpu_recipe_if_no_gpu()
    assert recipe is not None, "this test machine has no GPU"
    assert "using the CPU recipe" in capsys.readouterr().err
    cfg = resolve_config(load_config(recipe))
    assert cfg.method != "dinov2" and cfg.loader.global_size <= 64
    check_fits(cfg, cfg.run.num_workers, local=True)
