"""Meta-World (v3 environments of `metaworld` 3.1.1) as mbxfer environments.

    env = registry.make("metaworld", scene="pick-place", task="reward")
    env = registry.make("metaworld", scene="reach", goals="test", observation="pixels")
    for scene in TASK_SETS["ML10"]["test"]: ...

What a *task* is here. In mbxfer a task is a reward function over the same dynamics
(`envs/base.py`), so that one environment reports every task's reward at every step and a
protocol can switch reward without switching environment. Meta-World's "tasks" (reach, push,
door-open, ...) are different *scenes*: different objects and dynamics, each with its own
reward. So there is one registered environment, `metaworld`, whose `scene` keyword picks the
scene (`"reach"` or `"reach-v3"`), and whose `tasks` are the reward functions of that scene:
`reward` (Meta-World's shaped reward, in [0, 10]) and `success` (1 on every step the success
condition holds). Moving between Meta-World tasks, as Walker et al. 2023 and Anand et al. 2022
do, is a change of environment between protocol phases; the named groups are data for those
protocols in `TASK_SETS`, and a batch can mix scenes (`members="ML10/train"`,
`envs.mixture`, named sets in `MEMBER_SETS`):

* `ML1`: every scene, `train` and `test` goal sets (`goals="train"` / `"test"`),
* `ML10`, `ML45`: `{"train": scenes, "test": held-out scenes}`,
* `MT10`, `MT50`: `{"train": scenes, "test": ()}`.

Goals. `goals="random"` (default) draws a fresh goal (object and target positions) from the
scene's distribution at every reset, from the environment's seeded generator (the usual
single-task setting). `goals="train"` / `"test"` use Meta-World's own ML1 goal sets
(`metaworld.ML1(scene, seed=goal_seed)`, 50 goals each, test goals drawn with
`goal_seed + 1`); each episode picks one uniformly with the seeded generator. Building these
sets costs ~2 s. `goal_observable` (default True) keeps the goal position in the state vector
(Meta-World's MT setting; its ML setting hides it, and its scripted policies need it).

Observations: `observation="state"` (default): `vector` float32 `[39]`; `"pixels"`: `image`
uint8 `[size, size, 3]` from the fixed camera `camera` (default `corner2`); `"both"`. Corner
cameras are flipped vertically, as the images Meta-World users know (mujoco-py era) were.
`render="fast"` / `"faithful"`: see `envs.mujoco_render`. Plus `log_task_rewards` and
`log_success` (float32, the scene's success flag). Episodes last 500 steps and end as a
truncation (discount 1); success does not end them. Versions: metaworld 3.1.1 with its pinned
mujoco 3.3.0 (see constraints.txt); results are not comparable across Meta-World versions.

Saved state (`get_state`, ~7 kB, see `envs.mujoco_state`): MuJoCo's integration state (with the
solver's warm start), the body and site positions Meta-World's resets move, every state
attribute of the Meta-World environment (its goal sampler, goal, initial object and hand
positions, path length, frame-stacking buffer) and this wrapper's goal-set generator and step
count, so a restored copy continues mid-episode bit for bit (tests/test_metaworld.py).
"""

from __future__ import annotations

import copy

import dm_env
import numpy as np
from dm_env import specs

from mbxfer import domains
from mbxfer.envs import base, mujoco_render, mujoco_state

VERSION_SUFFIX = "-v3"
SCENES = (
    "assembly", "basketball", "bin-picking", "box-close", "button-press-topdown",
    "button-press-topdown-wall", "button-press", "button-press-wall", "coffee-button",
    "coffee-pull", "coffee-push", "dial-turn", "disassemble", "door-close", "door-lock",
    "door-open", "door-unlock", "hand-insert", "drawer-close", "drawer-open", "faucet-open",
    "faucet-close", "hammer", "handle-press-side", "handle-press", "handle-pull-side",
    "handle-pull", "lever-pull", "pick-place-wall", "pick-out-of-hole", "pick-place",
    "plate-slide", "plate-slide-side", "plate-slide-back", "plate-slide-back-side",
    "peg-insert-side", "peg-unplug-side", "soccer", "stick-push", "stick-pull", "push",
    "push-wall", "push-back", "reach", "reach-wall", "shelf-place", "sweep-into", "sweep",
    "window-open", "window-close",
)  # fmt: skip
TASKS = ("reward", "success")
OBSERVATIONS = ("state", "pixels", "both")
GOALS = ("random", "train", "test")
STATE_SIZE = 39
EPISODE_LENGTH = 500  # Meta-World's max_path_length.
# Model fields Meta-World's resets edit (object bodies and goal sites are moved there); the next
# reset simulates 50 steps with them before moving them again, so they are part of the state.
_EDITED_MODEL_FIELDS = ("body_pos", "site_pos")
# Attributes that only record how the environment was built (for pickling it), not state.
_CONSTRUCTION_ATTRIBUTES = ("_ezpickle_args", "_ezpickle_kwargs", "fullpath")

# Named groups, in Meta-World 3.1.1's order (tests/test_metaworld.py checks them against it).
TASK_SETS = {
    "ML1": {"train": SCENES, "test": SCENES},  # Same scenes; train vs test goals.
    "ML10": {
        "train": (
            "reach", "push", "pick-place", "door-open", "drawer-close", "button-press-topdown",
            "peg-insert-side", "window-open", "sweep", "basketball",
        ),
        "test": ("drawer-open", "door-close", "shelf-place", "sweep-into", "lever-pull"),
    },
    "ML45": {
        "train": tuple(
            s for s in SCENES
            if s not in ("bin-picking", "box-close", "hand-insert", "door-lock", "door-unlock")
        ),
        "test": ("bin-picking", "box-close", "hand-insert", "door-lock", "door-unlock"),
    },
    "MT10": {
        "train": (
            "reach", "push", "pick-place", "door-open", "drawer-open", "drawer-close",
            "button-press-topdown", "peg-insert-side", "window-open", "window-close",
        ),
        "test": (),
    },
    "MT50": {"train": SCENES, "test": ()},
}  # fmt: skip


MEMBER_SETS = {
    **{
        f"{name}/{split}": scenes
        for name, splits in TASK_SETS.items()
        if name != "ML1"
        for split, scenes in splits.items()
        if scenes
    },
    "MT10": TASK_SETS["MT10"]["train"],
    "MT50": TASK_SETS["MT50"]["train"],
}
"""Named scene sets a mixture (`envs.mixture`, keyword `members`) can train on: `ML10/train`,
`ML10/test`, `ML45/train`, `ML45/test`, `MT10` (= `MT10/train`), `MT50`. ML1's train and test
goals of one scene are the `goals` keyword, not a mixture."""


def scene_id(scene: str) -> str:
    """`"reach"` or `"reach-v3"` -> `"reach-v3"` (Meta-World's id); rejects unknown scenes."""
    name = scene[: -len(VERSION_SUFFIX)] if scene.endswith(VERSION_SUFFIX) else scene
    if name not in SCENES:
        import difflib

        close = difflib.get_close_matches(name, SCENES, n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise base.ConfigurationError(
            f"unknown Meta-World scene {scene!r}.{hint} Scenes: {', '.join(SCENES)}."
        )
    return name + VERSION_SUFFIX


def _owners(raw) -> dict:
    """The MuJoCo objects whose arrays Meta-World's attributes may be views of."""
    return {"data": raw.data, "model": raw.model}


def _choice(name: str, value: str, allowed) -> str:
    if value not in allowed:
        raise base.ConfigurationError(f"{name}={value!r} must be one of {', '.join(allowed)}")
    return value


class MetaWorld(base.Environment):
    """One Meta-World scene; 4-D actions in [-1, 1] (end-effector xyz delta, gripper)."""

    TASKS = TASKS
    CHOICES = {
        "scene": SCENES,
        "observation": OBSERVATIONS,
        "goals": GOALS,
        "render": mujoco_render.RENDER_MODES,
    }
    DOMAINS = {
        "scene": domains.one_of(*SCENES, *(s + VERSION_SUFFIX for s in SCENES)),
        "size": domains.positive,
        "goal_seed": domains.non_negative,
        "seed": domains.non_negative,
    }
    """What `envs.registry.factory` checks before building (a scene by either of its names)."""
    MEMBER_KEYWORD = "scene"
    MEMBER_SETS = MEMBER_SETS
    """Mixtures (`envs.mixture`): `members="ML10/train"` or a list of scenes."""

    def __init__(
        self,
        scene: str = "reach",
        observation: str = "state",
        goals: str = "random",
        goal_seed: int = 0,
        goal_observable: bool = True,
        size: int = 64,
        camera: str = "corner2",
        render: str = "fast",
        seed: int = 0,
    ):
        from mbxfer.envs import optional

        self.scene = scene_id(scene)
        self._observation = _choice("observation", observation, OBSERVATIONS)
        self._goals = _choice("goals", goals, GOALS)
        self._render = mujoco_render.check_render_mode(render)
        self._size, self._camera = size, camera
        self._goal_observable = goal_observable
        self._goal_seed = goal_seed
        mujoco_render.configure_headless()
        metaworld = optional.require("metaworld", "metaworld", "metaworld")
        from metaworld import env_dict

        pixels = self._observation != "state"
        self._env = env_dict.ALL_V3_ENVIRONMENTS[self.scene](width=size, height=size)
        self._env._set_task_called = True
        self._goal_set = None
        if goals == "random":
            self._env._freeze_rand_vec = False
            self._env.seeded_rand_vec = True
        else:
            benchmark = metaworld.ML1(self.scene, seed=goal_seed)
            self._goal_set = benchmark.train_tasks if goals == "train" else benchmark.test_tasks
        self._set_observability()
        if pixels and camera not in [
            self._env.model.camera(i).name for i in range(self._env.model.ncam)
        ]:
            raise base.ConfigurationError(f"Meta-World has no camera {camera!r}")
        self._flip = camera.startswith("corner")
        # Faithful is what Meta-World's own (gymnasium) renderer draws: the model's visual
        # settings, one persistent renderer at the target size (tests/test_rendering.py).
        self._renderer = (
            mujoco_render.Renderer(self._env.model, size, size, fast=render == "fast")
            if pixels
            else None
        )
        self._steps = 0
        self._needs_reset = True
        self.seed(seed)

    @property
    def tasks(self) -> tuple[str, ...]:
        return TASKS

    def seed(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)
        self._env.seed(int(seed))
        self._needs_reset = True

    def _keywords(self) -> dict:
        """The constructor keywords a state belongs to (all but the seed)."""
        return {
            "scene": self.scene,
            "observation": self._observation,
            "goals": self._goals,
            "goal_seed": self._goal_seed,
            "goal_observable": self._goal_observable,
            "size": self._size,
            "camera": self._camera,
            "render": self._render,
        }

    def get_state(self) -> dict:
        """Physics, the model's moved bodies and sites, every plain attribute of the Meta-World
        environment (goal sampler, goal, initial positions, path length, frame-stacking buffer)
        and this wrapper's generator and counters; see `envs.mujoco_state`."""
        raw = self._env
        return {
            "keywords": self._keywords(),
            "physics": mujoco_state.get_physics(raw.model, raw.data),
            "model": mujoco_state.get_model_fields(raw.model, _EDITED_MODEL_FIELDS),
            "attributes": mujoco_state.get_attributes(
                raw, _owners(raw), skip=_CONSTRUCTION_ATTRIBUTES
            ),
            "rng": copy.deepcopy(self._rng.bit_generator.state),
            "steps": self._steps,
            "needs_reset": self._needs_reset,
        }

    def set_state(self, state: dict) -> None:
        mujoco_state.check_keywords("Meta-World", state, self._keywords())
        raw = self._env
        mujoco_state.set_model_fields(raw.model, state["model"])
        mujoco_state.set_attributes(raw, state["attributes"], _owners(raw))
        self._set_observability()
        mujoco_state.set_physics(raw.model, raw.data, state["physics"])
        self._rng.bit_generator.state = copy.deepcopy(state["rng"])
        self._steps, self._needs_reset = int(state["steps"]), bool(state["needs_reset"])

    def _set_observability(self) -> None:
        partially_observable = not self._goal_observable
        if self._env._partially_observable != partially_observable:
            self._env._partially_observable = partially_observable
            self._env.__dict__.pop("sawyer_observation_space", None)  # A cached property:
            self._env.sawyer_observation_space  # noqa: B018 (recompute it; set_task deletes it)

    def reset(self) -> dm_env.TimeStep:
        if self._goal_set is not None:
            self._env.set_task(self._goal_set[int(self._rng.integers(len(self._goal_set)))])
            self._set_observability()
        state, _ = self._env.reset()
        self._steps = 0
        self._needs_reset = False
        return dm_env.restart(self._observe(state, np.zeros(len(TASKS), np.float32), 0.0))

    def step(self, action) -> dm_env.TimeStep:
        if self._needs_reset:
            return self.reset()
        action = np.clip(np.asarray(action, np.float32), -1.0, 1.0)
        state, reward, terminated, truncated, info = self._env.step(action)
        self._steps += 1
        success = float(info["success"])
        observation = self._observe(state, np.array([reward, success], np.float32), success)
        if terminated:  # Meta-World never terminates; kept for safety.
            self._needs_reset = True
            return dm_env.termination(np.float32(0.0), observation)
        if truncated or self._steps >= EPISODE_LENGTH:
            self._needs_reset = True
            return dm_env.truncation(np.float32(0.0), observation)
        return dm_env.transition(np.float32(0.0), observation)

    def _observe(self, state, task_rewards: np.ndarray, success: float) -> dict:
        observation = {}
        if self._observation != "pixels":
            observation["vector"] = np.asarray(state, np.float32)
        if self._observation != "state":
            observation["image"] = self.render()
        observation[base.TASK_REWARDS_KEY] = task_rewards
        observation["log_success"] = np.asarray(success, np.float32)
        return observation

    def render(self) -> np.ndarray:
        """The current frame as uint8 `[size, size, 3]` (with this environment's settings)."""
        if self._renderer is None:
            raise base.ConfigurationError("render() needs observation='pixels' or 'both'")
        return self._renderer.render(self._env.data, self._camera, flip=self._flip)

    def observation_spec(self) -> dict:
        spec = {}
        if self._observation != "pixels":
            spec["vector"] = base.vector_spec(STATE_SIZE)
        if self._observation != "state":
            spec["image"] = base.image_spec(self._size, self._size)
        spec[base.TASK_REWARDS_KEY] = base.task_rewards_spec(len(TASKS))
        spec["log_success"] = specs.Array((), np.float32, "log_success")
        return spec

    def action_spec(self) -> specs.BoundedArray:
        return base.continuous_action_spec(4)

    @property
    def raw(self):
        """The wrapped Meta-World environment (for scripted policies and tests)."""
        return self._env

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        self._env.close()
