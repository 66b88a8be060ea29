"""peftlab bench on a tiny in-process model: the grid through the job layer, results.json after every cell, a
failing method recorded while the rest go on, --resume adding only new cells, seeds as mean ± sd, the Table 2
shaped markdown, the command line, and the HTML report opened in a real headless Chromium."""
from __future__ import annotations

import json
import shutil

import pytest
import yaml

from peftlab import cli
from peftlab.bench import load_bench_config, run_bench, write_reports
from peftlab.bench import runner as R
from peftlab.bench.table import markdown_table
from peftlab.train.jobs import JobError
from test_train import pc_records, save_tiny_model_dir

WORDS = ["abc", "hello", "world", "cat", "dog", "bird", "fish", "tree", "sun", "moon", "star", "rain", "sky", "sea"]


@pytest.fixture(scope="module")
def bench_file(tmp_path_factory):
    """A 2-step bench of a tiny LLaMA on prompt/completion files; vera gets an invalid rank, so it must fail;
    tt-lora-moe (stage 2 of a two-stage method) has no stage-1 runs here, so it is skipped with the reason."""
    d = tmp_path_factory.mktemp("bench")
    model = save_tiny_model_dir(d / "tiny")
    data = d / "pc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pc_records(WORDS)))
    cfg = {"model": str(model), "data": str(data), "eval_data": str(data), "steps": 2, "batch_size": 4,
           "eval_size": 6, "methods": ["lora", "vera", "tt-lora-moe"], "timing_rounds": 1, "timing_batch": 4, "forgetting_size": 4,
           "method_options": {"lora": {"lr": 0.01, "target_modules": "all-linear"}, "vera": {"r": -1}}}
    path = d / "tiny-bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def bench_run(bench_file, tmp_path_factory):
    """The CLI run everything else reads: lora and a failing vera, two seeds each."""
    out = tmp_path_factory.mktemp("out") / "bench"
    code = cli.main(["bench", "--config", str(bench_file), "--output", str(out), "--seeds", "2", "--no-progress",
                     "--json"])
    assert code == 0
    return out


def test_grid_records_every_cell_and_a_failing_method_does_not_stop_it(bench_run):
    res = json.loads((bench_run / "results.json").read_text())
    assert res["schema"] == "peftlab-bench/1" and set(res["cells"]) == {
        "lora@seed0", "lora@seed1", "vera@seed0", "vera@seed1", "tt-lora-moe@seed0", "tt-lora-moe@seed1"}
    vera = res["cells"]["vera@seed0"]
    assert vera["status"] == "failed" and "vera" in vera["error"].lower()
    moe = res["cells"]["tt-lora-moe@seed0"]
    assert moe["status"] == "skipped" and "builds on finished tt-lora runs, one per task" in moe["reason"]
    lora = res["cells"]["lora@seed0"]
    assert lora["status"] == "ok" and lora["category"] == "reparameterized" and lora["mergeable"]
    assert 0 < lora["trainable_pct"] < 100 and lora["adapter_bytes"] > 0 and lora["peak_memory_bytes"] > 0
    assert lora["step_ratio"] > 0 and lora["latency_unmerged"] > 0 and lora["latency_merged"] > 0
    assert lora["where"] == ["attention", "FFN"]  # all-linear on a LLaMA block
    assert set(lora["scores"]) == {"exact_match"} and lora["score"] == lora["scores"]["exact_match"]
    assert set(lora["forgetting"]) >= {"general_ppl", "definitions_acc"} and lora["forgetting_pct"] is not None
    assert not (bench_run / "runs" / "lora-seed0").exists()  # measured, then removed


def test_seeds_are_aggregated_as_mean_and_sd(bench_run):
    res = json.loads((bench_run / "results.json").read_text())
    rows = {r["method"]: r for r in res["rows"]}
    assert rows["vera"]["status"] == "failed" and rows["lora"]["seeds"] == [0, 1]
    cells = [res["cells"][f"lora@seed{s}"]["train_loss_last"] for s in (0, 1)]
    assert rows["lora"]["train_loss_last"] == pytest.approx(sum(cells) / 2)
    assert rows["lora"]["train_loss_last_sd"] == pytest.approx(abs(cells[0] - cells[1]) / 2 ** 0.5)


def test_markdown_table_has_the_survey_columns_and_a_row_per_method(bench_run):
    md = (bench_run / "table.md").read_text()
    assert md == markdown_table(json.loads((bench_run / "results.json").read_text()))
    header = next(line for line in md.splitlines() if line.startswith("| category"))
    for col in ("method", "where applied", "extra inference latency", "trainable %", "exact_match",
                "peak train memory", "step time vs frozen base"):
        assert col in header
    lora = next(line for line in md.splitlines() if "| lora |" in line)
    assert "none once merged" in lora and " ± " in lora  # two seeds: mean ± sd
    assert "failed: " in next(line for line in md.splitlines() if "| vera |" in line)
    assert "not run: it builds on finished tt-lora runs" in next(line for line in md.splitlines()
                                                                 if "| tt-lora-moe |" in line)


def test_resume_runs_only_new_and_failed_cells(bench_file, bench_run, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    shutil.copytree(bench_run, out)
    ran = []
    real = R.measure_cell
    monkeypatch.setattr(R, "measure_cell", lambda ctx, m, s, w: ran.append((m, s)) or real(ctx, m, s, w))
    cfg = load_bench_config(str(bench_file))
    res = run_bench(cfg, out, methods=["lora", "ia3", "vera"], resume=True, seeds=1, progress=False)
    # lora's finished cells are kept; ia3 (a method the first run lacked) is added; vera failed, so it is retried
    assert sorted(ran) == [("ia3", 0), ("vera", 0)]
    assert "lora@seed1" in res["cells"]  # fewer seeds asked: the extra seed's cell stays
    assert res["cells"]["lora@seed0"] == json.loads((bench_run / "results.json").read_text())["cells"]["lora@seed0"]
    assert [r["method"] for r in res["rows"]] == ["lora", "vera", "tt-lora-moe", "ia3"]


def test_resume_refuses_another_budget_and_a_rerun_needs_resume(bench_file, bench_run, tmp_path):
    out = tmp_path / "other"
    shutil.copytree(bench_run, out)
    cfg = load_bench_config(str(bench_file))
    with pytest.raises(JobError, match="add --resume"):
        run_bench(cfg, out, progress=False)
    cfg.steps = 3
    with pytest.raises(JobError, match="another budget .*steps"):
        run_bench(cfg, out, resume=True, progress=False)


def test_bad_input_errors_name_what_to_do(bench_file, tmp_path, capsys):
    with pytest.raises(JobError, match="Did you mean 'lora'"):
        run_bench(load_bench_config(str(bench_file)), tmp_path, methods=["lorra"], progress=False)
    with pytest.raises(JobError, match="Did you mean 'survey-table'"):
        load_bench_config("survey-tabel")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: x\ntask: wordnet-supersense\nstep: 3\n")
    with pytest.raises(JobError, match="did you mean 'steps'"):
        load_bench_config(str(bad))
    assert cli.main(["bench", "--config", "nope", "--output", str(tmp_path)]) == 2
    assert "Shipped: causal-lm, survey-table" in capsys.readouterr().err


def test_shipped_configs_cover_the_registry():
    from peftlab.bench.config import select_methods
    from peftlab.core.registry import list_methods
    survey = load_bench_config("survey-table")
    assert (survey.model, survey.task) == ("minilm-l6", "wordnet-supersense")
    assert select_methods(survey) == [m.name for m in list_methods()] and "full" in select_methods(survey)
    causal = load_bench_config("causal-lm")
    assert (causal.model, causal.task) == ("smollm2-135m", "wordnet-antonyms")


# -- the HTML report in a real browser ------------------------------------------------------------------------
def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("no Chromium on this machine: `make browser` (scripts/install_browser.sh) installs Debian's as root")


def test_report_renders_its_plots_in_headless_chromium(bench_run, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra (.[test])")
    res = json.loads((bench_run / "results.json").read_text())
    html = (bench_run / "report.html").read_text()
    assert "<script" in html and "cdn" not in html.lower().split("<body>")[0]  # plotly.js inline: opens offline
    errors = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto((bench_run / "report.html").resolve().as_uri())
        page.wait_for_selector("#plot-forgetting .main-svg", timeout=20000)
        ok = sum(r["status"] == "ok" for r in res["rows"])
        for plot in ("plot-trainable", "plot-memory", "plot-step", "plot-forgetting"):
            box = page.locator(f"#{plot} .main-svg").first.bounding_box()
            assert box and box["width"] > 100 and box["height"] > 100, plot
            assert page.locator(f"#{plot} .scatterlayer .point").count() >= ok, plot
        assert page.locator("#plot-trainable .xaxislayer-above .xtick").count() > 0
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert errors == []
    assert (tmp_path / "report.png").stat().st_size > 10_000
