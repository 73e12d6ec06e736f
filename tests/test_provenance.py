"""Which code a trial ran: `provenance.code_version` in a git checkout, outside one, and the
label the report prints."""

import subprocess

from mbxfer.benchmarks import provenance


def _git(root, *args):
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)


def _commit(root, message):
    _git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message)


def test_code_version_hashes_the_code_a_trial_runs(tmp_path, monkeypatch):
    _git(tmp_path, "init", "-q")
    (tmp_path / "agents").mkdir()
    (tmp_path / "agents" / "agent.py").write_text("lr = 1e-3\n")
    _git(tmp_path, "add", "agents/agent.py")
    _commit(tmp_path, "one")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    monkeypatch.setattr(provenance, "ROOT", tmp_path)
    clean = provenance.code_version()
    assert clean["commit"] == head and clean["changes"] is None and len(clean["code"]) == 12
    # Untracked files, and tracked files that are not code (docs, tests), do not count, even
    # committed: the commit moves, the code hash does not.
    (tmp_path / "notes.txt").write_text("untracked\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_agent.py").write_text("def test(): pass\n")
    (tmp_path / "README.md").write_text("docs\n")
    _git(tmp_path, "add", "README.md", "tests/test_agent.py")
    assert provenance.code_version() == clean
    _commit(tmp_path, "docs and tests")
    moved = provenance.code_version()
    assert moved["commit"] != head and moved["code"] == clean["code"]
    # Uncommitted code changes count, and committing them keeps the code hash.
    (tmp_path / "agents" / "agent.py").write_text("lr = 3e-3\n")
    edited = provenance.code_version()
    assert len(edited["changes"]) == 12 and edited["code"] != clean["code"]
    (tmp_path / "agents" / "agent.py").write_text("lr = 1e-2\n")
    assert provenance.code_version()["code"] not in (clean["code"], edited["code"])
    (tmp_path / "agents" / "agent.py").write_text("lr = 3e-3\n")
    _git(tmp_path, "add", "agents/agent.py")
    _commit(tmp_path, "lr")
    committed = provenance.code_version()
    assert committed["changes"] is None and committed["commit"] != moved["commit"]
    assert provenance.label(committed) == f"code {committed['code']}"


def test_outside_a_checkout_only_the_version_is_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "ROOT", tmp_path)
    record = provenance.code_version()
    assert record["commit"] is None and record["code"] is None and record["changes"] is None
    assert provenance.label(record) == f"mbxfer {record['mbxfer']}"
    assert provenance.label(None) == "unrecorded"
