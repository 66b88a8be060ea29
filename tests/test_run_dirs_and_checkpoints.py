"""`peftlab eval --adapter RUNDIR`, what --eval-data / --eval-size evaluate, --keep-checkpoints (the newest and the
best are never removed), and a failed save (a full disk) that names the file and leaves the last checkpoint intact."""
from __future__ import annotations

import errno
import json

import pytest
from safetensors import SafetensorError
from safetensors.torch import load_file

from peftlab import cli
from peftlab.train import checkpoint as ckpt
from peftlab.train.jobs import EvalConfig, JobConfig, JobError, run_eval, run_job
from peftlab.train.jobs.inputs import pick_eval_records
from test_jobs import pc_file, tiny_dir, tiny_job  # noqa: F401 - the shared module fixtures
from test_train import WORDS


def _job(tiny_dir, pc_file, output, **kw) -> JobConfig:
    """test_jobs' tiny run, scoring the eval file whole (the default) and not before training."""
    return tiny_job(tiny_dir, pc_file, output, **{"eval_size": None, "eval_before": False, **kw})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_dir, pc_file):
    out = tmp_path_factory.mktemp("runs") / "run"
    run_job(_job(tiny_dir, pc_file, out))
    return out


def test_eval_takes_a_run_directory_and_the_whole_eval_file(run_dir, tiny_dir, pc_file, capsys):
    lines = []
    by_run = run_eval(EvalConfig(model=str(tiny_dir), adapter=str(run_dir), data=str(pc_file), max_new_tokens=6),
                      say=lambda *p: lines.append(" ".join(p)))
    by_dir = run_eval(EvalConfig(model=str(tiny_dir), adapter=str(run_dir / "adapter"), data=str(pc_file),
                                 max_new_tokens=6))
    assert by_run["adapter"] == str(run_dir / "adapter") and by_run["exact_match"] == by_dir["exact_match"]
    assert by_run["n"] == len(WORDS)  # a data file is evaluated whole by default
    assert lines[0].startswith(f"evaluating on all {len(WORDS)} held-out examples of {pc_file}")
    sampled = run_eval(EvalConfig(model=str(tiny_dir), adapter=str(run_dir), data=str(pc_file), eval_size=5,
                                  max_new_tokens=6))
    assert sampled["n"] == 5
    assert cli.main(["eval", "--model", str(tiny_dir), "--adapter", str(run_dir), "--data", str(pc_file),
                     "--max-new-tokens", "6", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == len(WORDS)
    with pytest.raises(JobError, match=r"no adapter_config.json there, nor in .*adapter"):
        run_eval(EvalConfig(model=str(tiny_dir), adapter=str(run_dir / "checkpoints"), data=str(pc_file)))


def test_training_scores_the_whole_eval_file_and_tasks_keep_their_sample(run_dir):
    summary = json.loads((run_dir / "run.json").read_text())
    assert summary["eval"]["n"] == len(WORDS)
    records = list(range(500))
    chosen, which = pick_eval_records(records, EvalConfig(), "t", from_task=True)
    assert len(chosen) == 200
    assert which.startswith("evaluating on a fixed sample of 200 of the 500 held-out examples of t (")
    chosen, which = pick_eval_records(records, EvalConfig(), "f.jsonl", from_task=False)
    assert chosen == records and which == "evaluating on all 500 held-out examples of f.jsonl"
    assert len(pick_eval_records(records, EvalConfig(eval_size=0), "t", from_task=True)[0]) == 500


def _checkpoints(out):
    return sorted(p.name for p in (out / "checkpoints").glob("step-*"))


def test_keep_checkpoints_keeps_the_newest_and_the_best(tmp_path, tiny_dir, pc_file):
    out = tmp_path / "run"
    run_job(_job(tiny_dir, pc_file, out, steps=6, save_every=1, eval_every=1, keep_checkpoints=1, lr=0.3))
    losses = {r["step"]: r["eval_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if "eval_loss" in r}
    best = min(losses, key=losses.get)
    assert _checkpoints(out) == sorted({f"step-{best:06d}", "step-000006"})
    assert ckpt.best_checkpoint(out / "checkpoints") == f"step-{best:06d}"
    everything = tmp_path / "all"
    run_job(_job(tiny_dir, pc_file, everything, save_every=1, keep_checkpoints=0))
    assert _checkpoints(everything) == [f"step-{i:06d}" for i in range(1, 5)]
    with pytest.raises(ValueError, match="keep_checkpoints must be >= 0"):
        run_job(_job(tiny_dir, pc_file, tmp_path / "bad", keep_checkpoints=-1))


def _full_disk_at(monkeypatch, where: str, module, exc):
    real = module.save_file

    def save_file(tensors, path, *a, **kw):
        if where in str(path):
            raise exc
        return real(tensors, path, *a, **kw)
    monkeypatch.setattr(module, "save_file", save_file)


def test_a_failed_checkpoint_names_the_file_and_the_intact_checkpoint(tmp_path, tiny_dir, pc_file, monkeypatch,
                                                                       capsys):
    out = tmp_path / "run"
    _full_disk_at(monkeypatch, "step-000004", ckpt, OSError(errno.ENOSPC, "No space left on device"))
    argv = ["train", "--model", str(tiny_dir), "--data", str(pc_file), "--output", str(out), "--steps", "6",
            "--batch-size", "4", "--r", "4", "--save-every", "2", "--no-progress", "--no-forgetting",
            "--no-eval-before"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert f"could not write {out / 'checkpoints' / 'step-000004' / 'trainable.safetensors'}" in err
    assert "No space left on device); free disk space, then the last good checkpoint" in err
    assert f"{out / 'checkpoints' / 'step-000002'} is intact; continue from it with --resume" in err
    # the earlier checkpoint is whole, `latest` names it, and nothing half-written is left
    assert _checkpoints(out) == ["step-000002"] and ckpt.latest_checkpoint(out).name == "step-000002"
    assert not list((out / "checkpoints").glob(".*"))
    for f in ("trainable", "optimizer", "rng"):
        assert load_file(str(out / "checkpoints" / "step-000002" / f"{f}.safetensors"))
    monkeypatch.undo()
    assert cli.main(argv + ["--resume", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 6


def test_a_failed_adapter_save_names_the_file_and_the_last_checkpoint(tmp_path, tiny_dir, pc_file, monkeypatch):
    from peftlab.core import io
    out = tmp_path / "run"
    _full_disk_at(monkeypatch, f"{out / 'adapter'}", io,
                  SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"))
    with pytest.raises(ckpt.CheckpointWriteError) as e:
        run_job(_job(tiny_dir, pc_file, out, save_every=2))
    msg = str(e.value)
    assert msg.startswith(f"could not write {out / 'adapter' / 'adapter_model.safetensors'} (Error while")
    assert f"free disk space, then the last good checkpoint {out / 'checkpoints' / 'step-000004'} is intact" in msg
    assert "step-000004" in _checkpoints(out)
