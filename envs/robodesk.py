"""RoboDesk (Kannan et al. 2021, `robodesk` 1.0.0) as one mbxfer environment with 9 tasks.

    env = registry.make("robodesk", task="open_drawer")            # images, dense reward
    env = registry.make("robodesk", reward="success", observation="state")

RoboDesk is one scene (a Franka arm at a desk with a drawer, a slide, three buttons, two blocks
and a ball) with many reward functions, so task transfer within RoboDesk is the same
environment with a new reward: every step computes all 9 tasks' rewards with RoboDesk's own
reward functions, reports them in `log_task_rewards` (order of `TASKS`) and the per-task
success flags in `log_success` (float32 `[9]`). `reward` picks the variant for all tasks:
`dense` (shaped, in [0, 1]), `sparse` (the success flag at every step) or `success` (1 on the
first step of an episode on which the task succeeds, else 0), as in RoboDesk.

Dynamics, resets, action conversion (5-D: end-effector xyz delta, wrist, gripper; inverse
kinematics) and rewards are RoboDesk's own code (a subclass that only replaces the observation
assembly, so states are not rendered twice), and are checked against the raw
`robodesk.RoboDesk` step for step in tests/test_robodesk.py. RoboDesk draws its reset
randomness from numpy's global generator; this environment swaps its own seeded state in for
that call only, so `seed(s)` reproduces `np.random.seed(s); robodesk.RoboDesk().reset()`
without touching anyone else's global random state.

Upstream quirks kept for faithfulness: `original_pos` of the objects are views of the live
positions, so the "did not move" terms are always satisfied and the lift/push-off dense
terms that compare against the start height are 0; RoboDesk's own state observation reports
object velocities as `qpos_objects`. Our `vector` (observation="state" or "both") is the
correct `[qpos (38), qvel (35), end effector (3)]`.

Observations: `observation="image"` (default, uint8 `[size, size, 3]`, RoboDesk's camera),
`"state"` or `"both"`; `render="fast"` / `"faithful"` (see `envs.mujoco_render`; fast renders
RoboDesk's cropped view directly at the target size). Episodes are 500 steps and end as a
truncation (discount 1). Installing RoboDesk pulls the legacy `gym` (its base class);
RoboDesk 1.0.0 uses `PIL.Image.ANTIALIAS`, removed in Pillow 10, for which this module adds
the alias `Image.LANCZOS` (the same filter) if it is missing.

Saved state (`get_state`, ~10 kB, see `envs.mujoco_state`): MuJoCo's integration state (with
the solver's warm start) of the scene and of RoboDesk's inverse-kinematics copy, RoboDesk's
attributes (step count, success, the `original_pos` views), the saved numpy random state its
resets draw from and the once-only success flags, so a restored copy continues mid-episode
bit for bit (tests/test_robodesk.py).
"""

from __future__ import annotations

import copy

import dm_env
import numpy as np
from dm_env import specs

from mbxfer import domains
from mbxfer.envs import base, mujoco_render, mujoco_state

TASKS = (
    "open_slide", "open_drawer", "push_green", "stack", "upright_block_off_table",
    "flat_block_in_bin", "flat_block_in_shelf", "lift_upright_block", "lift_ball",
)  # fmt: skip
REWARDS = ("dense", "sparse", "success")
OBSERVATIONS = ("image", "state", "both")
EPISODE_LENGTH = 500
STATE_SIZE = 38 + 35 + 3
# RoboDesk's camera: a free camera, rendered at 120x120, cropped to this box and resized.
_CAMERA = {"distance": 1.8, "azimuth": 90.0, "elevation": -60.0, "lookat": (0.0, 0.535, 1.1)}
_RAW_SIZE = 120
_CROP_BOX = (17, 25, 105, 89)  # PIL rounds RoboDesk's (16.75, 25.0, 105.0, 88.75).


def _desk_class():
    """The raw RoboDesk class, minus the per-step render of its observation."""
    import PIL.Image

    from mbxfer.envs import optional

    mujoco_render.configure_headless()
    if not hasattr(PIL.Image, "ANTIALIAS"):  # Removed in Pillow 10; RoboDesk 1.0.0 uses it.
        PIL.Image.ANTIALIAS = PIL.Image.LANCZOS
    # Legacy gym prints an "unmaintained" notice on import; RoboDesk only uses gym.Env/spaces.
    with optional.without_gym_notice():
        robodesk = optional.require("robodesk", "robodesk", "robodesk")

    class Desk(robodesk.RoboDesk):
        def _get_obs(self):  # Observations are assembled by `RoboDesk` below.
            return None

    return Desk


def _pointers(physics):
    """The `mujoco.MjModel` and `mujoco.MjData` of a dm_control physics."""
    return physics.model.ptr, physics.data.ptr


def _owners(desk) -> dict:
    """The MuJoCo objects whose arrays RoboDesk's attributes may be views of."""
    model, data = _pointers(desk.physics)
    return {"data": data, "ik_data": desk.physics_copy.data.ptr, "model": model}


class RoboDesk(base.Environment):
    """The RoboDesk scene with all 9 core tasks; 5-D actions in [-1, 1]."""

    TASKS = TASKS
    CHOICES = {"reward": REWARDS, "observation": OBSERVATIONS, "render": mujoco_render.RENDER_MODES}
    DOMAINS = {
        "size": domains.positive,
        "episode_length": domains.positive,
        "seed": domains.non_negative,
    }
    """What `envs.registry.factory` checks before anything is built."""

    def __init__(
        self,
        reward: str = "dense",
        observation: str = "image",
        size: int = 64,
        render: str = "fast",
        episode_length: int = EPISODE_LENGTH,
        seed: int = 0,
    ):
        for name, value, allowed in (
            ("reward", reward, REWARDS),
            ("observation", observation, OBSERVATIONS),
        ):
            if value not in allowed:
                raise base.ConfigurationError(
                    f"{name}={value!r} must be one of {', '.join(allowed)}"
                )
        self._render = mujoco_render.check_render_mode(render)
        self._reward_type, self._observation, self._size = reward, observation, size
        self._episode_length = episode_length
        self._desk = _desk_class()(reward="dense", episode_length=episode_length, image_size=size)
        self._physics = self._desk.physics
        self._renderer = None
        if observation != "state" and render == "fast":
            self._renderer = mujoco_render.Renderer(self._physics.model.ptr, size, size, fast=True)
            self._camera = self._free_camera()
        self._needs_reset = True
        self._succeeded = np.zeros(len(TASKS), bool)
        self.seed(seed)

    def _free_camera(self):
        import mujoco

        camera = mujoco.MjvCamera()
        mujoco.mjv_defaultFreeCamera(self._physics.model.ptr, camera)
        camera.type = mujoco.mjtCamera.mjCAMERA_FREE
        camera.distance, camera.azimuth = _CAMERA["distance"], _CAMERA["azimuth"]
        camera.elevation = _CAMERA["elevation"]
        camera.lookat[:] = _CAMERA["lookat"]
        return camera

    @property
    def tasks(self) -> tuple[str, ...]:
        return TASKS

    def seed(self, seed: int) -> None:
        self._random_state = np.random.RandomState(seed).get_state()
        self._needs_reset = True

    def _keywords(self) -> dict:
        """The constructor keywords a state belongs to (all but the seed)."""
        return {
            "reward": self._reward_type,
            "observation": self._observation,
            "size": self._size,
            "render": self._render,
            "episode_length": self._episode_length,
        }

    def get_state(self) -> dict:
        """Physics of the scene and of RoboDesk's inverse-kinematics copy, every plain attribute
        of RoboDesk (step count, success), the saved numpy random state its resets draw from
        and this wrapper's flags; see `envs.mujoco_state`."""
        desk = self._desk
        return {
            "keywords": self._keywords(),
            "physics": mujoco_state.get_physics(*_pointers(desk.physics)),
            "ik_physics": mujoco_state.get_physics(*_pointers(desk.physics_copy)),
            # `original_pos` holds views of the bodies' positions (an upstream quirk kept).
            "attributes": mujoco_state.get_attributes(desk, _owners(desk)),
            "random_state": copy.deepcopy(self._random_state),
            "succeeded": self._succeeded.copy(),
            "needs_reset": self._needs_reset,
        }

    def set_state(self, state: dict) -> None:
        mujoco_state.check_keywords("RoboDesk", state, self._keywords())
        desk = self._desk
        mujoco_state.set_attributes(desk, state["attributes"], _owners(desk))
        mujoco_state.set_physics(*_pointers(desk.physics), state["physics"])
        mujoco_state.set_physics(*_pointers(desk.physics_copy), state["ik_physics"])
        self._random_state = copy.deepcopy(state["random_state"])
        self._succeeded = np.array(state["succeeded"], bool)
        self._needs_reset = bool(state["needs_reset"])

    def reset(self) -> dm_env.TimeStep:
        outside = np.random.get_state()
        np.random.set_state(self._random_state)
        try:
            self._desk.reset()
        finally:
            self._random_state = np.random.get_state()
            np.random.set_state(outside)
        self._succeeded = np.zeros(len(TASKS), bool)
        self._needs_reset = False
        zeros = np.zeros(len(TASKS), np.float32)
        return dm_env.restart(self._observe(zeros, zeros))

    def step(self, action) -> dm_env.TimeStep:
        if self._needs_reset:
            return self.reset()
        action = np.clip(np.asarray(action, np.float32), -1.0, 1.0)
        _, _, done, _ = self._desk.step(action)
        success = np.array(
            [float(self._desk._get_task_reward(task, "success")) for task in TASKS], np.float32
        )
        if self._reward_type == "dense":
            task_rewards = np.array(
                [self._desk._get_task_reward(task, "dense_reward") for task in TASKS], np.float32
            )
        elif self._reward_type == "sparse":
            task_rewards = success
        else:
            task_rewards = (success > 0) & ~self._succeeded
            self._succeeded |= success > 0
        observation = self._observe(np.asarray(task_rewards, np.float32), success)
        if done:
            self._needs_reset = True
            return dm_env.truncation(np.float32(0.0), observation)
        return dm_env.transition(np.float32(0.0), observation)

    def _observe(self, task_rewards: np.ndarray, success: np.ndarray) -> dict:
        observation = {}
        if self._observation != "state":
            observation["image"] = self.render()
        if self._observation != "image":
            data = self._physics.data
            end_effector = self._physics.named.data.site_xpos["end_effector"]
            observation["vector"] = np.concatenate([data.qpos, data.qvel, end_effector]).astype(
                np.float32
            )
        observation[base.TASK_REWARDS_KEY] = task_rewards
        observation["log_success"] = success
        return observation

    def render(self) -> np.ndarray:
        """The current frame as uint8 `[size, size, 3]` (with this environment's settings)."""
        if self._renderer is None:
            return np.asarray(self._desk.render(resize=True), np.uint8)
        left, top, right, bottom = (c / _RAW_SIZE for c in _CROP_BOX)
        return self._renderer.render(
            self._physics.data.ptr, self._camera, crop=(left, top, right, bottom)
        )

    def observation_spec(self) -> dict:
        spec = {}
        if self._observation != "state":
            spec["image"] = base.image_spec(self._size, self._size)
        if self._observation != "image":
            spec["vector"] = base.vector_spec(STATE_SIZE)
        spec[base.TASK_REWARDS_KEY] = base.task_rewards_spec(len(TASKS))
        spec["log_success"] = specs.Array((len(TASKS),), np.float32, "log_success")
        return spec

    def action_spec(self) -> specs.BoundedArray:
        return base.continuous_action_spec(5)

    @property
    def raw(self):
        """The wrapped `robodesk.RoboDesk` (a subclass that does not render observations)."""
        return self._desk

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        # Free dm_control's render contexts (faithful mode) now: freed by the garbage collector
        # at an arbitrary point, they can deadlock on dm_control's render-executor lock.
        physics = self._physics
        with physics._contexts_lock:
            if physics._contexts:
                physics._free_rendering_contexts()
