"""How episodes are scored: the one place that knows what an environment family's score is.

A finished episode is a record `{"return", "length", "log_*": value at its last step}` (see
`benchmarks/episodes.py`). `summarize(records, recipe, tasks)` turns a list of them into the
summary every evaluation, phase and report reads:

    episodes, return_mean, length_mean         every environment
    <the family's own keys>                    the scorer declared at `register(...)`
    success_rate                               environments that report `log_success`
    task_success_rates                         ... with one flag per task (`log_task_success`)
    members                                    mixtures (`envs.mixture`): member name -> the
                                               summary of its episodes (`log_member`)

A mixture's family keys and `success_rate` are the mean over the members that played (each
member counts once, as the ML10 success rate and Procgen's mean normalized return do); the
return and length stay pooled over all episodes.

A family with its own score declares a `Scorer` when it registers:

    registry.register("crafter", "mbxfer.envs.crafter:Crafter",
                      scorer=Scorer("crafter_score", "mbxfer.envs.crafter:summarize"))

`key` is the summary key that reports, transfer metrics and generalization gaps compare
(`return_mean` unless declared; `envs.registry.score_key(name)` looks it up); `summarize` is
a `'module:function'` (imported when first used, like entry points) called as
`summarize(records, keywords)` with the factory's resolved keywords, returning the family's
extra summary keys.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

from mbxfer.envs import base, mixture

DEFAULT_KEY = "return_mean"
Summarizer = Callable[[Sequence[Mapping[str, Any]], Mapping[str, Any]], dict]


@dataclasses.dataclass(frozen=True)
class Scorer:
    """An environment family's score key and its extra episode summaries."""

    key: str = DEFAULT_KEY
    summarize: Union[str, Summarizer, None] = None
    training_episodes: bool = False
    """The family's published protocol scores the episodes played during training (Crafter:
    Hafner 2021), so reports also show the score of the last phase's training episodes."""

    def extras(self, records: Sequence[Mapping], keywords: Mapping[str, Any]) -> dict:
        if self.summarize is None:
            return {}
        function = self.summarize
        if isinstance(function, str):
            module_name, attribute = function.split(":")
            function = getattr(importlib.import_module(module_name), attribute)
        return function(records, keywords)


RETURN = Scorer()
"""The default: scored by the mean return, no extra summaries."""


def summarize(records: Sequence[Mapping], recipe=None, tasks: Optional[Sequence] = None) -> dict:
    """The summary of finished episodes `records` of environment `recipe` (an
    `envs.registry.EnvFactory`; None: only the generic keys), tasks named by `tasks`."""
    out: dict[str, Any] = {"episodes": len(records)}
    if not records:
        return out
    out["return_mean"] = float(np.mean([r["return"] for r in records]))
    out["length_mean"] = float(np.mean([r["length"] for r in records]))
    mixed = recipe is not None and mixture.is_mixture(recipe.keywords)
    if recipe is not None and not mixed:
        out.update(recipe.entry.scorer.extras(records, recipe.keywords))
    if base.SUCCESS_KEY in records[0]:
        out["success_rate"] = float(np.mean([r[base.SUCCESS_KEY] for r in records]))
    if base.TASK_SUCCESS_KEY in records[0]:
        rates = np.mean([r[base.TASK_SUCCESS_KEY] for r in records], axis=0).round(4)
        names = tasks if tasks is not None and len(tasks) == len(rates) else range(len(rates))
        out["task_success_rates"] = {str(name): float(v) for name, v in zip(names, rates)}
    if mixed and mixture.MEMBER_KEY in records[0]:
        out.update(_by_member(records, recipe, tasks))
    return out


_POOLED = ("episodes", "return_mean", "length_mean")


def _by_member(records: Sequence[Mapping], recipe, tasks) -> dict:
    """`members` (name -> summary of its episodes) and the mean over members of every numeric
    key a member summary has beyond the pooled ones (the family's score, `success_rate`)."""
    members, recipes = mixture.recipes(recipe.entry.name, recipe.keywords)
    groups: dict[int, list] = {}
    for record in records:
        groups.setdefault(int(record[mixture.MEMBER_KEY]), []).append(record)
    per_member = {
        members[index].name: summarize(group, recipes[index], tasks)
        for index, group in sorted(groups.items())
    }
    out: dict[str, Any] = {"members": per_member}
    keys = set.intersection(*(set(summary) for summary in per_member.values()))
    for key in sorted(keys - set(_POOLED)):
        values = [summary[key] for summary in per_member.values()]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = float(np.mean(values))
    return out
