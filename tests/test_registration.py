"""`expo` reaches unmodified mergekit through the installed start-up hook."""

import subprocess
import sys

import yaml
from conftest import REPO, expo_recipe, load, run_cli, write_recipe


def python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


def test_plain_mergekit_import_sees_expo():
    assert python("import mergekit.merge_methods as m; print(m.get('expo').spec.name)") == "expo"


def test_start_up_imports_nothing_heavy():
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True
    )
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines()}
    assert "_mergekit_expo_startup" in imported
    heavy = {m for m in imported if m.split(".")[0] in {"torch", "mergekit", "mergekit_expo", "transformers", "numpy"}}
    assert not heavy


IMPORT_ORDERS = [
    "mergekit_expo", "mergekit.merge", "mergekit.card", "mergekit.plan", "mergekit.merge_methods.registry",
    "mergekit.scripts.run_yaml", "mergekit_expo.compat", "mergekit_expo.run",
]


def test_every_import_order_registers_once_and_routes_run_merge():
    for first in IMPORT_ORDERS:
        out = python(
            f"import {first}, mergekit_expo, importlib\n"
            "import mergekit.merge as mm, mergekit.merge_methods as m, mergekit.plan as p\n"
            "mergekit_expo.register(); mergekit_expo.install()\n"
            "importlib.reload(mergekit_expo)\n"
            "print(sum(x.spec.name == 'expo' for x in m.registered_methods()),"
            " mm.run_merge.__expo_routed__, p.MergePlanner.plan_to_disk.__expo_routed__,"
            " mm.run_merge.__wrapped__.__module__)"
        )
        assert out == "1 True True mergekit.merge", first


def test_public_method_api_alone_loads_no_mergekit_internals():
    """`import mergekit.merge_methods` registers expo; compat waits for mergekit.merge."""
    out = python(
        "import sys, mergekit.merge_methods as m\n"
        "print(m.get('expo').spec.name, 'mergekit_expo.compat' in sys.modules)"
    )
    assert out == "expo False"


def test_compat_names_what_an_incompatible_mergekit_lacks():
    code = (
        "import sys, mergekit.card, mergekit.merge\n"
        "del mergekit.card.CARD_TEMPLATE, mergekit.merge._get_donor_model\n"
        "sys.modules.pop('mergekit_expo.compat')\n"
        "try:\n"
        "    import mergekit_expo.compat\n"
        "except ImportError as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    out = python(code)
    assert out.startswith("IncompatibleMergekit")
    assert "mergekit.card.CARD_TEMPLATE" in out and "mergekit.merge._get_donor_model" in out


def test_processes_spawned_by_mergekit_see_expo(tmp_path):
    code = (
        "import multiprocessing as mp\n"
        "def probe(_):\n"
        "    import mergekit.merge_methods as m\n"
        "    return m.get('expo').spec.name\n"
        "if __name__ == '__main__':\n"
        "    with mp.get_context('spawn').Pool(1) as pool:\n"
        "        print(pool.map(probe, [0])[0])\n"
    )
    script = tmp_path / "spawn.py"
    script.write_text(code)
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "expo"


def test_mergekit_yaml_console_script(family, tmp_path):
    recipe = write_recipe(tmp_path / "expo.yaml", expo_recipe(family))
    run_cli("mergekit-yaml", recipe, tmp_path / "out")
    assert "expo" in (tmp_path / "out" / "README.md").read_text()
    assert load(tmp_path / "out")["lm_head.weight"].dtype.is_floating_point


def test_mergekit_multi_composes_linear_then_expo(family, tmp_path):
    """Stage one averages the aligned models (linear); stage two extrapolates it."""
    stages = [
        {
            "name": "aligned_mean",
            "merge_method": "linear",
            "models": [
                {"model": str(family["dpo"]), "parameters": {"weight": 1.0}},
                {"model": str(family["dpo_b"]), "parameters": {"weight": 1.0}},
            ],
            "dtype": "float32",
        },
        {
            **expo_recipe(family, alpha=0.5, dtype="float32"),
            "models": [{"model": "aligned_mean"}],
        },
    ]
    recipe = tmp_path / "multi.yaml"
    recipe.write_text(yaml.safe_dump_all(stages, sort_keys=False))
    run_cli(
        "mergekit-multi", recipe, "--intermediate-dir", tmp_path / "stages", "--out-path", tmp_path / "out"
    )
    out = load(tmp_path / "out")
    theta0, a, b = (load(family[n]) for n in ("sft", "dpo", "dpo_b"))
    key = "model.layers.1.self_attn.o_proj.weight"
    mean = (a[key].float() + b[key].float()) / 2
    expected = mean + 0.5 * (mean - theta0[key].float())
    assert (out[key] - expected).abs().max() < 1e-6
    assert "expo" in (tmp_path / "out" / "README.md").read_text()


def test_tiny_recipes_in_repo_run(tmp_path):
    run_cli("mergekit-expo", "tiny-models", "tiny", cwd=tmp_path)
    run_cli("mergekit-yaml", REPO / "recipes/tiny/expo.yaml", "out/expo", cwd=tmp_path)
    card = (tmp_path / "out/expo/README.md").read_text()
    assert "`tiny/sft`" in card and "alpha: 0.3" in card
