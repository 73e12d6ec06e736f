"""Registry: lookup, errors that name the fix, lazy entry points, plugins."""

import sys
import textwrap

import pytest
from mbxfer.envs import registry
from mbxfer.envs.base import ConfigurationError


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


def _write_module(tmp_path, name, body):
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    sys.path.insert(0, str(tmp_path))


def test_missing_optional_dependency_names_the_extra(tmp_path, monkeypatch):
    _write_module(tmp_path, "needs_missing_pkg", "import mbxfer_absent_pkg\n")
    monkeypatch.setitem(registry.OPTIONAL_DEPENDENCIES, "mbxfer_absent_pkg", "robodesk")
    registry.register("test_missing", "needs_missing_pkg:make")
    with pytest.raises(registry.MissingDependencyError, match=r"pip install 'mbxfer\[robodesk\]'"):
        registry.make("test_missing")
    # Other environments are unaffected: the import is lazy.
    assert registry.make("grid").tasks


def test_unmapped_missing_dependency_names_the_package(tmp_path):
    _write_module(tmp_path, "needs_other_pkg", "import mbxfer_other_absent\n")
    registry.register("test_missing_other", "needs_other_pkg:make")
    with pytest.raises(registry.MissingDependencyError, match="pip install mbxfer_other_absent"):
        registry.make("test_missing_other")


def test_malformed_entry_point_is_rejected():
    with pytest.raises(ValueError, match="package.module:function"):
        registry.register("bad", "envs.toy.GridWorld")


def test_plugin_entry_point_group(tmp_path, monkeypatch):
    """A third-party distribution registers environments through `mbxfer.envs`."""
    _write_module(
        tmp_path,
        "mbxfer_test_plugin",
        """
        from mbxfer.envs import registry

        def register_all():
            registry.register("plugin_grid", "mbxfer.envs.toy:GridWorld", size=5)
        """,
    )
    dist = tmp_path / "mbxfer_test_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: mbxfer-test-plugin\nVersion: 1.0\n"
    )
    (dist / "entry_points.txt").write_text(
        "[mbxfer.envs]\nplugin_grid = mbxfer_test_plugin:register_all\n"
    )
    monkeypatch.setattr(registry, "_PLUGINS_LOADED", False)
    assert "plugin_grid" in registry.names()
    assert registry.make("plugin_grid").observation_spec()["vector"].shape == (2 * 5 * 5,)
