"""The job layer (peftlab.train.jobs): run_job/run_eval from Python, JobConfig.from_dict, and the command line
as a thin shell over it (same summary for the same config; its flags are exactly the configs' fields)."""
from __future__ import annotations

import json

import pytest

from peftlab import cli
from peftlab.train.jobs import EvalConfig, JobConfig, JobError, MergeConfig, run_eval, run_job
from test_train import WORDS, save_tiny_model_dir

SUMMARY_KEYS = {"command", "model", "method", "task", "kind", "quantize", "double_quant", "compute_dtype", "loftq",
                "steps", "batch_size", "lr", "trainable_params", "total_params", "train_loss_first", "train_loss_last",
                "train_tokens", "tokens_per_s", "grouped_by_length", "train_s",
                "eval_before", "eval", "forgetting", "saved", "wall_s"}
TIMINGS = {"tokens_per_s", "train_s", "wall_s"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def pc_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("data") / "pc.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"Q: {w}?\nA:", "completion": " " + w[::-1]}) + "\n" for w in WORDS))
    return f


def tiny_job(tiny_dir, pc_file, output, **kw) -> JobConfig:
    return JobConfig(**{**dict(model=str(tiny_dir), data=str(pc_file), eval_data=str(pc_file), output=str(output),
                               steps=4, batch_size=4, lr=1e-2, r=4, target_modules="all-linear", max_new_tokens=6,
                               eval_size=4, progress=False, forgetting=False), **kw})


def test_run_job_from_python_returns_the_summary_and_writes_run_json(tmp_path, tiny_dir, pc_file):
    lines = []
    summary = run_job(tiny_job(tiny_dir, pc_file, tmp_path / "run"), say=lambda *p: lines.append(" ".join(p)))
    assert set(summary) == SUMMARY_KEYS
    assert summary["steps"] == 4 and summary["method"] == "lora" and summary["kind"] == "generation"
    assert summary["eval_before"]["n"] == 4 and summary["eval"]["n"] == 4 and summary["forgetting"] is None
    assert json.loads((tmp_path / "run" / "run.json").read_text()) == json.loads(json.dumps(summary))
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    assert lines[0].startswith("peftlab train: lora on") and lines[-1].startswith("saved ")
    # run_eval on the saved adapter scores what the run's own evaluation after training did
    ev = run_eval(EvalConfig(model=str(tiny_dir), adapter=summary["saved"], data=str(pc_file), eval_size=4,
                             max_new_tokens=6))
    assert ev["exact_match"] == summary["eval"]["exact_match"] and ev["n"] == 4
    # given the run directory, eval takes the base model from its run.json (a data-file run names no task)
    ev_run = run_eval(EvalConfig(adapter=str(tmp_path / "run"), data=str(pc_file), eval_size=4, max_new_tokens=6))
    assert ev_run["model"] == str(tiny_dir) and ev_run["exact_match"] == ev["exact_match"]
    with pytest.raises(JobError, match="exactly one of --task NAME"):
        run_eval(EvalConfig(adapter=str(tmp_path / "run")))


def test_eval_and_merge_take_unset_options_from_the_train_run(tmp_path):
    from peftlab.train.jobs.inputs import with_run_defaults
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"model": "smollm2-135m", "task": "wordnet-antonyms",
                                              "quantize": "nf4", "double_quant": False, "compute_dtype": None}))
    for adapter in (run, run / "adapter"):
        c = with_run_defaults(EvalConfig(adapter=str(adapter)))
        assert (c.model, c.task, c.quantize, c.double_quant) == ("smollm2-135m", "wordnet-antonyms", "nf4", False)
    given = with_run_defaults(EvalConfig(adapter=str(run), model="other", data="x.jsonl", quantize="int8"))
    assert (given.model, given.task, given.data, given.quantize) == ("other", None, "x.jsonl", "int8")
    m = with_run_defaults(MergeConfig(adapter=str(run)))
    assert (m.model, m.quantize) == ("smollm2-135m", "nf4")
    assert with_run_defaults(EvalConfig(adapter=str(tmp_path))) == EvalConfig(adapter=str(tmp_path))


def test_cli_and_run_job_give_the_same_summary(capsys, tmp_path, tiny_dir, pc_file):
    argv = ["train", "--model", tiny_dir, "--data", pc_file, "--eval-data", pc_file, "--output", tmp_path / "cli",
            "--steps", 4, "--batch-size", 4, "--lr", 1e-2, "--r", 4, "--target-modules", "all-linear",
            "--max-new-tokens", 6, "--eval-size", 4, "--no-progress", "--no-forgetting", "--json"]
    assert cli.main([str(a) for a in argv]) == 0
    from_cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    from_python = json.loads(json.dumps(run_job(tiny_job(tiny_dir, pc_file, tmp_path / "py"))))
    assert from_cli["saved"] == str(tmp_path / "cli" / "adapter")
    assert from_python["saved"] == str(tmp_path / "py" / "adapter")
    same = SUMMARY_KEYS - TIMINGS - {"saved"}
    assert {k: from_cli[k] for k in same} == {k: from_python[k] for k in same}


def test_from_dict_takes_yaml_spellings_and_refuses_unknown_keys():
    c = JobConfig.from_dict({"model": "m", "batch-size": 4, "--grad-accum": 2, "lr": "1e-3", "set": {"r": 2}})
    assert (c.batch_size, c.grad_accum, c.lr, c.set) == (4, 2, 1e-3, {"r": 2})  # YAML 1.1 reads 1e-3 as a string
    with pytest.raises(JobError, match=r"unknown key 'batchsize' \(did you mean 'batch_size'\?\)"):
        JobConfig.from_dict({"batchsize": 3})
    with pytest.raises(JobError, match="unknown key 'eval_data'"):
        EvalConfig.from_dict({"eval_data": "x.jsonl"})  # each command's config has its own flags only
    with pytest.raises(JobError, match="steps: expected a number, got 'many'"):
        JobConfig.from_dict({"steps": "many"})


def test_cli_flags_are_exactly_the_config_fields_and_take_their_defaults():
    for command, cls in cli.CONFIGS.items():
        assert {cli._dest(f) for f, _ in cli.TABLES[command]} == set(cls.fields()), command
    assert (JobConfig().batch_size, JobConfig().save_every, JobConfig().forgetting, EvalConfig().forgetting) == \
        (8, 50, True, False)
    assert cli.defaults("train")["method"] == "lora" and cli.defaults("merge") == {
        "config": None, "json": False, **MergeConfig.fields()}


def test_user_errors_are_job_errors(tmp_path, tiny_dir, pc_file):
    with pytest.raises(JobError, match="--r: method 'bitfit' has no such setting"):
        run_job(tiny_job(tiny_dir, pc_file, tmp_path / "b", method="bitfit", target_modules=None))
    with pytest.raises(JobError, match="torchrun"):
        run_job(tiny_job(tiny_dir, pc_file, tmp_path / "n", nproc=2))
    with pytest.raises(JobError, match="train needs --model"):
        run_job(JobConfig(data=str(pc_file)))
    with pytest.raises(JobError, match="--set rr: LoraConfig has no field 'rr'"):
        run_job(tiny_job(tiny_dir, pc_file, tmp_path / "s", set=["rr=3"]))
    assert issubclass(JobError, ValueError)


@pytest.mark.slow
def test_run_job_on_the_real_minilm_classifies(tmp_path):
    """The real MiniLM-L6 (a BERT encoder with a new classification head) through run_job and run_eval."""
    from peftlab.models import is_fetched
    if not is_fetched("minilm-l6"):
        pytest.skip("minilm-l6 is not in the cache (make test fetches it: scripts/install_data.sh)")
    data = tmp_path / "cls.jsonl"
    rows = [{"text": f"the {w} is here", "label": "long" if len(w) > 3 else "short"} for w in WORDS]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = run_job(JobConfig(model="minilm-l6", data=str(data), eval_data=str(data), output=str(tmp_path / "r"),
                                steps=3, batch_size=4, r=4, progress=False, eval_before=False))
    assert summary["kind"] == "classification" and summary["steps"] == 3 and summary["forgetting"] is None
    assert json.loads((tmp_path / "r" / "adapter" / "labels.json").read_text()) == {"labels": ["long", "short"]}
    ev = run_eval(EvalConfig(model="minilm-l6", adapter=summary["saved"], data=str(data)))
    assert ev["accuracy"] == summary["eval"]["accuracy"] and ev["n"] == len(rows)


def test_group_by_length_from_the_command_line_reaches_the_batches(tmp_path, tiny_dir, pc_file):
    """`--group-by-length` / `--no-group-by-length` (YAML key group_by_length) decide the batching; the summary says
    which was used."""
    from peftlab.cli import main
    base = ["train", "--model", str(tiny_dir), "--data", str(pc_file), "--steps", "2", "--batch-size", "4",
            "--r", "4", "--target-modules", "all-linear", "--no-progress", "--no-forgetting", "--no-eval-before",
            "--eval-size", "2", "--max-new-tokens", "2"]
    for flag, grouped in (("--group-by-length", True), ("--no-group-by-length", False)):
        out = tmp_path / flag.strip("-")
        assert main(base + [flag, "--output", str(out)]) == 0
        assert json.loads((out / "run.json").read_text())["grouped_by_length"] is grouped
