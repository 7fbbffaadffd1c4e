"""The registry of adapted tasks: atomic, idempotent by job id, safe names, corrupt files refused."""

import json

import pytest

from service.registry import RegisteredTask, Registry, RegistryError, check_name


def _task(name="cb", job="job-1"):
    return RegisteredTask(
        name=name,
        file="",
        sha256="",
        mode="prototype",
        source_task="mnli",
        source_score=0.9,
        k=16,
        steps=10,
        final_loss=0.5,
        job_id=job,
        model_version="v1",
    )


def test_register_then_read_back(tmp_path):
    reg = Registry(tmp_path)
    entry, created = reg.register(_task(), b"tensor-bytes")
    assert created and reg.version() == 1
    snap = reg.snapshot()
    assert list(snap.tasks) == ["cb"]
    assert reg.read_tensors(snap.tasks["cb"]) == b"tensor-bytes"
    assert not [p for p in (tmp_path / "tasks").iterdir() if p.name.startswith(".")], "temp files left"


def test_same_job_registers_once(tmp_path):
    reg = Registry(tmp_path)
    reg.register(_task(), b"a")
    entry, created = reg.register(_task(), b"a-second-run")
    assert not created and reg.version() == 1
    assert reg.read_tensors(entry) == b"a"


def test_other_job_for_an_existing_name_needs_replace(tmp_path):
    reg = Registry(tmp_path)
    reg.register(_task(), b"a")
    with pytest.raises(ValueError, match="replace=true"):
        reg.register(_task(job="job-2"), b"b")
    entry, created = reg.register(_task(job="job-2"), b"b", replace=True)
    assert created and reg.read_tensors(entry) == b"b" and reg.version() == 2
    assert len(list((tmp_path / "tasks").iterdir())) == 1, "the replaced file was not removed"


def test_remove(tmp_path):
    reg = Registry(tmp_path)
    reg.register(_task(), b"a")
    assert reg.remove("cb").name == "cb"
    assert reg.snapshot().tasks == {} and reg.version() == 2
    assert reg.remove("cb") is None


@pytest.mark.parametrize("name", ["../etc", "a/b", "a\\b", "", "A", "x" * 65, "bad\nname", ".hidden", "a..b"])
def test_names_that_could_escape_or_confuse_are_refused(name, tmp_path):
    with pytest.raises(ValueError, match="invalid task name"):
        check_name(name)
    with pytest.raises(ValueError):
        Registry(tmp_path).register(_task(name=name), b"x")
    assert not (tmp_path / "manifest.json").exists()


def test_corrupt_manifest_and_tensor_files_are_refused(tmp_path):
    reg = Registry(tmp_path)
    entry, _ = reg.register(_task(), b"abc")
    (tmp_path / "tasks" / entry.file).write_bytes(b"abX")
    with pytest.raises(RegistryError, match="corrupt"):
        reg.read_tensors(reg.snapshot().tasks["cb"])
    (tmp_path / "manifest.json").write_text(json.dumps({"version": 1})[:-3])
    with pytest.raises(RegistryError, match="manifest"):
        reg.snapshot()
