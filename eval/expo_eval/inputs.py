"""A sweep's inputs, read and checked once, before any generation: the recipe (and the merge's
own checks), the prompt splits, the chat template, and the contents' fingerprints."""

import os
from pathlib import Path
from typing import Callable, Dict, List, Optional

from mergekit.config import MergeConfiguration

from expo_eval.backends.base import BackendError
from expo_eval.candidates import Candidates, RecipeError, load_recipe, merge_options
from expo_eval.config import SweepConfig
from expo_eval.files import read_text
from expo_eval.fingerprint import model_fingerprint, text_fingerprint
from expo_eval.prompts import Prompt, PromptError, load_prompts, shared_prompts, split_prompts
from expo_eval.records import Split
from expo_eval.scoring import Scorer, given_scorer_fingerprint, scorer_fingerprint, split_objective
from mergekit_expo.merged_tokenizer import tokenizer_models
from mergekit_expo.run import MergeError, check_inputs, describe


class SweepInputs:
    def __init__(self, given: SweepConfig, scorers: Dict[str, Scorer]):
        self.given = given  # its paths as given name the inputs (and so key the cache)
        self.config = config = absolute_paths(given)
        self.recipe_text = read_text(config.recipe, RecipeError)  # as written: it keys the cache and goes in the report
        self.given_recipe = load_recipe(self.recipe_text)
        self.recipe = absolute_models(self.given_recipe)
        # what backends in other processes (vLLM's workers) plan: the models found here
        self.backend_recipe_text = self.recipe_text if self.recipe == self.given_recipe else self.recipe.to_yaml()
        self.merge_options = merge_options(config.trust_remote_code)
        try:
            check_inputs(self.recipe, self.merge_options)  # the merge's own checks, before anything
        except (ValueError, OSError) as error:
            raise MergeError(describe(error)) from None
        self.splits = self._prompt_splits()
        self.chat_template = read_text(config.chat_template, BackendError) if config.chat_template else None
        self.generation_template = self._generation_template()
        self._scorers = scorers
        self.fingerprints = self.fingerprint()

    def fingerprint(self) -> Dict[str, Optional[str]]:
        """Content fingerprints of everything a cached result depends on, by input name (cheap
        again: digests are cached by stat)."""
        recipe, given = self.recipe, self.given_recipe  # read where found, named as written
        inputs = {f"theta0 ({given.base_model.model.path})": model_fingerprint(recipe.base_model.model.path)}
        for model, named in zip(recipe.models or [], given.models or []):
            if model.model != recipe.base_model:
                inputs[f"aligned model ({named.model.model.path})"] = model_fingerprint(model.model.model.path)
        for path in tokenizer_models(given):
            inputs[f"tokenizer source ({path})"] = model_fingerprint(absolute_folder(path))
        if self.chat_template is not None:
            inputs[f"chat template ({self.given.chat_template})"] = text_fingerprint(self.chat_template)
        for name in self.config.reward_models:
            if name in self._scorers:  # an object passed in: its own fingerprint, or no cache
                fingerprint = given_scorer_fingerprint(self._scorers[name])
            else:
                fingerprint = scorer_fingerprint(name)
            inputs[f"scorer {name}"] = fingerprint
        return inputs

    def check_candidates(self, generated: Callable[[float], bool]) -> None:
        """Stop before the first generation, naming the alpha, where a candidate the sweep
        would build fails the merge's per-tensor checks (NaN or Inf inputs, a result its
        dtype cannot hold): the merge would refuse that alpha, and a grid with a hole is
        not the sweep that was asked for. Each element of theta1 + alpha * delta is linear
        in alpha, so the largest magnitudes lie at the ends of the alphas swept: two
        candidates built and discarded prove the rest (each is checked again when it is
        built). An end already `generated` passed then and is not built again."""
        config = self.config
        if config.alphas is not None:
            alphas = sorted(set(config.alphas) | ({0.0} if not config.generate_only else set()))
        else:  # a search stays in [low, high] (0 < low); alpha 0 is its baseline
            alphas = [0.0, config.search.high]
        ends = [a for a in dict.fromkeys((alphas[0], alphas[-1])) if not generated(a)]
        if ends:
            Candidates(self.recipe, self.merge_options).check(ends)

    def paths(self) -> Dict[str, Path]:
        """Every local file or folder the sweep reads, described: the output folder must not
        be, contain or lie inside one (a hub ID or a function scorer is no path)."""
        config, recipe = self.config, self.recipe
        theta0 = recipe.base_model.model.path
        paths = {f"the recipe {config.recipe}": config.recipe, f"the theta0 folder {theta0}": theta0}
        for model in recipe.models or []:
            if model.model != recipe.base_model:
                paths[f"the aligned model's folder {model.model.model.path}"] = model.model.model.path
        for path in tokenizer_models(recipe):
            paths[f"the tokenizer source's folder {path}"] = path
        if config.chat_template is not None:
            paths[f"the chat template file {config.chat_template}"] = config.chat_template
        for name in config.reward_models:
            paths[f"the reward model's folder {name}"] = split_objective(name)[0]
        for prompts in filter(None, (config.prompts, config.select_prompts, config.report_prompts)):
            paths[f"the prompt file {prompts}"] = prompts
        return {what: Path(path) for what, path in paths.items() if Path(path).exists()}

    def _prompt_splits(self) -> Dict[Split, List[Prompt]]:
        """The select prompts (they choose alpha) and the held-out report prompts, which must
        not share a prompt with them: the report would not be held out."""
        config = self.config
        if config.select_prompts or config.report_prompts:
            sources = {
                split: (f"--{split}-prompts", spec) if spec else ("--prompts", config.prompts)
                for split, spec in (("select", config.select_prompts), ("report", config.report_prompts))
            }
            select, report = (load_prompts(sources[split][1], config.limit) for split in ("select", "report"))
            shared = shared_prompts(report, select)
            if shared:
                raise PromptError(
                    "{} {} shares {} of its {} prompts with the select prompts ({} {}): held-out prompts "
                    "must be disjoint; drop the shared ones, or give one set with --prompts and let "
                    "--select-fraction split it".format(*sources["report"], shared, len(report), *sources["select"])
                )
            return {"select": select, "report": report}
        select, report = split_prompts(load_prompts(config.prompts, config.limit), config.select_fraction)
        return {"select": select, "report": report}

    def _generation_template(self):
        """The chat template the backends render prompts with: the one the merge writes
        (the recipe's `chat_template:` and tokenizer settings), or --chat-template's."""
        from expo_eval.backends.hf import check_chat_template, load_tokenizer

        tokenizer = load_tokenizer(self.recipe, self.chat_template, self.merge_options)
        first = next(iter([*self.splits["select"], *self.splits["report"]]), None)
        if first is not None:
            source = (f"the chat template file {self.config.chat_template}" if self.config.chat_template
                      else f"the chat template the merge of {self.config.recipe} writes")
            check_chat_template(tokenizer, first.messages, source)
        return tokenizer.chat_template


def absolute_paths(config: SweepConfig) -> SweepConfig:
    """The config with its paths made absolute against the working directory now: a Sweep
    built in one folder and run from another reads and writes what it was built with."""
    update = {"recipe": config.recipe.absolute(), "out": config.out.absolute()}
    if config.chat_template is not None:
        update["chat_template"] = config.chat_template.absolute()
    for field_name in ("prompts", "select_prompts", "report_prompts"):
        spec = getattr(config, field_name)
        if spec is not None and spec not in ("smoke", "ultrafeedback", "alpaca_eval") and Path(spec).is_file():
            update[field_name] = str(Path(spec).absolute())
    return config.model_copy(update=update)


def absolute_models(recipe: MergeConfiguration) -> MergeConfiguration:
    """The recipe with each relative model folder made absolute (as mergekit reads it: against
    the working directory), for the same reason; a Hub ID stays as it is."""

    def absolute(model):
        path = absolute_folder(model.model.path)
        if path == model.model.path:
            return model
        return model.model_copy(update={"model": model.model.model_copy(update={"path": path})})

    models = [m.model_copy(update={"model": absolute(m.model)}) for m in recipe.models] if recipe.models else recipe.models
    return recipe.model_copy(update={"base_model": absolute(recipe.base_model), "models": models})


def absolute_folder(path: str) -> str:
    """A relative local folder made absolute against the working directory; a Hub ID as it is."""
    return path if os.path.isabs(path) or not os.path.isdir(path) else os.path.abspath(path)
