"""The demo's stages, each cached under DIR: task -> sft -> pairs -> reward model -> dpo -> sweeps -> report.

A stage is skipped when its record in DIR/stages/ matches its settings, the
`environment()` and what its inputs were made from, and its outputs exist;
`force` redoes every stage. Every stage runs `reproducible`: the same settings
and environment give the same results, timings aside, on any number of cores.
A redone stage invalidates every stage after it (each record names the run of
the stages it used), so a sweep never reuses generations of older weights.
"""

import json
import random
import shutil
import time
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

import yaml

from expo_eval.demo import report, rules, task
from expo_eval.demo.rules import GROUND_TRUTH
from expo_eval.demo.settings import REGIMES, REWARD_MODELS, DemoSettings, Layout, checkpoint_name
from expo_eval.files import write_text
from expo_eval.store import digest

EXAMPLES = 4  # test responses kept per reported alpha, for the report
CURRICULUM_BATCH = 64  # the short regime's SFT batch: what taught its model to copy nouns


# The settings each stage depends on (besides the stages before it).
STAGE_FIELDS: Dict[str, Tuple[str, ...]] = {
    "task": (
        "seed", "shape", "sft_examples", "curriculum_examples", "copy_examples", "pair_prompts", "dev_prompts",
        "test_prompts",
    ),
    "sft": ("seed", "model_size", "sft_learning_rate", "sft_batch_size", "max_length"),
    "pairs": ("seed", "pair_max_new_tokens"),
    "reward_model": ("seed", "reward_learning_rate", "reward_batch_size", "max_length"),
    "dpo": (
        "seed", "dpo_pairs", "dpo_learning_rate", "dpo_beta", "dpo_batch_size", "dpo_warmup", "fractions", "max_length"
    ),
    "sweep": ("alphas", "max_new_tokens", "sample_batch_size"),
    "report": (),
}


# Bumped when what a stage writes changes shape, so that an older run's output is redone, not misread.
STAGE_VERSIONS = {"sweep": 4, "report": 4}  # sweep 4: KL from plain samples

# torch's CPU kernels split sums (and some matrix products) by the thread count, so the
# trained weights, and from them every figure, would depend on the machine's cores.
THREADS = 1
LIBRARIES = ("torch", "transformers", "trl", "accelerate", "datasets")  # they train and sample


def environment() -> Dict[str, str]:
    """What decides the figures bit for bit besides the settings: the thread count, the CPU
    kernels torch picked (AVX2, AVX-512, ...) and the libraries' versions."""
    import torch

    return {
        "threads": str(THREADS),
        "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
        **{name: version(name) for name in LIBRARIES},
    }


def rules_source() -> str:
    """A digest of the code that chooses alpha (the sweep's rules, its choice, the demo's alternatives)."""
    import inspect

    from expo_eval import search, selection

    return digest({module.__name__: inspect.getsource(module) for module in (selection, search, rules)})


@contextmanager
def reproducible(seed: int) -> Iterator[None]:
    """Run a stage on THREADS threads, with deterministic kernels and every generator seeded,
    whatever the cores and whatever ran before it in this process (a reused stage draws no
    random numbers); the caller's thread count and kernel choice come back afterwards."""
    import torch
    import torch.utils.deterministic
    from transformers import set_seed

    saved = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.utils.deterministic.fill_uninitialized_memory,
    )
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    # Filling every new tensor (a guard against kernels that read memory they never wrote)
    # took 60% more wall time in the quick demo, and changed none of its results.
    torch.utils.deterministic.fill_uninitialized_memory = False
    set_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])
        torch.utils.deterministic.fill_uninitialized_memory = saved[2]


def read_jsonl(path: Path) -> List[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


class Stages:
    """Runs stages in order, each `reproducible`, reusing finished ones; keeps wall and CPU time per stage."""

    def __init__(self, layout: Layout, settings: DemoSettings, force: bool, echo: Callable[[str], None]):
        self.layout = layout
        self.settings = settings
        self.force = force
        self.echo = echo
        self.made: Dict[str, str] = {}
        self.timings: Dict[str, dict] = {}

    def key(self, name: str, after: Sequence[str]) -> str:
        kind = name.split(":")[0]
        fields = STAGE_FIELDS[kind]
        settings = self.settings.model_dump(mode="json")
        return digest(
            {
                "stage": name,
                "version": STAGE_VERSIONS.get(kind, 1),
                "settings": {field: settings[field] for field in fields},
                "environment": environment(),
                "after": [self.made[stage] for stage in after],
                # a sweep stage records every rule's choice: new rules, new choices
                **({"rules": rules_source()} if kind == "sweep" else {}),
            }
        )

    def run(self, name: str, after: Sequence[str], outputs: Sequence[Path], work: Callable[[], None]) -> None:
        record_path = self.layout.stages / f"{name.replace(':', '-')}.json"
        key = self.key(name, after)
        if not self.force and record_path.exists():
            record = json.loads(record_path.read_text())
            if record["key"] == key and all(path.exists() for path in outputs):
                self.made[name] = record["made"]
                self.timings[name] = {**record["timing"], "reused": True}
                self.echo(f"[{name}] reused (took {record['timing']['wall_s']:.1f} s when made)")
                return
        for path in outputs:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        self.echo(f"[{name}] running ...")
        wall, cpu = time.perf_counter(), time.process_time()
        with reproducible(self.settings.seed):
            work()
        timing = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
        made = digest({"key": key, "at": time.time()})
        write_text(record_path, json.dumps({"key": key, "made": made, "timing": timing}, indent=2) + "\n")
        self.made[name] = made
        self.timings[name] = {**timing, "reused": False}
        self.echo(f"[{name}] done in {timing['wall_s']:.1f} s (CPU {timing['cpu_s']:.1f} s)")


# -- the stages ---------------------------------------------------------------------------


def make_task(layout: Layout, settings: DemoSettings) -> None:
    """SFT examples, prompts to sample preference pairs on, and dev/test prompt files."""
    rng = random.Random(settings.seed)
    shape = task.SHAPES[settings.shape]
    held_out = task.unique_noun_sets(rng, settings.dev_prompts + settings.test_prompts, shape)
    dev, test = held_out[: settings.dev_prompts], held_out[settings.dev_prompts :]
    write_jsonl(layout.task / "dev.jsonl", [{"prompt": shape.prompt_text(n)} for n in dev])
    write_jsonl(layout.task / "test.jsonl", [{"prompt": shape.prompt_text(n)} for n in test])
    def examples(count: int, kind: task.Shape) -> List[dict]:
        drawn = [kind.sample_nouns(rng) for _ in range(count)]
        return [{"prompt": kind.prompt_text(n), "answer": task.reference_answer(n, rng, kind)} for n in drawn]

    write_jsonl(layout.task / "curriculum.jsonl", examples(settings.curriculum_examples, task.SHORT))
    sft = examples(settings.sft_examples, shape) + examples(settings.copy_examples, task.SHORT)
    rng.shuffle(sft)
    write_jsonl(layout.task / "sft.jsonl", sft)
    pair_prompts = [{"prompt": shape.prompt_text(shape.sample_nouns(rng))} for _ in range(settings.pair_prompts)]
    write_jsonl(layout.task / "pair_prompts.jsonl", pair_prompts)
    task.build_tokenizer().save_pretrained(str(layout.task / "tokenizer"))


def tokenizer(layout: Layout):
    from transformers import PreTrainedTokenizerFast

    loaded = PreTrainedTokenizerFast.from_pretrained(str(layout.task / "tokenizer"))
    loaded.padding_side = "left"  # not saved with a tokenizer
    return loaded


def make_sft(layout: Layout, settings: DemoSettings) -> None:
    """SFT on the task's examples; a curriculum of short answers first where the settings ask for one."""
    from expo_eval.demo import train

    def phase(out: Path, rows: List[dict], batch_size: int, start=None) -> None:
        train.train_sft(
            out,
            tokenizer(layout),
            [(row["prompt"], row["answer"]) for row in rows],
            seed=settings.seed,
            size=settings.model_size,
            learning_rate=settings.sft_learning_rate,
            batch_size=batch_size,
            max_length=settings.max_length,
            start=start,
        )

    curriculum = read_jsonl(layout.task / "curriculum.jsonl")
    start = None
    if curriculum:
        start = layout.root / "sft_curriculum"
        phase(start, curriculum, CURRICULUM_BATCH)
    phase(layout.sft, read_jsonl(layout.task / "sft.jsonl"), settings.sft_batch_size, start)
    if start is not None:
        shutil.rmtree(start)


def make_pairs(layout: Layout, settings: DemoSettings) -> None:
    """Two SFT samples per prompt labelled by the ground truth; the reward model's half gets format pairs."""
    from expo_eval.demo import train

    prompts = [row["prompt"] for row in read_jsonl(layout.task / "pair_prompts.jsonl")]
    first, second = (
        train.sample(layout.sft, prompts, seed=settings.seed + offset, max_new_tokens=settings.pair_max_new_tokens)
        for offset in (1, 2)
    )
    pairs = train.preference_pairs(prompts, first, second)
    write_jsonl(layout.pairs / "preference.jsonl", pairs)
    reward_half = pairs[: len(pairs) // 2]
    # Each reward model its own quarter of the pairs, plus broken copies of half of its own:
    # enough for it to punish broken text, and no pair in common.
    share = len(reward_half) // len(REWARD_MODELS)
    for index in range(len(REWARD_MODELS)):
        own = reward_half[index * share : (index + 1) * share]
        reward_pairs = own + train.format_pairs(own[: len(own) // 2], seed=settings.seed + index)
        random.Random(settings.seed + index).shuffle(reward_pairs)
        write_jsonl(layout.reward_pairs(index), reward_pairs)


def make_reward_model(layout: Layout, settings: DemoSettings, index: int) -> None:
    from expo_eval.demo import train

    train.train_reward_model(
        layout.reward_models[index],
        layout.sft,
        tokenizer(layout),
        read_jsonl(layout.reward_pairs(index)),
        seed=settings.seed + index,
        learning_rate=settings.reward_learning_rate,
        batch_size=settings.reward_batch_size,
        max_length=settings.max_length,
    )


def make_dpo(layout: Layout, settings: DemoSettings) -> None:
    from expo_eval.demo import train

    pairs = read_jsonl(layout.pairs / "preference.jsonl")[: settings.dpo_pairs]
    train.train_dpo(
        {fraction: layout.checkpoint(fraction) for fraction in settings.fractions},
        layout.sft,
        tokenizer(layout),
        pairs,
        seed=settings.seed,
        beta=settings.dpo_beta,
        learning_rate=settings.dpo_learning_rate,
        batch_size=settings.dpo_batch_size,
        warmup=settings.dpo_warmup,
        max_length=settings.max_length,
        work=layout.dpo,
    )


def recipe_text(layout: Layout, fraction: float, alpha: float = 0.3) -> str:
    recipe = {
        "merge_method": "expo",
        "base_model": str(layout.sft.resolve()),
        "models": [{"model": str(layout.checkpoint(fraction).resolve())}],
        "parameters": {"alpha": alpha},
        "dtype": "float32",
    }
    header = (
        f"# ExPO on the demo's DPO checkpoint at {fraction:.0%} of an epoch, written by `mergekit-expo demo`.\n"
        "# theta0 = the demo's SFT model, theta1 = the DPO checkpoint. The sweep varies alpha;\n"
        f"# sweeps/{checkpoint_name(fraction)}/best.yaml holds the one the reward model chose.\n"
    )
    return header + yaml.safe_dump(recipe, sort_keys=False)


def sweep_config(layout: Layout, settings: DemoSettings, fraction: float, include_sft: bool):
    from expo_eval.config import SamplingConfig, SweepConfig

    return SweepConfig(
        recipe=layout.recipes / f"{checkpoint_name(fraction)}.yaml",
        out=layout.sweeps / checkpoint_name(fraction),
        select_prompts=str(layout.task / "dev.jsonl"),
        report_prompts=str(layout.task / "test.jsonl"),
        alphas=list(settings.alphas),
        reward_models=[*map(str, layout.reward_models), GROUND_TRUTH],
        select_with=[str(path) for path in layout.reward_models],
        include_sft=include_sft,
        device="cpu",
        sampling=SamplingConfig(
            max_new_tokens=settings.max_new_tokens,
            batch_size=settings.sample_batch_size,
            seed=SamplingConfig().seed + settings.seed,
        ),
    )


def make_sweep(layout: Layout, settings: DemoSettings, fraction: float, include_sft: bool) -> None:
    """The project's own sweep (as `mergekit-expo sweep`, default rule), then every rule's
    choice on the dev prompts and its test-prompt numbers.

    The sweep chooses with its default rule; the other rules (the paper's among them) and
    the ground truth's own choice (the oracle) come from the same dev results, and their
    test-prompt numbers from the same sweep object (memoized, cached).
    """
    from expo_eval.sweep import Sweep

    write_text(layout.recipes / f"{checkpoint_name(fraction)}.yaml", recipe_text(layout, fraction))
    sweep = Sweep(sweep_config(layout, settings, fraction, include_sft))
    outcome = sweep.run()
    dev = [r for r in outcome.results if r.split == "select"]
    alphas = rules.choices(dev, [str(path) for path in layout.reward_models], settings.dpo_beta)
    assert alphas[rules.DEFAULT] == outcome.chosen.alpha, "the sweep and the demo disagree on the default rule"
    results = {(r.alpha, r.split): r for r in outcome.results}
    for r in dev:  # every alpha on the test prompts: any rule's choice can be checked there
        results[(r.alpha, "report")] = sweep.evaluate(r.alpha, "report")
    theta1 = results[(0.0, "select")]  # its KL from plain samples, as the rule saw it
    summary = {
        "checkpoint": checkpoint_name(fraction),
        "fraction": fraction,
        "seed": settings.seed,
        "theta1_kl": {"mean": theta1.kl, "stderr": theta1.kl_stderr},
        "alphas": alphas,
        "flags": outcome.flags,
        "results": [r.model_dump(mode="json") for r in results.values()],
        "examples": examples(sweep, list(dict.fromkeys([0.0, *alphas.values()]))),
    }
    write_text(layout.sweeps / checkpoint_name(fraction) / "demo.json", json.dumps(summary, indent=2) + "\n")


def examples(sweep, alphas: Sequence[float], count: int = EXAMPLES) -> Dict[str, List[dict]]:
    """The first test-prompt responses of each alpha, with their scores: what the numbers mean."""
    from expo_eval.phases.summary import label

    return {
        f"{alpha:g}": [
            {"prompt": g.prompt, "response": g.response, "scores": g.scores}
            for g in sweep.generations[label(alpha)]
            if g.split == "report"
        ][:count]
        for alpha in alphas
    }


def quiet_libraries() -> None:
    """Training libraries' progress bars and advice would bury the stage log."""
    import warnings

    import datasets
    import transformers

    # TRL 1.16 still sets `gradient_checkpointing`, which transformers 5 renames.
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*", category=FutureWarning)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def run_seed(layout: Layout, settings: DemoSettings, force: bool, echo: Callable[[str], None]) -> Stages:
    """Every stage up to the sweeps for one seed, under its own folder."""
    layout.root.mkdir(parents=True, exist_ok=True)
    stages = Stages(layout, settings, force, echo)
    stages.run("task", [], [layout.task], lambda: make_task(layout, settings))
    stages.run("sft", ["task"], [layout.sft], lambda: make_sft(layout, settings))
    stages.run("pairs", ["sft"], [layout.pairs], lambda: make_pairs(layout, settings))
    for index, path in enumerate(layout.reward_models):
        stages.run(
            f"reward_model:{REWARD_MODELS[index]}",
            ["pairs"],
            [path],
            lambda index=index: make_reward_model(layout, settings, index),
        )
    stages.run("dpo", ["pairs"], [layout.dpo], lambda: make_dpo(layout, settings))
    for index, fraction in enumerate(settings.fractions):
        stages.run(
            f"sweep:{checkpoint_name(fraction)}",
            ["task", *(f"reward_model:{name}" for name in REWARD_MODELS), "dpo"],
            # the sweep's own folder stays: its cache is keyed on contents, its report replaced whole
            [layout.sweeps / checkpoint_name(fraction) / "demo.json"],
            lambda fraction=fraction, first=index == 0: make_sweep(layout, settings, fraction, first),
        )
    return stages


def seed_layouts(out: Path, seeds: Sequence[int]) -> List[Layout]:
    """The first seed's run under DIR, each further seed's under DIR/seeds/<seed>."""
    return [Layout(out if index == 0 else out / "seeds" / str(seed)) for index, seed in enumerate(seeds)]


def run_regime(
    out: Path, settings: DemoSettings, seeds: Sequence[int], force: bool, echo: Callable[[str], None] = print
) -> dict:
    """Run (or reuse) every stage of one regime for every seed; returns the summary its report was made from."""
    quiet_libraries()
    layouts = seed_layouts(Path(out), seeds)
    runs = []
    for layout, seed in zip(layouts, seeds):
        if len(seeds) > 1:
            echo(f"== seed {seed} ({layout.root})")
        runs.append(run_seed(layout, settings.model_copy(update={"seed": seed}), force, echo))
    first = runs[0]
    for seed, stages in zip(seeds[1:], runs[1:]):  # the report depends on every seed's sweeps
        first.made.update({f"seed {seed} {name}": made for name, made in stages.made.items()})
        first.timings.update({f"seed {seed} {name}": t for name, t in stages.timings.items()})
    sweeps = [name for name in first.made if "sweep:" in name]
    first_settings = settings.model_copy(update={"seed": seeds[0]})
    first.run(
        "report",
        sweeps,
        [layouts[0].report, layouts[0].summary, layouts[0].plots],
        lambda: report.write(
            layouts,
            first_settings,
            first.timings,
            [load_summaries(layout, settings) for layout in layouts],
            sweep_config(layouts[0], first_settings, settings.fractions[0], include_sft=False).sampling,
            environment(),
        ),
    )
    summary = json.loads(layouts[0].summary.read_text())
    summary["timings"] = first.timings
    return summary


def _run_regime_logged(name: str, out: Path, settings: DemoSettings, seeds: Sequence[int], force: bool) -> dict:
    """run_regime in a worker process, its log lines prefixed with the regime."""
    return run_regime(out, settings, seeds, force, lambda line: print(f"[{name}] {line}", flush=True))


def run_demo(
    out: Path,
    regimes: Dict[str, DemoSettings] = REGIMES,
    seeds: Sequence[int] = (0,),
    force: bool = False,
    echo: Callable[[str], None] = print,
    workers: int = 2,
) -> Dict[str, dict]:
    """Every regime under DIR/<regime>, on up to `workers` processes at once (each stage runs on
    THREADS threads whatever the process count, so the figures do not depend on it), then
    DIR/report.md over all of them. Returns each regime's summary."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"give distinct seeds, got {list(seeds)}")
    out = Path(out)
    jobs = {name: (name, out / name, settings, tuple(seeds), force) for name, settings in regimes.items()}
    if workers <= 1 or len(jobs) == 1:
        summaries = {name: run_regime(*job[1:], echo=lambda line, name=name: echo(f"[{name}] {line}")) for name, job in jobs.items()}
    else:
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # torch and fork do not mix
        pool = context.Pool(min(workers, len(jobs)))
        try:
            pending = {name: pool.apply_async(_run_regime_logged, job) for name, job in jobs.items()}
            summaries = {name: result.get() for name, result in pending.items()}
        finally:
            # Ctrl-C, SIGTERM or a failed regime: the other regime's worker goes too, at once; a
            # stage it left unfinished has no record, so the next run redoes it.
            pool.terminate()
            pool.join()
    report.write_overview(out, summaries)
    return summaries


def load_summaries(layout: Layout, settings: DemoSettings) -> List[dict]:
    return [
        json.loads((layout.sweeps / checkpoint_name(f) / "demo.json").read_text()) for f in settings.fractions
    ]

