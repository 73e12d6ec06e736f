"""Registry: lookup, errors that name the fix, lazy entry points, plugins, descriptions."""

import textwrap

import gymnasium
import numpy as np
import pytest

from mbxfer.benchmarks import cli
from mbxfer.envs import registry, toy, vector
from mbxfer.envs.base import ConfigurationError


@pytest.fixture(autouse=True)
def isolated_registries(monkeypatch):
    """Registrations (ours and gymnasium's) and loaded plugins of a test end with it."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_PLUGINS_LOADED", registry._PLUGINS_LOADED)
    gym_ids = set(gymnasium.registry)
    yield
    for gym_id in set(gymnasium.registry) - gym_ids:
        del gymnasium.registry[gym_id]


def test_unknown_name_lists_close_names():
    with pytest.raises(registry.UnknownEnvironmentError, match="Did you mean: crafter"):
        registry.make("crafterr")
    with pytest.raises(ConfigurationError, match="Registered: .*grid"):
        registry.make("zzzz")


def test_bad_keyword_names_accepted_ones():
    with pytest.raises(registry.UnknownKeywordError) as error:
        registry.make("grid", sise=5)
    message = str(error.value)
    assert "'sise'" in message and "did you mean size" in message
    assert "Accepted:" in message and "num_items" in message and "task" in message
    with pytest.raises(registry.UnknownKeywordError):
        registry.factory("crafter", colour=1)  # Checked up front, not in a worker.


def test_defaults_and_overrides_reach_the_factory():
    registry.register("test_grid_small", "mbxfer.envs.toy:GridWorld", size=4, num_items=2)
    env = registry.make("test_grid_small", num_items=1)
    assert env.observation_spec()["vector"].shape == (2 * 4 * 4,)
    assert "test_grid_small" in registry.names()


def test_generic_keywords_become_wrappers():
    env = registry.make("grid", time_limit=3, image_size=8, task="collect_items")
    assert env.observation_spec()["image"].shape == (8, 8, 3)
    timestep = env.reset()
    steps = 0
    while not timestep.last():
        timestep = env.step(0)
        steps += 1
    assert steps == 3 and timestep.discount == 1.0


def _write_module(tmp_path, monkeypatch, name, body):
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))


def _write_plugin(tmp_path, monkeypatch, module, body, entry_points):
    """A real installed distribution on sys.path: a module and a dist-info declaring its
    `mbxfer.envs` entry points (importlib.metadata finds it as it finds pip-installed ones)."""
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(body))
    dist = tmp_path / f"{module}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
    lines = "".join(f"{name} = {module}:{function}\n" for name, function in entry_points.items())
    (dist / "entry_points.txt").write_text(f"[mbxfer.envs]\n{lines}")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_PLUGINS_LOADED", False)


def test_missing_optional_dependency_names_the_extra(tmp_path, monkeypatch):
    _write_module(tmp_path, monkeypatch, "needs_missing_pkg", "import mbxfer_absent_pkg\n")
    monkeypatch.setitem(registry.OPTIONAL_DEPENDENCIES, "mbxfer_absent_pkg", "robodesk")
    registry.register("test_missing", "needs_missing_pkg:make")
    with pytest.raises(registry.MissingDependencyError, match=r"pip install 'mbxfer\[robodesk\]'"):
        registry.make("test_missing")
    # Other environments are unaffected: the import is lazy.
    assert registry.make("grid").tasks


def test_unmapped_missing_dependency_names_the_package(tmp_path, monkeypatch):
    _write_module(tmp_path, monkeypatch, "needs_other_pkg", "import mbxfer_other_absent\n")
    registry.register("test_missing_other", "needs_other_pkg:make")
    with pytest.raises(registry.MissingDependencyError, match="pip install mbxfer_other_absent"):
        registry.make("test_missing_other")


def test_malformed_entry_point_is_rejected():
    with pytest.raises(ValueError, match="package.module:function"):
        registry.register("bad", "envs.toy.GridWorld")


def test_plugin_entry_point_group(tmp_path, monkeypatch):
    """A third-party distribution registers environments through `mbxfer.envs`."""
    _write_plugin(
        tmp_path,
        monkeypatch,
        "mbxfer_test_plugin",
        """
        from mbxfer.envs import registry

        def register_all():
            registry.register("plugin_grid", "mbxfer.envs.toy:GridWorld", size=5)
        """,
        {"plugin_grid": "register_all"},
    )
    assert "plugin_grid" in registry.names()
    assert registry.make("plugin_grid").observation_spec()["vector"].shape == (2 * 5 * 5,)


_GYM_PLUGIN = """
    import gymnasium
    from mbxfer.envs import registry

    def register_all():
        gymnasium.register(
            "MbxferPluginCart-v0",
            entry_point="gymnasium.envs.classic_control.cartpole:CartPoleEnv",
            max_episode_steps=5,
        )
        registry.register(
            "plugin_cart",
            "mbxfer.envs.wrappers:from_gymnasium",
            gym_id="MbxferPluginCart-v0",
            task="reward",
        )
    """


def test_plugin_environments_build_in_subprocess_workers(tmp_path, monkeypatch):
    """The gymnasium id a plugin registers in `register_all()` exists in spawned workers."""
    _write_plugin(tmp_path, monkeypatch, "mbxfer_gym_plugin", _GYM_PLUGIN, {"cart": "register_all"})
    recipe = registry.factory("plugin_cart")
    with vector.VectorEnv(recipe, num_envs=2, mode="process") as envs:
        timestep = envs.reset()
        assert timestep.observation["vector"].shape == (2, 4)
        for _ in range(6):  # Past the 5-step limit the plugin registered: auto-reset works.
            timestep = envs.step(np.zeros(2, int))
        assert envs.tasks == ("reward",)
    assert timestep.step_type.tolist() == [0, 0]


# -- describing without building ---------------------------------------------------------------
def _forbid_building(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("listing environments must not build them")

    monkeypatch.setattr(registry, "_build", refuse)
    monkeypatch.setattr(toy._ToyEnvironment, "__init__", refuse)  # Under every toy class.


def test_describe_reads_keywords_tasks_and_choices_without_building(monkeypatch):
    _forbid_building(monkeypatch)
    grid = registry.describe("grid_image", build_timeout=5.0)
    keywords = {k.name: k for k in grid.keywords}
    assert keywords["observation"].default == "image"  # The registered default wins.
    assert keywords["observation"].choices == ("image", "vector", "both")
    assert keywords["size"].default == 7 and grid.tasks == toy.GridWorld.TASKS
    procgen = registry.describe("procgen")
    game = {k.name: k for k in procgen.keywords}["game"]
    assert "starpilot" in game.choices and procgen.default_task == "reward"
    scene = {k.name: k for k in registry.describe("metaworld").keywords}["scene"]
    assert "pick-place" in scene.choices
    cartpole = registry.describe("cartpole")
    assert cartpole.any_keyword and cartpole.tasks == ("reward",)
    registry.register(
        "test_cart_tasks",
        "mbxfer.envs.wrappers:from_gymnasium",
        gym_id="CartPole-v1",
        task_rewards={"centered": "some_module:centered"},  # Declared: nothing is imported.
    )
    assert registry.describe("test_cart_tasks").tasks == ("reward", "centered")


def test_missing_dependency_is_shown_with_its_install_command(monkeypatch):
    monkeypatch.setitem(registry.OPTIONAL_DEPENDENCIES, "mbxfer_absent_sim", "procgen")
    registry.register(
        "test_needs_sim", "mbxfer.envs.toy:GridWorld", requires=("mbxfer_absent_sim",)
    )
    about = registry.describe("test_needs_sim")
    assert about.missing == ("mbxfer_absent_sim",)
    assert about.install == "pip install 'mbxfer[procgen]'"
    assert registry.describe("grid").missing == ()


def _grid_with_undeclared_tasks(seed=0):
    return toy.GridWorld(seed=seed)  # Tasks only on the instance, as a plugin might have them.


def test_undeclared_tasks_are_read_from_an_instance_within_the_time_box():
    registry.register("test_undeclared", _grid_with_undeclared_tasks)
    assert registry.describe("test_undeclared").tasks is None  # No time given: not built.
    assert registry.describe("test_undeclared", build_timeout=30.0).tasks == toy.GridWorld.TASKS


def test_mbxfer_envs_lists_keywords_without_building(monkeypatch, capsys):
    _forbid_building(monkeypatch)
    assert cli.main(["envs"]) == 0
    out = capsys.readouterr().out
    assert "game='coinrun', one of: bigfish, bossfight" in out
    assert "scene='reach', one of: assembly" in out
    assert "observation='image', one of: image, vector, both" in out
    assert "tasks:    reward (default), level_complete" in out
    assert "Every environment also takes: task, action_repeat" in out
