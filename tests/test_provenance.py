"""Which code a trial ran: `provenance.code_version` in a git checkout, outside one, and the
label the report prints."""

import subprocess

from mbxfer.benchmarks import provenance


def _git(root, *args):
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)


def test_code_version_is_the_commit_and_a_hash_of_uncommitted_changes(tmp_path, monkeypatch):
    _git(tmp_path, "init", "-q")
    (tmp_path / "agent.py").write_text("lr = 1e-3\n")
    _git(tmp_path, "add", "agent.py")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    monkeypatch.setattr(provenance, "ROOT", tmp_path)
    clean = provenance.code_version()
    assert clean["commit"] == head and clean["changes"] is None
    (tmp_path / "notes.txt").write_text("untracked files are not in the hash\n")
    (tmp_path / "README.md").write_text("nor edits to tracked files that are not code\n")
    _git(tmp_path, "add", "README.md")
    assert provenance.code_version() == clean
    (tmp_path / "agent.py").write_text("lr = 3e-3\n")
    edited = provenance.code_version()
    assert edited["commit"] == head and len(edited["changes"]) == 12
    (tmp_path / "agent.py").write_text("lr = 1e-2\n")
    assert provenance.code_version()["changes"] not in (None, edited["changes"])
    assert provenance.label(edited) == f"{head[:12]}+changes {edited['changes'][:6]}"


def test_outside_a_checkout_only_the_version_is_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "ROOT", tmp_path)
    record = provenance.code_version()
    assert record["commit"] is None and record["changes"] is None
    assert provenance.label(record) == f"mbxfer {record['mbxfer']}"
    assert provenance.label(None) == "unrecorded"
