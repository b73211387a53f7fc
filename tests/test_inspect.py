"""`mergekit-expo inspect`: streamed statistics, JSON, warnings, plot and bad input."""

import json
import shutil

import pytest
import torch
from conftest import expo_recipe, load, merge, run_cli
from safetensors.torch import load_file, save_file

from mergekit_expo import advice, stats
from mergekit_expo.diagnostics import inspect_pair
from mergekit_expo.tiny import build_family, build_tokenizer, tiny_config

CHANGE_KEYS = {
    "tensors", "numel", "changed", "changed_fraction", "frobenius", "normalized_frobenius",
    "relative_change", "cosine", "one_minus_cosine", "rounding",
}
LOSS_KEYS = {"alpha", "dtype", "moved", "rounded_back", "rounded_back_fraction", "kept", "kept_along_delta"}


@pytest.fixture(scope="module")
def sized(tmp_path_factory):
    """float32 pairs whose change matches Table 1: SFT -> DPO and pretrained -> SFT."""
    root = tmp_path_factory.mktemp("sized")
    dpo = build_family(str(root / "dpo"), aligned=("dpo",), dtype=torch.float32, scale=3e-4)
    sft = build_family(str(root / "sft"), aligned=("dpo",), dtype=torch.float32, scale=1e-2)
    return {"dpo": dpo, "sft": sft}


def test_streamed_totals_match_whole_model_float64(family):
    report = inspect_pair(str(family["sft"]), str(family["dpo"]), [0.3], ["bfloat16"])
    theta0, theta1 = load(family["sft"]), load(family["dpo"])
    assert [t.name for t in report.summary.tensors] == sorted(theta0)
    t0 = torch.cat([theta0[k].double().flatten() for k in sorted(theta0)])
    t1 = torch.cat([theta1[k].double().flatten() for k in sorted(theta0)])
    total = report.summary.total
    assert total.numel == t0.numel() and total.changed == int((t1 != t0).sum())
    assert total.frobenius == pytest.approx(float((t1 - t0).norm()), rel=1e-5)
    assert total.normalized_frobenius == pytest.approx(float((t1 - t0).square().mean().sqrt()), rel=1e-5)
    assert total.relative == pytest.approx(float((t1 - t0).norm() / t0.norm()), rel=1e-5)
    assert total.cosine == pytest.approx(float((t0 * t1).sum() / (t0.norm() * t1.norm())), abs=1e-12)


def test_json_schema_is_stable(family, tmp_path):
    report = inspect_pair(str(family["sft"]), str(family["dpo"]), [0.1, 0.3], ["bfloat16", "float32"])
    path = tmp_path / "inspect.json"
    report.write_json(str(path))
    data = json.loads(path.read_text())
    assert set(data) == {
        "schema", "sft", "aligned", "alphas", "out_dtypes", "total", "modules", "layers",
        "tensors", "skipped", "suggested_alpha_range", "warnings",
    }
    assert data["schema"] == "mergekit-expo.inspect/1"
    assert set(data["total"]) == CHANGE_KEYS
    assert [set(r) for r in data["total"]["rounding"]] == [LOSS_KEYS] * 4
    assert [(r["alpha"], r["dtype"]) for r in data["total"]["rounding"]] == [
        (0.1, "bfloat16"), (0.1, "float32"), (0.3, "bfloat16"), (0.3, "float32")
    ]
    assert list(data["modules"]) == ["embeddings", "attention", "mlp", "norm", "lm_head"]
    assert [layer["layer"] for layer in data["layers"]] == [0, 1]
    assert set(data["layers"][0]) == CHANGE_KEYS | {"layer"}
    assert set(data["tensors"][0]) == CHANGE_KEYS | {"name", "shape", "kind", "layer"}
    assert {w["code"] for w in data["warnings"]} <= {"collapse", "identical", "rounding"}


def test_collapse_warning_fires_for_a_pretrained_to_sft_sized_change(sized):
    report = inspect_pair(sized["sft"]["sft"], sized["sft"]["dpo"], [0.3], ["float32"])
    assert report.summary.total.normalized_frobenius > 1e-4
    assert [a.code for a in report.alerts] == ["collapse"]
    assert "section 4.3" in report.alerts[0].message


def test_no_warning_for_a_dpo_sized_change(sized):
    report = inspect_pair(sized["dpo"]["sft"], sized["dpo"]["dpo"], [0.3], ["float32"])
    assert 3e-6 < report.summary.total.normalized_frobenius < 1e-5
    assert report.alerts == []
    assert report.suggested_alphas == (0.1, 0.5)
    in_bf16 = inspect_pair(sized["dpo"]["sft"], sized["dpo"]["dpo"], [0.3], ["bfloat16"])
    assert "collapse" not in [a.code for a in in_bf16.alerts]


@pytest.mark.parametrize("share, best", [(0.1, 8.0), (0.2, 2.5), (0.4, 0.5), (1.0, 0.3)])
def test_suggested_range_covers_the_papers_optima(share, best):
    """Table 2: a partly trained model's change is a share of the full one."""
    n = 10**6
    total = stats.Change(tensors=1, numel=n, delta_sq=n * (share * advice.SFT_TO_DPO) ** 2)
    low, high = advice.suggested_alphas(total)
    assert low <= best <= high


def test_identical_models_warn(family):
    report = inspect_pair(str(family["sft"]), str(family["sft"]), [0.3], ["bfloat16"])
    assert [a.code for a in report.alerts] == ["identical"]


def test_merge_statistics_match_inspect(family, tmp_path):
    with stats.observing() as collector:
        merge(expo_recipe(family, alpha=0.3, dtype="float16"), tmp_path)
    merged = collector.summary().total
    inspected = inspect_pair(str(family["sft"]), str(family["dpo"]), [0.3], ["float16"]).summary.total
    assert merged.numel == inspected.numel and merged.changed == inspected.changed
    assert merged.delta_sq == pytest.approx(inspected.delta_sq, rel=1e-5)  # float32 dots
    loss, expected = merged.loss("float16"), inspected.loss("float16", 0.3)
    assert loss.rounded_back == expected.rounded_back
    assert loss.kept == pytest.approx(expected.kept, rel=1e-5)


# ------------------------------------------------------------------ command line


def test_cli_writes_json_and_plot(family, tmp_path):
    result = run_cli(
        "mergekit-expo", "inspect", family["sft"], family["dpo"], "--alpha", "0.3", "--alpha", "0.5",
        "--json", tmp_path / "out.json", "--plot", tmp_path / "layers.png",
    )
    assert "Rounding loss" in result.stdout and "Suggested alpha search range" in result.stdout
    data = json.loads((tmp_path / "out.json").read_text())
    assert data["alphas"] == [0.3, 0.5] and data["out_dtypes"] == ["bfloat16", "float16", "float32"]
    assert (tmp_path / "layers.png").read_bytes()[:4] == b"\x89PNG"


def assert_cli_fails(sft, aligned, *messages):
    result = run_cli("mergekit-expo", "inspect", sft, aligned, check=False)
    assert result.returncode != 0
    for message in messages:
        assert message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_cli_missing_model(family, tmp_path):
    assert_cli_fails(family["sft"], tmp_path / "nowhere", f"{tmp_path / 'nowhere'}: no such model folder")


def test_cli_different_shapes(family, tmp_path):
    config = tiny_config(len(build_tokenizer()), intermediate_size=160)
    wide = build_family(str(tmp_path / "wide"), aligned=("dpo",), config=config)
    assert_cli_fails(family["sft"], wide["dpo"], "model.layers.0.mlp.", "(64, 160)", "(64, 128)")


def test_cli_different_architectures(family, tmp_path):
    other = shutil.copytree(family["dpo"], tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    config.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (other / "config.json").write_text(json.dumps(config))
    assert_cli_fails(family["sft"], other, "different architectures", "MistralForCausalLM")


def test_cli_missing_tensor_and_damaged_file(family, tmp_path):
    broken = shutil.copytree(family["dpo"], tmp_path / "broken")
    weights = broken / "model.safetensors"
    state = load_file(weights)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, weights, metadata={"format": "pt"})
    assert_cli_fails(family["sft"], broken, "model.layers.1.mlp.up_proj.weight: missing from", str(broken))
    weights.write_bytes(weights.read_bytes()[:-100])
    assert_cli_fails(family["sft"], broken, f"{weights}: truncated")


@pytest.mark.parametrize("alpha", ["-1", "nan", "inf"])
def test_bad_alpha_is_rejected(family, alpha):
    result = run_cli("mergekit-expo", "inspect", family["sft"], family["dpo"], "--alpha", alpha, check=False)
    assert result.returncode != 0 and "alpha must be a finite number greater than -1" in result.stderr



@pytest.mark.parametrize("side, value", [("sft", float("nan")), ("aligned", float("inf"))])
def test_cli_names_a_tensor_that_is_not_finite(family, tmp_path, side, value):
    """Refused, as the merge refuses it, instead of a report of NaN figures."""
    broken = shutil.copytree(family["sft" if side == "sft" else "dpo"], tmp_path / "broken")
    weights = broken / "model.safetensors"
    state = load_file(weights)
    state["model.layers.1.mlp.up_proj.weight"][0, 3] = value
    save_file(state, weights, metadata={"format": "pt"})
    sft, aligned = (broken, family["dpo"]) if side == "sft" else (family["sft"], broken)
    role = "theta0, the SFT model" if side == "sft" else "theta1, the aligned model"
    assert_cli_fails(sft, aligned, f"model.layers.1.mlp.up_proj.weight: 1 NaN or Inf value(s) in {broken} ({role})")


def test_cli_refuses_an_unsupported_plot_format_up_front(family, tmp_path):
    result = run_cli("mergekit-expo", "inspect", family["sft"], tmp_path / "nowhere", "--plot", tmp_path / "x.xyz", check=False)
    assert result.returncode == 2 and "--plot" in result.stderr and ".xyz" in result.stderr
    assert "no such model folder" not in result.stderr  # refused before reading the pair


def test_cli_refuses_an_overflowing_theta2_and_writes_no_nan(family, tmp_path):
    big = shutil.copytree(family["dpo"], tmp_path / "big")
    weights = big / "model.safetensors"
    state = load_file(weights)
    state["model.layers.1.mlp.up_proj.weight"][0, 3] = 3e38  # finite in bfloat16
    save_file(state, weights, metadata={"format": "pt"})
    assert_cli_fails(family["sft"], big, "model.layers.1.mlp.up_proj.weight: theta2 overflows bfloat16 at alpha 0.3")
    result = run_cli("mergekit-expo", "inspect", family["sft"], family["dpo"], "--alpha", "1e38", "--json", tmp_path / "a.json", check=False)
    assert result.returncode == 1 and "theta2 overflows" in result.stderr and not (tmp_path / "a.json").exists()


def test_json_refuses_nan_rather_than_writing_invalid_json(family, tmp_path):
    import dataclasses

    report = dataclasses.replace(inspect_pair(str(family["sft"]), str(family["dpo"])), alphas=(float("nan"),))
    with pytest.raises(ValueError):
        report.write_json(str(tmp_path / "nan.json"))
    assert not (tmp_path / "nan.json").exists()


def test_inspect_warns_about_configs_and_names_skipped_tensors(family, tmp_path):
    aligned = shutil.copytree(family["dpo"], tmp_path / "aligned")
    config = json.loads((aligned / "config.json").read_text())
    (aligned / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": not config.get("tie_word_embeddings", True)}))
    weights = aligned / "model.safetensors"
    state = load_file(weights)
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"].to(torch.int8)
    save_file(state, weights, metadata={"format": "pt"})
    sft = shutil.copytree(family["sft"], tmp_path / "sft")
    result = run_cli("mergekit-expo", "inspect", sft, aligned)
    out = " ".join(result.stdout.split())
    assert "tie_word_embeddings differs" in out and "not floating point: model.layers.0.mlp.up_proj.weight" in out
    (sft / "config.json").write_text("{")
    out = " ".join(run_cli("mergekit-expo", "inspect", sft, aligned).stdout.split())
    assert "cannot be read" in out  # rich may fold the long path before it
    (sft / "config.json").unlink()
    out = " ".join(run_cli("mergekit-expo", "inspect", sft, aligned).stdout.split())
    assert "no config.json" in out
