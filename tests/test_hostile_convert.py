"""The converter never destroys or hides a good model (issue 18): source and destination the same or nested are
refused; a conversion killed at any point leaves the destination as it was or complete, and the next run says
what it found; a folder another process makes at the destination is never deleted; a full disk is our error with
the bytes needed and no partial output. Issue 20: an int8 folder converted to float32 is dequantized."""

import json
import os
import random
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from helpers import save_tiny_checkpoint
from hostile import refused
from safetensors.torch import load_file

import qwen2audio
from qwen2audio.convert import convert
from qwen2audio.errors import WeightsError
from qwen2audio.folder_swap import destination_lock, recover

FAULTS = Path(__file__).with_name("convert_faults.py")
STEPS = ["shard-0-written", "shard-2-written", "complete", "exchanged"]  # folder_swap.step names, in order
FALLBACK_STEPS = ["complete", "journal-written", "old-moved-aside", "new-moved-in"]  # without renameat2


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> Path:
    """A checkpoint of ~0.5 MB (vocabulary 512), so that a conversion takes milliseconds."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("micro"), vocab_size=512, bos_token_id=None,
                                eos_token_id=None)


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.is_dir() else {}


def hidden_leftovers(dst: Path) -> list[str]:
    """What a conversion into dst left beside it: nothing, once a run has finished (a killed one leaves some)."""
    return sorted(p.name for p in dst.parent.glob(f".{dst.name}.*"))


def run_faults(cases: list[dict], tmp_path: Path) -> list[dict]:
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps(cases))
    out = subprocess.run([sys.executable, str(FAULTS), str(spec)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def versions(micro, tmp_path_factory) -> dict[str, dict[str, bytes]]:
    """The folder's two versions in these tests: "old" (float16, in one file) and "new" (bfloat16, in shards)."""
    base = tmp_path_factory.mktemp("versions")
    convert(micro, base / "old", dtype="float16")
    convert(micro, base / "new", dtype="bfloat16", max_shard_size="60KB")
    assert len(list((base / "new").glob("model-*.safetensors"))) >= 3  # so that shard-2-written is a real step
    return {"old": contents(base / "old"), "new": contents(base / "new"), "old_path": base / "old"}


def test_same_or_nested_folders_are_refused(micro, tmp_path):
    src = Path(shutil.copytree(micro, tmp_path / "src"))
    before = contents(src)
    for dst, message in [(src, "is the source folder itself"), (tmp_path / "src" / ".." / "src", "source folder itself"),
                         (src / "int8", "inside the source"), (tmp_path, "contains the source")]:
        with pytest.raises(WeightsError, match=message):
            convert(src, dst, quantize="int8", force=True)
    (tmp_path / "link").symlink_to(src)
    with pytest.raises(WeightsError, match="source folder itself"):
        convert(src, tmp_path / "link", force=True)
    assert contents(src) == before and sorted(p.name for p in src.iterdir()) == sorted(before)


def kill_cases(micro, versions, tmp_path, steps, fallback=False) -> list[dict]:
    cases = []
    for step in steps:
        for start in ("absent", "old"):
            dst = tmp_path / f"{step}-{start}{'-fallback' if fallback else ''}"
            if start == "old":
                shutil.copytree(versions["old_path"], dst)
            cases.append({"src": str(micro), "dst": str(dst), "dtype": "bfloat16", "max_shard_size": "60KB",
                          "force": True, "signal_at": step, "no_renameat2": fallback})
    return cases


@pytest.mark.parametrize("fallback", [False, True], ids=["renameat2", "two-renames"])
def test_killed_at_every_step_leaves_old_or_new_and_the_next_run_says_so(micro, versions, tmp_path, fallback):
    steps = FALLBACK_STEPS if fallback else STEPS
    cases = kill_cases(micro, versions, tmp_path, steps, fallback)
    results = run_faults(cases, tmp_path)
    for case, result in zip(cases, results):
        dst, started_old = Path(case["dst"]), case["dst"].endswith(("old", "old-fallback"))
        if not started_old and case["signal_at"] in ("exchanged", "journal-written", "old-moved-aside",
                                                      "new-moved-in"):
            continue  # a new destination is one rename: these steps are never reached
        assert result["killed"], (case["signal_at"], result)
        state = contents(dst)
        absent_ok = not started_old or (fallback and case["signal_at"] == "old-moved-aside")
        assert state in ([versions["old"], versions["new"]] + ([{}] if absent_ok else [])), case["signal_at"]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if state == {} and started_old:  # the fallback's window between its renames: the journal restores dst
                with destination_lock(dst):
                    recover(dst)
                assert contents(dst) == versions["new"] and "it now holds the new model" in str(caught[0].message)
            convert(micro, dst, dtype="bfloat16", max_shard_size="60KB", force=True)
        assert contents(dst) == versions["new"] and hidden_leftovers(dst) == []
        said = " ".join(str(w.message) for w in caught)  # every kill leaves something the next run reports
        assert f"beside {dst}" in said or f"replacing {dst}" in said, (case["signal_at"], said)


def test_killed_at_random_moments(micro, versions, tmp_path):
    start = time.perf_counter()
    convert(micro, tmp_path / "timed", dtype="bfloat16", max_shard_size="60KB")
    duration = time.perf_counter() - start
    rng = random.Random(18)
    cases = []
    for i in range(12):
        dst = tmp_path / f"random-{i}"
        shutil.copytree(versions["old_path"], dst)
        cases.append({"src": str(micro), "dst": str(dst), "dtype": "bfloat16", "max_shard_size": "60KB",
                      "force": True, "kill_after_s": rng.uniform(0, 1.5 * duration)})
    for case, result in zip(cases, run_faults(cases, tmp_path)):
        dst = Path(case["dst"])
        assert result["killed"] or result["exit"] == 0, result
        assert contents(dst) in (versions["old"], versions["new"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            convert(micro, dst, dtype="bfloat16", max_shard_size="60KB", force=True)
        assert contents(dst) == versions["new"] and hidden_leftovers(dst) == []


@pytest.mark.parametrize("start", ["absent", "empty"])
def test_a_folder_made_during_the_run_is_left_alone(micro, tmp_path, start):
    dst = tmp_path / "dst"
    if start == "empty":
        dst.mkdir()
    case = {"src": str(micro), "dst": str(dst), "dtype": "bfloat16", "max_shard_size": "60KB",
            "signal_at": "shard-1-written:STOP", "during": "create" if start == "absent" else "fill"}
    (result,) = run_faults([case], tmp_path)
    assert result["exit"] == 3 and "created or filled by another process" in result["error"], result
    assert contents(dst) == {"theirs.txt": b"someone else's file"} and hidden_leftovers(dst) == []


def test_a_file_size_limit_midway_is_our_error_with_the_bytes_needed(micro, tmp_path):
    dst = tmp_path / "dst"
    case = {"src": str(micro), "dst": str(dst), "dtype": "float32", "max_shard_size": "150KB",
            "rlimit_fsize": 100_000}  # no file may grow past 100 kB: the first 150 kB shard fails midway
    (result,) = run_faults([case], tmp_path)
    assert result["exit"] == 3, result
    assert result["error"].startswith("WeightsError: no room to write") and "bytes)" in result["error"]
    assert "partial output was removed" in result["error"]
    assert not dst.exists() and hidden_leftovers(dst) == []


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs (mounting needs root; skipped elsewhere)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None or \
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "none", str(disk)]).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)])


def test_a_full_disk_is_refused_before_writing(micro, small_disk):
    (small_disk / "filler").write_bytes(bytes(3 << 20))  # 1 MB left: the float32 conversion needs ~2 MB
    refused(lambda: convert(micro, small_disk / "dst", dtype="float32"), WeightsError, "needs about",
            "bytes) but the disk holding", "free")
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


def test_a_disk_that_fills_up_midway_is_our_error_and_the_output_is_removed(micro, small_disk, tmp_path):
    dst = small_disk / "dst"
    case = {"src": str(micro), "dst": str(dst), "dtype": "float32", "max_shard_size": "100KB",
            "signal_at": "shard-0-written:STOP", "during": "fill-disk"}  # another process fills the disk meanwhile
    (result,) = run_faults([case], tmp_path)
    assert result["exit"] == 3 and "no room to write" in result["error"], result
    assert "No space left on device" in result["error"] and "partial output was removed" in result["error"]
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


def test_int8_folder_converted_to_float32_is_dequantized(micro, tmp_path):
    int8 = convert(micro, tmp_path / "int8", quantize="int8")
    fp32 = convert(int8, tmp_path / "fp32", dtype="float32")
    raw = json.loads((fp32 / "config.json").read_text())
    assert "quantization_config" not in raw and raw["dtype"] == "float32"
    q, d = load_file(int8 / "model.safetensors"), load_file(fp32 / "model.safetensors")
    quantized = [k for k, v in q.items() if v.dtype == torch.int8]
    assert quantized and not any(k.endswith(".scales") for k in d) and {v.dtype for v in d.values()} == {torch.float32}
    for key in quantized:
        scales = q[key.removesuffix("weight") + "scales"].float()
        assert torch.equal(d[key], q[key].float() * scales[:, None])  # the dequantized int8, exactly
    model = qwen2audio.load_model(int8, quiet=True)  # and what our Int8Linear computes with
    layer = model.language_model.model.layers[0].mlp.down_proj
    assert torch.equal(d["language_model.model.layers.0.mlp.down_proj.weight"],
                       layer.weight.float() * layer.scales.float()[:, None])
    assert qwen2audio.load_model(fp32, quiet=True) is not None  # a plain float32 checkpoint again


def test_the_command_line_says_what_a_killed_run_left(micro, tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    try:
        import convert_weights
    finally:
        sys.path.pop(0)
    (tmp_path / ".dst.partial-abc123").mkdir()  # what a conversion killed while writing leaves
    (tmp_path / ".dst.partial-abc123" / "shard-0.partial").write_bytes(b"half")
    assert convert_weights.main([str(micro), str(tmp_path / "dst"), "--dtype", "bfloat16"]) == 0
    err = capsys.readouterr().err
    assert "note: removed .dst.partial-abc123" in err and f"left beside {tmp_path / 'dst'}" in err
    assert hidden_leftovers(tmp_path / "dst") == []
    assert convert_weights.main([str(micro), str(micro)]) == 1
    assert "error: " in capsys.readouterr().err
