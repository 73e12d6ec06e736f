"""Search throughput: our batched mctx search vs a classic per-node Python MCTS, same networks.

    python -m mbxfer.benchmarks.perf.search --batch-sizes 1,64 --simulations 50 --rounds 3

Measured: simulations per second (batch x simulations / wall time of one search call, after
compilation) of

* ours: `agents.muzero_search.make_search(...).run`, jitted as `act` is, over the MuZero
  agent's networks (the shared world model's `imagine`, reward and continuation heads, and the
  agent's policy and value heads), with `mctx.muzero_policy` and `mctx.gumbel_muzero_policy`;
* python: the straightforward MCTS of common MuZero reimplementations (the pseudocode of
  Schrittwieser et al. 2020, as in muzero-general): `Node` objects, PUCT with min-max
  normalized values, Dirichlet noise at the root, one jitted `recurrent_inference` call on one
  node per simulation (the same Haiku functions), its outputs copied to the host, and a
  batch searched one root after another.

Both sides get the same roots (random latents), the same parameters (freshly initialized; the
speed does not depend on their values) and the same number of simulations. Networks have the
agent's default sizes (`MuZeroConfig`: deterministic latent of 128, 2 x 128 MLP heads) on a
64-float vector observation and Crafter's 17 discrete actions. The variants alternate round by
round (the machine is shared); reported are median simulations/s, the ratio ours / python at
each batch size (the goal is >= 20x at batch 64), and gumbel / muzero cost at equal simulations.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from acme import specs as acme_specs
from dm_env import specs

from mbxfer.agents import muzero, muzero_search, networks

NUM_ACTIONS = 17  # Crafter's action set.
POLICIES = {"muzero": "muzero_policy", "gumbel": "gumbel_muzero_policy"}
OBSERVATION_SIZE = 64


def _networks(config: muzero.MuZeroConfig):
    """World model, prediction network, parameters and the agent's search for `config`."""
    spec = acme_specs.EnvironmentSpec(
        observations={"vector": specs.Array((OBSERVATION_SIZE,), np.float32, "vector")},
        actions=specs.DiscreteArray(NUM_ACTIONS),
        rewards=specs.Array((), np.float32),
        discounts=specs.BoundedArray((), np.float32, 0.0, 1.0),
    )
    params = muzero.make(spec, config).init(jax.random.PRNGKey(0)).params
    model, prediction, search, _, _ = muzero.make_networks(spec, config)
    return model, prediction, params, search


def _roots(model, batch_size: int, seed: int):
    deter = jax.random.normal(jax.random.PRNGKey(seed), (batch_size, model.config.deter))
    return model.initial_state(batch_size)._replace(deter=deter)


# ---------------------------------------------------------------------------------------
# The classic per-node Python MCTS.


class Node:
    """One search node: prior, statistics, children, and the latent it leads to."""

    __slots__ = ("prior", "latent", "reward", "discount", "children", "visit_count", "value_sum")

    def __init__(self, prior: float):
        self.prior = prior
        self.latent = None
        self.reward = 0.0
        self.discount = 1.0
        self.children: dict[int, Node] = {}
        self.visit_count = 0
        self.value_sum = 0.0

    def value(self) -> float:
        return self.value_sum / self.visit_count if self.visit_count else 0.0


class MinMaxStats:
    def __init__(self):
        self.maximum, self.minimum = -math.inf, math.inf

    def update(self, value: float) -> None:
        self.maximum, self.minimum = max(self.maximum, value), min(self.minimum, value)

    def normalize(self, value: float) -> float:
        if self.maximum > self.minimum:
            return (value - self.minimum) / (self.maximum - self.minimum)
        return value


def _make_python_mcts(model, prediction, config: muzero.MuZeroConfig) -> Callable:
    search_config = config.search
    bins = networks.symlog_bins(config.value_bins)

    @jax.jit
    def initial_inference(params, latent):
        output = prediction.apply(params.prediction, model.features(latent))
        return jax.nn.softmax(output.policy, -1), networks.two_hot_decode(output.value_logits, bins)

    @jax.jit
    def recurrent_inference(params, latent, action):
        latent = model.imagine(params.model, latent, action, jax.random.PRNGKey(0))
        features = model.features(latent)
        output = prediction.apply(params.prediction, features)
        return (
            latent,
            config.exploration.extrinsic_scale * model.reward(params.model, features),
            config.discount * model.continuation(params.model, features),
            jax.nn.softmax(output.policy, -1),
            networks.two_hot_decode(output.value_logits, bins),
        )

    def expand(node: Node, latent, reward, discount, priors) -> None:
        node.latent, node.reward, node.discount = latent, float(reward), float(discount)
        for action, prior in enumerate(priors):
            node.children[action] = Node(float(prior))

    def ucb_score(parent: Node, child: Node, stats: MinMaxStats) -> float:
        pb_c = math.log(
            (parent.visit_count + search_config.pb_c_base + 1) / search_config.pb_c_base
        )
        pb_c = (
            (pb_c + search_config.pb_c_init)
            * math.sqrt(parent.visit_count)
            / (child.visit_count + 1)
        )
        value = (
            stats.normalize(child.reward + child.discount * child.value())
            if child.visit_count
            else 0.0
        )
        return pb_c * child.prior + value

    def search_one(params, latent, rng: np.random.Generator) -> np.ndarray:
        root, stats = Node(1.0), MinMaxStats()
        priors, _ = jax.device_get(initial_inference(params, latent))
        expand(root, latent, 0.0, 1.0, priors[0])
        noise = rng.dirichlet([search_config.dirichlet_alpha] * NUM_ACTIONS)
        fraction = search_config.dirichlet_fraction
        for action, child in root.children.items():
            child.prior = child.prior * (1 - fraction) + noise[action] * fraction
        for _ in range(search_config.num_simulations):
            node, path, action = root, [root], 0
            while node.children:
                action, node = max(
                    node.children.items(), key=lambda item: ucb_score(path[-1], item[1], stats)
                )
                path.append(node)
            parent = path[-2] if len(path) > 1 else root
            outputs = recurrent_inference(params, parent.latent, jnp.array([action]))
            next_latent = outputs[0]
            reward, discount, priors, value = jax.device_get(outputs[1:])
            expand(node, next_latent, reward[0], discount[0], priors[0])
            value = float(value[0])
            for visited in reversed(path):
                visited.value_sum += value
                visited.visit_count += 1
                stats.update(visited.reward + visited.discount * visited.value())
                value = visited.reward + visited.discount * value
        return np.array([root.children[a].visit_count for a in range(NUM_ACTIONS)])

    def search(params, roots, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        batch_size = roots.deter.shape[0]
        return np.stack(
            [
                search_one(params, jax.tree.map(lambda x, i=i: x[i : i + 1], roots), rng)
                for i in range(batch_size)
            ]
        )

    return search


# ---------------------------------------------------------------------------------------


def _timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(run())
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", default="1,64", help="comma-separated batch sizes")
    parser.add_argument("--simulations", type=int, default=50, help="simulations per search")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument(
        "--python-roots", type=int, default=0,
        help="roots the Python MCTS searches per round at large batches (0: the whole batch); "
        "its cost is linear in the roots, so fewer give the same simulations/s faster",
    )  # fmt: skip
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    variants: dict[str, tuple[int, Callable[[int], float]]] = {}
    python_search = None
    for policy in ("muzero", "gumbel"):
        config = muzero.MuZeroConfig(
            search=muzero_search.SearchConfig(policy=policy, num_simulations=args.simulations)
        )
        model, prediction, params, search = _networks(config)
        run = jax.jit(search.run, static_argnums=3)
        if python_search is None:
            python_search = (_make_python_mcts(model, prediction, config), params, model)
        for batch_size in batch_sizes:
            roots = _roots(model, batch_size, 0)
            jax.block_until_ready(run(params, roots, jax.random.PRNGKey(0), "explore"))  # Compile.
            variants[f"mctx {POLICIES[policy]} B={batch_size}"] = (
                batch_size,
                lambda seed, run=run, params=params, roots=roots: _timed(
                    lambda: run(params, roots, jax.random.PRNGKey(seed), "explore")
                ),
            )
    mcts, params, model = python_search
    mcts(params, _roots(model, 1, 0), 0)  # Compile the two inference functions.
    for batch_size in batch_sizes:
        roots_searched = batch_size
        if args.python_roots and batch_size > args.python_roots:
            roots_searched = args.python_roots
        roots = _roots(model, roots_searched, 0)
        variants[f"python MCTS B={batch_size}"] = (
            roots_searched,
            lambda seed, roots=roots: _timed(lambda: mcts(params, roots, seed)),
        )

    measured: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(args.rounds):
        for name, (batch_size, timed) in variants.items():
            seconds = timed(round_index + 1)
            measured[name].append(batch_size * args.simulations / seconds)
    median = {name: statistics.median(values) for name, values in measured.items()}
    ratios = {}
    for batch_size in batch_sizes:
        python = median[f"python MCTS B={batch_size}"]
        for name in POLICIES.values():
            ours = median[f"mctx {name} B={batch_size}"]
            ratios[f"mctx {name} / python, B={batch_size}"] = ours / python
        # Equal simulations, so the cost ratio is the inverse ratio of simulations/s.
        ratios[f"gumbel_muzero_policy / muzero_policy cost, B={batch_size}"] = (
            median[f"mctx muzero_policy B={batch_size}"]
            / median[f"mctx gumbel_muzero_policy B={batch_size}"]
        )
    machine = f"{platform.machine()}, {platform.processor() or 'cpu'}, jax {jax.__version__}"
    print(
        f"machine: {machine}; {args.simulations} simulations, {NUM_ACTIONS} actions, "
        f"{args.rounds} rounds, median simulations/s"
    )
    for name, value in median.items():
        runs = ", ".join(f"{v:.0f}" for v in measured[name])
        print(f"  {name:32s} {value:10.0f}   (rounds: {runs})")
    for name, value in ratios.items():
        print(f"  {name:44s} {value:8.2f}x")
    result = {
        "machine": machine,
        "simulations_per_second": median,
        "ratios": ratios,
        "runs": measured,
    }
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=2)
    return result


if __name__ == "__main__":
    main()
