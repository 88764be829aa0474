"""A dataset folder is untrusted input: every edit to its manifest or shards is refused, by name.

Each case collects nothing new: it copies one small collected dataset, edits it the
way a damaged disk, a careless hand or an attacker might, and opens it both ways a
dataset is opened (reading it, and resuming its collection).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save

import neurotap as nt
from neurotap.datasets import ActivationDataset, CorruptDatasetError, CorruptShardError, collect
from neurotap.datasets import format as dataset_format
from test_datasets import LAYER0, model, tiny  # noqa: F401 - the tiny model and its fixtures

ARGUMENTS = dict(seq_len=16, batch_size=2, tokens=640, shard_mb=0.05, progress=False)


@pytest.fixture(scope="module")
def original(model: nt.Model, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    folder = tmp_path_factory.mktemp("original") / "acts"
    ds = collect(model, [LAYER0], folder, **ARGUMENTS)
    assert ds.num_shards >= 4 and ds.complete
    return folder


@pytest.fixture
def acts(original: Path, tmp_path: Path) -> Path:
    """A fresh copy of the dataset, to edit."""
    return Path(shutil.copytree(original, tmp_path / "acts"))


def _edit(folder: Path, change: Callable[[dict[str, Any]], None]) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))


def _resume(folder: Path, model: nt.Model) -> None:  # noqa: F811
    collect(model, [LAYER0], folder, **ARGUMENTS)


@pytest.fixture(params=["read", "resume"])
def open_dataset(request: pytest.FixtureRequest, model: nt.Model) -> Callable[[Path], Any]:  # noqa: F811
    """Each way a dataset folder is opened: reading it, and resuming its collection."""
    if request.param == "read":
        return ActivationDataset
    return lambda folder: _resume(folder, model)


def _set(*keys: Any, value: Any = None, add: int = 0) -> Callable[[dict[str, Any]], None]:
    """An edit of one field: set it to ``value``, or add ``add`` to it."""

    def change(manifest: dict[str, Any]) -> None:
        parent = manifest
        for key in keys[:-1]:
            parent = parent[key]
        parent[keys[-1]] = parent[keys[-1]] + add if add else value

    return change


def _delete(*keys: Any) -> Callable[[dict[str, Any]], None]:
    def change(manifest: dict[str, Any]) -> None:
        parent = manifest
        for key in keys[:-1]:
            parent = parent[key]
        del parent[keys[-1]]

    return change


MANIFEST_EDITS = [
    pytest.param(_set("shards", 1, "tokens", add=-16), r"shards\[1\]\.tokens is \d+, expected \d+", id="shard-tokens"),
    pytest.param(_set("shards", 1, "sequences", add=-1), r"shards\[1\]\.sequences", id="shard-sequences"),
    pytest.param(_set("tokens", add=16), r"edited: tokens is \d+, expected \d+, the sum", id="total-tokens"),
    pytest.param(_set("shards", 2, "first_row", add=16), r"shards\[2\]\.first_row", id="first-row"),
    pytest.param(_set("shards", 2, "first_row", value=0), r"shards\[2\]\.first_row is 0", id="first-row-overlap"),
    pytest.param(_set("shapes", LAYER0, value=[32]), r"sequences_per_shard.*shapes", id="shapes-size"),
    pytest.param(_set("shapes", LAYER0, value=[64, 0]), r"shapes\['model.layers.0.output'\]", id="shapes-zero"),
    pytest.param(_set("shapes", value={"other": [64]}), r"edited: shapes is \['other'\]", id="shapes-points"),
    pytest.param(_set("settings", "dtype", value="float16"), r"settings\.dtype", id="dtype"),
    pytest.param(
        _set("settings", "dtype", value="int8"), r"settings\.dtype is 'int8', expected one of", id="dtype-name"
    ),
    pytest.param(_set("settings", "seq_len", value=32), r"settings\.seq_len", id="seq-len"),
    pytest.param(_set("settings", "seq_len", value="16"), r"settings\.seq_len is '16'", id="seq-len-type"),
    pytest.param(_set("settings", "tokens", value=2000), r"tokens is 640, expected 2000: settings\.tokens", id="asked"),
    pytest.param(_set("shards", 0, "index", value=False), r"shards\[0\]\.index is False", id="bool-for-int"),
    pytest.param(_set("shards", 2, "start", "token", add=1), r"shards\[2\]\.start", id="start"),
    pytest.param(_set("shards", 3, "sha256", value="00"), r"shards\[3\]\.sha256", id="sha256"),
    pytest.param(_delete("shards", 0, "bytes"), r"has no shards\[0\]\.bytes", id="missing-field"),
    pytest.param(
        _set("shards", 0, "file", value="../shard-00000.safetensors"), r"shards\[0\]\.file is '\.\./", id="dotdot"
    ),
    pytest.param(_set("shards", 1, "file", value="/etc/passwd"), r"shards\[1\]\.file is '/etc/passwd'", id="absolute"),
    pytest.param(_set("shards", 1, "file", value="shard-00000.safetensors"), r"shards\[1\]\.file", id="duplicate-name"),
]


@pytest.mark.parametrize("change, message", MANIFEST_EDITS)
def test_an_edited_manifest_is_refused_naming_the_field(
    acts: Path, open_dataset: Callable, change: Callable, message: str
) -> None:
    # a readable shard where "../shard-00000.safetensors" points, so that only the name is wrong
    shutil.copy(acts / "shard-00000.safetensors", acts.parent / "shard-00000.safetensors")
    _edit(acts, change)
    with pytest.raises(CorruptDatasetError, match=message) as caught:
        open_dataset(acts)
    assert type(caught.value) is CorruptDatasetError
    assert f"{acts / 'manifest.json'}" in str(caught.value)
    assert "collect again into a new folder" in str(caught.value)


def test_an_unedited_copy_reads_back_identically(acts: Path, original: Path, model: nt.Model) -> None:  # noqa: F811
    _edit(acts, lambda manifest: None)  # rewritten, not changed
    ds = ActivationDataset(acts)
    ds.verify()
    shards = [load_file(str(acts / s["file"])) for s in ds.manifest["shards"]]
    for name in (LAYER0, "tokens", "row.document"):
        assert torch.equal(ds.read(name), torch.cat([s[name] for s in shards])), name
    assert ds.text(0, 40) == ActivationDataset(original).text(0, 40)
    before = {p.name: p.read_bytes() for p in acts.glob("shard-*")}
    _resume(acts, model)
    assert {p.name: p.read_bytes() for p in acts.glob("shard-*")} == before
    assert not (acts / ".lock").exists()


def test_json_that_is_not_plain_data_is_refused(acts: Path) -> None:
    text = (acts / "manifest.json").read_text()
    (acts / "manifest.json").write_text(text.replace('"shard_mb": 0.05', '"shard_mb": NaN'))
    with pytest.raises(CorruptDatasetError, match="not valid JSON.*NaN"):
        ActivationDataset(acts)
    (acts / "manifest.json").write_text("[" * 100_000)
    with pytest.raises(CorruptDatasetError, match="not valid JSON"):
        ActivationDataset(acts)
    (acts / "manifest.json").write_text("[1, 2]")
    with pytest.raises(CorruptDatasetError, match="a JSON list, not an object"):
        ActivationDataset(acts)


def test_a_manifest_past_the_size_limit_is_not_parsed(acts: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    size = (acts / "manifest.json").stat().st_size
    monkeypatch.setattr(dataset_format, "MAX_MANIFEST_BYTES", size - 1)
    with pytest.raises(CorruptDatasetError, match=f"larger than the {size - 1:,} bytes a manifest may hold"):
        ActivationDataset(acts)
    monkeypatch.setattr(dataset_format, "MAX_MANIFEST_BYTES", size)
    ActivationDataset(acts)


def test_a_shard_linked_from_outside_the_folder_is_refused(acts: Path, open_dataset: Callable) -> None:
    outside = acts.parent / "elsewhere.safetensors"
    shutil.copy(acts / "shard-00001.safetensors", outside)  # the very same bytes: only where it lies is wrong
    (acts / "shard-00001.safetensors").unlink()
    (acts / "shard-00001.safetensors").symlink_to(outside)
    with pytest.raises(CorruptDatasetError, match=r"shard-00001\.safetensors is a link to .*outside the dataset"):
        open_dataset(acts)


def test_two_shards_that_are_one_file_are_refused(acts: Path, open_dataset: Callable) -> None:
    (acts / "shard-00001.safetensors").unlink()
    (acts / "shard-00001.safetensors").symlink_to("shard-00000.safetensors")
    with pytest.raises(CorruptDatasetError, match=r"shard-00001\.safetensors is the same file as an earlier shard"):
        open_dataset(acts)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are a POSIX file type")
def test_a_shard_that_is_not_a_regular_file_is_refused(acts: Path) -> None:
    (acts / "shard-00002.safetensors").unlink()
    os.mkfifo(acts / "shard-00002.safetensors")  # opening it to read would block forever
    with pytest.raises(CorruptDatasetError, match=r"shard-00002\.safetensors is not a regular file"):
        ActivationDataset(acts)


def _rewrite_shard(folder: Path, index: int, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Replace a shard by an edited one and record its new size and sha256, as a careful forger would."""
    path = folder / f"shard-{index:05d}.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    data = save(tensors, metadata={"format": "neurotap-activations/1"})
    path.write_bytes(data)
    _edit(folder, _set("shards", index, "bytes", value=len(data)))
    _edit(folder, _set("shards", index, "sha256", value=dataset_format.sha256_bytes(data)))


def _cast(tensors: dict[str, torch.Tensor]) -> None:
    tensors[LAYER0] = tensors[LAYER0].half()


def _drop_rows(tensors: dict[str, torch.Tensor]) -> None:
    for name in (LAYER0, "tokens", "row.document", "row.char_start", "row.char_end"):
        tensors[name] = tensors[name][:-16].clone()


def _add_entry(tensors: dict[str, torch.Tensor]) -> None:
    tensors["model.layers.1.output"] = tensors[LAYER0].clone()


def _reshape(tensors: dict[str, torch.Tensor]) -> None:
    tensors[LAYER0] = tensors[LAYER0].reshape(-1, 8, 8).clone()


SHARD_EDITS = [
    pytest.param(_cast, r"entry 'model\.layers\.0\.output' is F16 \[\d+, 64\].*give F32", id="dtype"),
    pytest.param(_drop_rows, r"entry 'tokens' is I32 \[\d+\], but shards\[1\]\.tokens", id="rows"),
    pytest.param(_add_entry, r"entries the manifest does not list: 'model\.layers\.1\.output'", id="extra-entry"),
    pytest.param(_reshape, r"is F32 \[\d+, 8, 8\], but shapes\['model\.layers\.0\.output'\]", id="shape"),
]


@pytest.mark.parametrize("change, message", SHARD_EDITS)
def test_a_shard_whose_header_disagrees_with_the_manifest_is_refused(
    acts: Path, open_dataset: Callable, change: Callable, message: str
) -> None:
    _rewrite_shard(acts, 1, change)
    with pytest.raises(CorruptShardError, match=r"shard-00001\.safetensors does not match the manifest.*" + message):
        open_dataset(acts)


def test_a_header_whose_offsets_do_not_tile_the_file_is_refused(acts: Path) -> None:
    path = acts / "shard-00001.safetensors"
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    begin, end = header[LAYER0]["data_offsets"]
    header[LAYER0]["shape"] = [header[LAYER0]["shape"][0] * 2, 64]  # claims twice the rows it stores
    header[LAYER0]["data_offsets"] = [begin, begin + 2 * (end - begin)]
    encoded = json.dumps(header).encode()
    forged = len(encoded).to_bytes(8, "little") + encoded + data[8 + length :]
    path.write_bytes(forged)
    _edit(acts, _set("shards", 1, "bytes", value=len(forged)))
    with pytest.raises(CorruptShardError, match=r"shard-00001\.safetensors is not a readable safetensors file"):
        ActivationDataset(acts, verify=False)


# -- resuming: the positions a restart carries on from --------------------------------------------


def _unfinished(keep: int, *edits: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    """An edit: the manifest as a run killed after ``keep`` shards left it, then ``edits``."""

    def change(manifest: dict[str, Any]) -> None:
        del manifest["shards"][keep:]
        manifest["tokens"] = sum(s["tokens"] for s in manifest["shards"])
        manifest["complete"] = manifest["exhausted"] = False
        for edit in edits:
            edit(manifest)

    return change


def test_an_interrupted_copy_resumes_to_the_same_bytes(acts: Path, original: Path, model: nt.Model) -> None:  # noqa: F811
    _edit(acts, _unfinished(2))
    _resume(acts, model)
    for path in sorted(original.iterdir()):
        assert (acts / path.name).read_bytes() == path.read_bytes(), path.name


RESUME_EDITS = [
    pytest.param(  # the restart would skip three tokens
        _unfinished(2, _set("shards", 1, "end", "token", add=3)),
        r"shards\[1\]\.end is .*, expected .*where packing its sequences",
        id="end",
    ),
    pytest.param(  # moved together, so that the shards still join up
        _unfinished(2, _set("shards", 0, "end", "token", add=1), _set("shards", 1, "start", "token", add=1)),
        r"shards\[1\]\.start is .*, expected the position its tokens",
        id="start",
    ),
    pytest.param(  # the same size, so sequences_per_shard still agrees
        _unfinished(0, _set("shapes", LAYER0, value=[8, 8])),
        r"shapes\['model\.layers\.0\.output'\] = \[8, 8\], but the model",
        id="shapes",
    ),
]


@pytest.mark.parametrize("change, message", RESUME_EDITS)
def test_resuming_checks_what_reading_does_not(
    acts: Path,
    model: nt.Model,  # noqa: F811
    change: Callable,
    message: str,
) -> None:
    _edit(acts, change)
    ActivationDataset(acts)  # reading uses neither the source positions nor the model
    with pytest.raises(CorruptDatasetError, match=message):
        _resume(acts, model)


# -- the folder and its lock -----------------------------------------------------------------------


def test_a_failed_start_in_a_given_empty_folder_leaves_it_empty(model: nt.Model, tmp_path: Path) -> None:  # noqa: F811
    folder = tmp_path / "mine"
    folder.mkdir()
    with pytest.raises(nt.NeurotapError, match=r"\[batch, sequence"):  # found by the first forward, in the folder
        collect(model, ["model.layers.0.self_attn.attention_interface.softmax"], folder, **ARGUMENTS)
    assert folder.is_dir() and not list(folder.iterdir())


@pytest.mark.skipif(sys.platform == "win32", reason="advisory locks are POSIX")
def test_a_folder_locked_by_another_run_is_refused_and_its_lock_kept(model: nt.Model, tmp_path: Path) -> None:  # noqa: F811
    import fcntl

    folder = tmp_path / "acts"
    folder.mkdir()
    with open(folder / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(nt.NeurotapError, match=f"another collect is writing to {folder}"):
            collect(model, [LAYER0], folder, **ARGUMENTS)
        assert (folder / ".lock").exists()
    assert not (folder / "manifest.json").exists()
    collect(model, [LAYER0], folder, **ARGUMENTS)  # once released, the folder is free
    assert not (folder / ".lock").exists()


# -- the command line ----------------------------------------------------------------------------------


def _neurotap_collect(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "neurotap", "collect", "--points", LAYER0, "--quiet", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _assert_one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("neurotap collect: "), lines
    assert message in lines[-1], lines[-1]


# the model does not exist: each of these must fail on --out before anything tries to load it
NO_MODEL = ("--model", "no-such-model-folder")


@pytest.mark.parametrize(
    "under, says",
    [("", "the output {file} is a file, not a folder"), ("acts", "lies under {file}, which is a file")],
)
def test_cli_refuses_an_output_that_is_or_lies_under_a_file(tmp_path: Path, under: str, says: str) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    result = _neurotap_collect(*NO_MODEL, "--out", str(tmp_path / "notes.txt" / under))
    _assert_one_line_error(result, says.format(file=tmp_path / "notes.txt"))
    assert (tmp_path / "notes.txt").read_text() == "mine"


def _unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot create files in."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    # root writes in any chmod-ed folder; sysfs refuses new files even to root
    try:
        descriptor, probe = tempfile.mkstemp(dir="/sys")
    except OSError:
        return Path("/sys")
    os.close(descriptor)
    os.unlink(probe)
    pytest.skip("running as root, where chmod does not stop writes, on a machine whose /sys takes new files")


def test_cli_refuses_an_output_it_cannot_write(tmp_path: Path) -> None:
    folder = _unwritable_folder(tmp_path)
    try:
        result = _neurotap_collect(*NO_MODEL, "--out", str(folder / "acts"))
        _assert_one_line_error(result, f"cannot make the output folder {folder / 'acts'}: {folder} is not writable")
        result = _neurotap_collect(*NO_MODEL, "--out", str(folder))
        _assert_one_line_error(result, f"cannot write in the output folder {folder}")
    finally:
        if folder.is_relative_to(tmp_path):
            folder.chmod(0o755)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--data", "missing.txt"), "does not exist"),
        (("--data", "no-field.jsonl"), "has no text field 'text'"),
        (("--data", "latin1.txt"), "is not UTF-8 text"),
        (("--seq-len", "1"), "seq_len must be at least 2"),
        (("--batch", "0"), "batch_size must be at least 1"),
        (("--tokens", "0"), "tokens must be positive"),
        (("--shard-mb", "0"), "shard_mb must be positive"),
        (("--data", "missing.txt", "--ranks", "2"), "does not exist"),  # before any rank is launched
    ],
)
def test_cli_checks_data_and_sizes_before_loading_the_model(tmp_path: Path, args: tuple, says: str) -> None:
    (tmp_path / "no-field.jsonl").write_text('{"body": "words"}\n')
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    args = tuple(str(tmp_path / a) if a.endswith((".txt", ".jsonl")) else a for a in args)
    result = _neurotap_collect(*NO_MODEL, "--out", str(tmp_path / "acts"), *args)
    _assert_one_line_error(result, says)
    assert not (tmp_path / "acts").exists()


def test_cli_refuses_a_seq_len_beyond_the_models_positions(tiny: Path, tmp_path: Path) -> None:  # noqa: F811
    result = _neurotap_collect("--model", str(tiny), "--seq-len", "4096", "--out", str(tmp_path / "acts"))
    _assert_one_line_error(result, "seq_len 4096 is longer than the model's 2048 positions")
    assert not (tmp_path / "acts").exists()  # nor its lock file
