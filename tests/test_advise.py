"""peftlab advise: the ranking follows from a results file's measurements and the constraints (one scoring
function), so a different results file changes it and each constraint moves the methods it concerns."""
from __future__ import annotations

import json

import pytest

from peftlab import cli
from peftlab.bench.advise import DEFAULT_RESULTS, advise, model_params
from peftlab.train.jobs import JobError

BENCH_PARAMS = 20_000_000


def row(method, category, score, *, mergeable=True, latency=1.0, memory_mb=100, forgetting=1.0, adapter_mb=0.3,
        trainable_pct=0.4, step=1.1):
    return {"method": method, "category": category, "kind": "delta-weight", "status": "ok", "score": score,
            "mergeable": mergeable, "latency_unmerged": latency, "latency_merged": 1.0 if mergeable else None,
            "peak_memory_bytes": memory_mb * 1e6, "forgetting_pct": forgetting, "adapter_bytes": adapter_mb * 1e6,
            "trainable_pct": trainable_pct, "step_ratio": step, "seeds": [0]}


# Four methods whose measured trade-offs differ on purpose: the best score but a whole model per task and the
# most memory (full), an unmergeable adapter that forgets (adapter), a mergeable low-rank method (lora), and a
# tiny but weak one (prompt).
ROWS = [row("full", "full", 0.83, memory_mb=470, adapter_mb=80, trainable_pct=100, forgetting=0.5, step=1.8),
        row("adapter", "additive", 0.815, mergeable=False, latency=1.15, forgetting=20),
        row("lora", "reparameterized", 0.80, forgetting=2),
        row("prompt", "additive", 0.70, mergeable=False, latency=1.3, adapter_mb=0.02, trainable_pct=0.01)]


def results_file(tmp_path, rows, name="results.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"config": {"model": "bench-model"}, "base": {"total_params": BENCH_PARAMS,
                                                                             "score_metric": "accuracy"},
                                "rows": rows}))
    return str(path)


def ranking(tmp_path, rows=ROWS, memory_gb=8.0, model="20m", **kw):
    return [c["method"] for c in advise(model, memory_gb, results=results_file(tmp_path, rows), top=10, **kw)["ranked"]]


def test_each_constraint_moves_the_methods_it_concerns(tmp_path):
    plain = ranking(tmp_path)
    assert plain[0] == "full" and plain[-1] == "prompt"
    # latency-critical: the unmergeable adapter (1.15x) falls behind the mergeable lora (1.0x once merged)
    fast = ranking(tmp_path, latency_critical=True)
    assert plain.index("adapter") < plain.index("lora") and fast.index("adapter") > fast.index("lora")
    # keep-knowledge: the adapter's 20% forgetting costs it its place
    keep = ranking(tmp_path, keep_knowledge=True)
    assert keep.index("adapter") > keep.index("lora")
    # many tasks: a whole model per task (full) drops below the adapters
    many = ranking(tmp_path, tasks=50)
    assert many.index("full") > many.index("lora")
    # continual learning weighs forgetting and per-task storage
    cont = ranking(tmp_path, continual=True)
    assert cont.index("full") > cont.index("lora") and cont.index("adapter") > cont.index("lora")
    # memory: full needs 470 MB at the bench's size; at 0.3 GB it does not fit
    small = advise("20m", 0.3, results=results_file(tmp_path, ROWS))
    assert "full" not in [c["method"] for c in small["ranked"]] and ("full", 0.5) in small["does_not_fit"]


def test_memory_and_parameters_scale_with_the_model_and_ratios_do_not(tmp_path):
    path = results_file(tmp_path, ROWS)
    small, big = advise("20m", 1000, results=path), advise("2b", 1000, results=path)
    assert big["scale"] == pytest.approx(100 * small["scale"])
    s, b = ({c["method"]: c for c in a["ranked"]} for a in (small, big))
    assert b["lora"]["memory_gb"] == pytest.approx(100 * s["lora"]["memory_gb"])
    assert b["lora"]["trainable_params"] == pytest.approx(100 * s["lora"]["trainable_params"], rel=1e-6)
    assert b["lora"]["step_ratio"] == s["lora"]["step_ratio"] and b["lora"]["score"] == s["lora"]["score"]
    # the same 8 GB that holds full fine-tuning of a 20M model does not hold it for 2B parameters
    assert "full" in ranking(tmp_path, memory_gb=8) and "full" not in ranking(tmp_path, memory_gb=8, model="2b")


def test_a_different_results_file_changes_the_advice(tmp_path):
    swapped = [dict(r, score={"lora": 0.83, "full": 0.79}.get(r["method"], r["score"])) for r in ROWS]
    assert ranking(tmp_path)[0] == "full" and ranking(tmp_path, rows=swapped)[0] == "lora"


def test_reasons_cite_the_measured_numbers(tmp_path):
    top = advise("20m", 8, latency_critical=True, results=results_file(tmp_path, ROWS))["ranked"]
    adapter = next(c for c in top if c["method"] == "adapter")
    assert any("1.15× the base (not mergeable)" in r for r in adapter["reasons"])
    assert any("accuracy 81.5" in r for r in adapter["reasons"])


def test_model_sizes_and_bad_input():
    assert model_params("7b") == 7_000_000_000 and model_params("350M") == 350_000_000
    assert model_params("smollm2-135m") == 134_515_008
    with pytest.raises(JobError, match="not a size"):
        model_params("no-such-model")
    with pytest.raises(JobError, match="memory-gb"):
        advise("7b", 0)


@pytest.mark.skipif(not DEFAULT_RESULTS.is_file(), reason="no shipped results (peftlab bench --config survey-table)")
def test_cli_advises_from_the_shipped_results(capsys):
    assert cli.main(["advise", "--model", "7b", "--memory-gb", "80", "--latency-critical", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["results"] == str(DEFAULT_RESULTS) and out["ranked"] and out["ranked"][0]["reasons"]
    assert all(c["mergeable"] for c in out["ranked"][:3])  # latency-critical: nothing that adds latency on top
