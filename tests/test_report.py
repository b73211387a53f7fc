"""Report files: JSON schema, CSV columns, the chosen recipe, the card table, the plots."""

import csv
import io
import json

import pytest
import yaml
from mergekit.config import MergeConfiguration
from rich.console import Console

from expo_eval.records import CandidateResult, Generation, ScoreStats
from expo_eval.report import print_table, write_report
from expo_eval.selection import Selection

RM, OTHER = "rm", "judge"
SELECTION = Selection(RM, "reward-max")
RECIPE = """\
# swept recipe
merge_method: expo
base_model: org/sft
models:
  - model: org/dpo
parameters:
  alpha: 0.3
dtype: bfloat16
"""


def result(alpha, split, rm, other, collapsed=False):
    label = "sft" if alpha is None else f"alpha={alpha:g}"
    return CandidateResult(
        alpha=alpha,
        label=label,
        split=split,
        n=4,
        scores={
            RM: ScoreStats(
                mean=rm, median=rm, stderr=0.1, win_rate=None if alpha in (None, 0) else 0.6
            ),
            OTHER: ScoreStats(mean=other, median=other, stderr=0.2),
        },
        mean_tokens=50.0 + 100 * (alpha or 0),
        length_cut_share=0.8 if collapsed else 0.0,
        repetition=0.5 if collapsed else 0.01,
        timing={"generate_s": 1.5, "score_s": 0.5},
        collapsed=collapsed,
        collapse_reasons=["80% of responses hit the length limit (alpha=0: 0%)"]
        if collapsed
        else [],
    )


@pytest.fixture
def sweep():
    results = []
    for split in ("select", "report"):
        results += [
            result(None, split, 0.5, 0.4),
            result(0.0, split, 1.0, 1.0),
            result(0.3, split, 1.6, 1.2),
            result(0.5, split, -1.0, -0.5, collapsed=True),
        ]
    chosen = next(r for r in results if r.alpha == 0.3 and r.split == "select")
    generations = {
        r.label: [
            Generation(
                prompt_id=f"p{i}",
                split="select",
                prompt="q",
                response="a",
                tokens=3,
                finish_reason="stop",
                scores={RM: r.score(RM) + i / 10, OTHER: 0.0},
            )
            for i in range(4)
        ]
        for r in results
    }
    return results, chosen, generations


@pytest.fixture
def report(tmp_path, sweep):
    results, chosen, generations = sweep
    write_report(tmp_path, results, chosen, RECIPE, SELECTION, ["a flag"], generations)
    return tmp_path


def test_results_json_schema(report, sweep):
    document = json.loads((report / "results.json").read_text())
    assert set(document) == {
        "schema_version",
        "selector",
        "selection",
        "chosen_alpha",
        "chosen_label",
        "flags",
        "timing",
        "inputs",
        "candidates",
    }
    assert (document["selector"], document["chosen_alpha"], document["flags"]) == (
        RM,
        0.3,
        ["a flag"],
    )
    assert document["selection"]["rule"] == "reward-max" and document["selection"]["scorer"] == RM
    candidates = [CandidateResult.model_validate(c) for c in document["candidates"]]
    assert sorted(c.model_dump_json() for c in candidates) == sorted(
        r.model_dump_json() for r in sweep[0]
    )
    assert [c.alpha for c in candidates[:2]] == [None, None]  # SFT first


def test_results_csv(report):
    rows = list(csv.DictReader(io.StringIO((report / "results.csv").read_text())))
    header = list(rows[0])
    assert header[:4] == ["alpha", "label", "split", "n"]
    assert header[4:12] == [
        f"{s}:{stat}" for s in (RM, OTHER) for stat in ("mean", "median", "stderr", "win_rate")
    ]
    assert header[12:] == [
        "mean_tokens",
        "length_cut_share",
        "repetition",
        "kl",
        "kl_stderr",
        "select_rule",
        "selection_value",
        "collapsed",
        "collapse_reasons",
        "timing:generate_s",
        "timing:score_s",
    ]
    assert len(rows) == 8
    collapsed = [r for r in rows if r["collapsed"] == "True"]
    assert {r["alpha"] for r in collapsed} == {"0.5"} and "length limit" in collapsed[0][
        "collapse_reasons"
    ]
    assert rows[0]["alpha"] == "" and rows[0]["label"] == "sft" and rows[0][f"{RM}:win_rate"] == ""


def test_best_yaml_is_the_recipe_with_the_chosen_alpha(report):
    text = (report / "best.yaml").read_text()
    assert text.startswith("# alpha = 0.3, chosen by the expo_eval sweep")
    assert RM in text.splitlines()[0]
    recipe, original = yaml.safe_load(text), yaml.safe_load(RECIPE)
    assert recipe["parameters"]["alpha"] == 0.3
    assert {k: v for k, v in recipe.items() if k not in ("parameters", "expo_sweep")} == {
        k: v for k, v in original.items() if k != "parameters"
    }
    assert recipe["expo_sweep"]["chosen_alpha"] == 0.3 and recipe["expo_sweep"]["rule"] == "reward-max"
    MergeConfiguration.model_validate(recipe)


def test_best_yaml_replaces_a_per_module_alpha(tmp_path, sweep):
    results, chosen, generations = sweep
    recipe = RECIPE.replace("alpha: 0.3", "alpha: [{filter: mlp, value: 0.5}, {value: 0.2}]")
    write_report(tmp_path, results, chosen, recipe, SELECTION, [], generations)
    assert yaml.safe_load((tmp_path / "best.yaml").read_text())["parameters"] == {"alpha": 0.3}


def test_card_table_uses_the_report_split(report):
    lines = (report / "card_table.md").read_text().splitlines()
    table = [line for line in lines if line.startswith("|")]
    assert table[0] == (
        f"| candidate | {RM} (mean ± stderr) | {OTHER} (mean ± stderr) "
        "| mean tokens | cut by length | collapsed |"
    )
    assert table[1] == "|---|---|---|---|---|---|"
    assert [row.split(" | ")[0] for row in table[2:]] == [
        "| sft",
        "| alpha=0",
        "| **alpha=0.3**",
        "| alpha=0.5",
    ]
    assert table[3] == "| alpha=0 | 1.000 ± 0.100 | 1.000 ± 0.200 | 50 | 0% | no |"
    assert table[5].endswith("| 80% | yes |")
    assert "report prompts" in lines[0]


def test_plots_are_written(report):
    for name in ("reward_vs_alpha.png", "reward_distributions.png"):
        data = (report / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000


def test_no_temporary_files_are_left(report):
    assert sorted(p.name for p in report.iterdir()) == sorted(
        [
            ".report-files.json",  # the report's own files, the only ones the next one removes
            "generations",
            "results.json",
            "results.csv",
            "best.yaml",
            "card_table.md",
            "reward_vs_alpha.png",
            "reward_distributions.png",
        ]
    )


def test_print_table_marks_chosen_and_collapsed(sweep):
    results, chosen, _ = sweep
    console = Console(record=True, width=200, force_terminal=True)
    print_table(results, chosen, SELECTION, console=console)
    text = console.export_text(clear=False)
    assert "reward-max on rm chooses alpha=0.3" in text
    assert text.count("chosen") == 2  # the chosen alpha's row on both splits
    assert text.count("collapsed:") == 2
    styled = console.export_html(inline_styles=True)
    assert "#008000" in styled and "#800000" in styled  # green chosen rows, red collapsed rows


def test_figure_labels_are_short_and_distinct():
    from expo_eval.report import recipe_subject, short_names

    names = ["/runs/7/reward_models/a", "expo_eval.demo.task:ground_truth", "Ray2333/RM-Mistral-7B",
             "/x/one/rm", "/y/one/rm", "org/ArmoRM#objective=2"]
    assert short_names(names) == {
        "/runs/7/reward_models/a": "reward_models/a",  # not just "a"
        "expo_eval.demo.task:ground_truth": "ground_truth",
        "Ray2333/RM-Mistral-7B": "RM-Mistral-7B",
        "/x/one/rm": "x/one/rm",  # two folders named the same: as much path as tells them apart
        "/y/one/rm": "y/one/rm",
        "org/ArmoRM#objective=2": "ArmoRM#objective=2",
    }
    assert short_names(["pkg.a:score", "pkg.b:score", "/runs/ab", "/runs/ab/"]) == {
        "pkg.a:score": "a:score", "pkg.b:score": "b:score", "/runs/ab": "/runs/ab", "/runs/ab/": "/runs/ab/"}
    assert recipe_subject(MergeConfiguration.model_validate(yaml.safe_load(RECIPE))) == "ExPO of dpo from sft"


def test_reward_vs_kl_marks_the_choice_and_its_labels_do_not_overlap():
    """Alphas 0, 0.25, 0.5 sit a hair apart in sqrt(KL); their labels must not print on top of each
    other; the title names the subject, alpha and rule; trust-region draws its edge."""
    from expo_eval.report import kl_figure

    def at(alpha, kl, score):
        stats = {name: ScoreStats(mean=score, median=score, stderr=0.05) for name in ("/m/rm_a", "/m/rm_b")}
        return CandidateResult(alpha=alpha, label=f"alpha={alpha:g}", split="select", n=100, scores=stats,
                               mean_tokens=20, length_cut_share=0, repetition=0, kl=kl, kl_stderr=0.002)

    results = [at(a, 0.02 * (1 + a) ** 2, 1 + 0.1 * a) for a in (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)]
    selection = Selection("/m/rm_a", "trust-region", others=("/m/rm_b",))
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = kl_figure(results, results[4], selection, "ExPO of dpo from sft")
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    assert fig.get_suptitle() == "ExPO of dpo from sft: alpha 1 chosen by trust-region"
    for ax in fig.axes:
        boxes = [text.get_window_extent(renderer) for text in ax.texts]
        assert len(boxes) >= 4 and "1" in [t.get_text() for t in ax.texts]  # the chosen alpha is always labelled
        assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
        assert ax.get_ylabel() in ("rm_a (chooses)", "rm_b (chooses)")
        assert any(line.get_linestyle() == "--" for line in ax.get_lines())  # the region's edge
