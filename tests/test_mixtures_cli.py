"""Mixtures from the command line: TT-LoRA MoE's two stages, routing statistics in train/eval JSON, MoE-LoRA
refusing `peftlab merge`."""
from __future__ import annotations

import json

from test_cli import files, run, tiny_dir  # noqa: F401  (fixtures)

FAST = ["--no-progress", "--no-forgetting", "--no-eval-before", "--json"]


def test_tt_lora_moe_two_stages_from_the_cli(capsys, tmp_path, tiny_dir, files):  # noqa: F811
    rows = [json.loads(line) for line in files["pc"].read_text().splitlines()]
    halves = [rows[: len(rows) // 2], rows[len(rows) // 2:]]
    stage1 = []
    for i, part in enumerate(halves):
        data = tmp_path / f"task{i}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in part))
        out = tmp_path / f"task{i}"
        code, res, cap = run(capsys, "train", "--model", tiny_dir, "--method", "tt-lora", "--data", data,
                             "--output", out, "--steps", 3, "--batch-size", 2, *FAST)
        assert code == 0, cap.err
        stage1.append(out / "adapter")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps({**r, "expert": i}) + "\n" for i, part in enumerate(halves) for r in part))
    out = tmp_path / "moe"
    code, res, cap = run(capsys, "train", "--model", tiny_dir, "--method", "tt-lora-moe", "--data", mixed,
                         "--eval-data", mixed, "--output", out, "--steps", 4, "--batch-size", 4, "--lr", 1e-2,
                         "--set", f"expert_dirs=[{stage1[0]},{stage1[1]}]", *FAST)
    assert code == 0, cap.err
    routing = res["routing"]["default"]
    assert set(routing) == {"all", res["task"]} and len(routing["all"]["mean_load"]) == 2
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("aux_loss" in r and "routing" in r for r in logged)   # the router's cross-entropy, logged
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "TT_LORA_MOE" and cfg["expert_dirs"] is None and cfg["num_experts"] == 2
    assert cfg["expert_names"] == ["task0", "task1"]
    code, ev, cap = run(capsys, "eval", "--model", tiny_dir, "--adapter", out / "adapter", "--data", mixed, "--json")
    assert code == 0, cap.err
    assert ev["routing"]["default"][ev["task"]]["layers"].keys() == routing["all"]["layers"].keys()


def test_moe_lora_train_logs_balance_loss_and_merge_is_refused(capsys, tmp_path, tiny_dir, files):  # noqa: F811
    out = tmp_path / "run"
    code, res, cap = run(capsys, "train", "--model", tiny_dir, "--method", "moe-lora", "--data", files["pc"],
                         "--output", out, "--steps", 4, "--batch-size", 2, "--log-every", 2,
                         "--set", "num_experts=3", "--set", "zero_expert=true", *FAST)
    assert code == 0, cap.err
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["aux_loss"] > 0 and len(r["routing"]) == 1 for r in logged if "loss" in r)
    code, _, cap = run(capsys, "merge", "--model", tiny_dir, "--adapter", out / "adapter", "--output",
                       tmp_path / "merged", "--json")
    assert code != 0 and "routes each token" in cap.err
