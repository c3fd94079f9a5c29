"""Issue 17, items 1-3 and 11: nothing a user saved is deleted, two runs never share a folder, modes."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch

import qat
from qat.safety import LOCK_FILE, OutputLock
from tests.conftest import tiny_llama
from tests.reliability.helpers import one_line_error, run_in_process, train_args


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small qat export (tiny Llama, W4 g32) to re-export and overwrite."""
    folder = tmp_path_factory.mktemp("src") / "w4"
    model = tiny_llama()
    qat.quantize_model(model, qat.QuantConfig(init="rtn"))
    return qat.export_model(model, folder)


def test_export_into_a_folder_holding_its_source_deletes_nothing(exported, tmp_path, capsys):
    # Item 1: `qat export SRC --out DIR --overwrite` with DIR the parent of SRC used to delete SRC and
    # the user's notes, then print "exported to" with exit code 0.
    parent = tmp_path / "work"
    src = parent / "model"
    parent.mkdir()
    os.system(f"cp -r {exported} {src}")
    (parent / "notes.txt").write_text("mine")
    before = sorted(p.name for p in src.iterdir())
    code, err = run_in_process(["export", str(src), "--out", str(parent), "--overwrite"], capsys)
    assert code == 1
    one_line_error(err, "holds the input")
    assert (parent / "notes.txt").read_text() == "mine" and sorted(p.name for p in src.iterdir()) == before
    code, err = run_in_process(["export", str(src), "--out", str(src), "--overwrite"], capsys)
    assert code == 1 and "holds the input" in err


def test_quantize_overwrite_never_replaces_a_folder_of_user_files(minilm_path, tmp_path, capsys):
    # Item 1: `qat quantize --overwrite` into a folder of user files deleted them and set the folder to 700.
    out = tmp_path / "mine"
    out.mkdir(mode=0o755)
    (out / "thesis.tex").write_text("years of work")
    code, err = run_in_process(["quantize", "--model", minilm_path, "--out", str(out), "--overwrite"], capsys)
    assert code == 1
    one_line_error(err, "is not a qat export")
    assert (out / "thesis.tex").read_text() == "years of work"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755


def test_overwrite_replaces_an_earlier_export_but_not_one_with_user_files_added(exported, tmp_path, capsys):
    out = tmp_path / "again"
    assert run_in_process(["export", str(exported), "--out", str(out)], capsys)[0] == 0
    assert (out / ".qat-export").is_file()
    assert run_in_process(["export", str(exported), "--out", str(out), "--overwrite"], capsys)[0] == 0
    (out / "eval-results.csv").write_text("a,b")  # the user saved something inside the export
    code, err = run_in_process(["export", str(exported), "--out", str(out), "--overwrite"], capsys)
    assert code == 1
    one_line_error(err, "holds files qat did not write (eval-results.csv)")
    assert (out / "eval-results.csv").read_text() == "a,b"


def test_export_dir_equal_to_output_dir_is_refused_before_loading(llama, chat, tmp_path, capsys):
    # Item 2: export_dir == output_dir (or a parent of it) failed only after training, or with
    # --overwrite_output deleted every checkpoint-*.
    for export_dir, out in ((tmp_path / "run", tmp_path / "run"), (tmp_path, tmp_path / "run")):
        argv = ["train", *train_args(llama, chat, out, "--max_steps", "1", "--export_dir", str(export_dir),
                                     "--overwrite_output", "true")]
        code, err = run_in_process(argv, capsys)
        assert code == 1
        one_line_error(err, "would delete the run's checkpoints")
    assert not (tmp_path / "run").exists()  # refused before anything was written


def _hold_lock(folder):
    """Another process holding ``folder``'s run lock (a concurrent `qat train`), started and waited for."""
    code = ("import sys, time; from qat.safety import OutputLock; OutputLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": ""}, cwd=folder.parent)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_two_runs_on_one_output_dir_and_a_stale_lock(llama, chat, tmp_path, capsys):
    # Item 3: two runs at once on one output_dir mixed one's checkpoints with the other's export.
    out = tmp_path / "shared"
    other = _hold_lock(out)
    try:
        argv = ["train", *train_args(llama, chat, out, "--max_steps", "1", "--overwrite_output", "true")]
        code, err = run_in_process(argv, capsys)
        assert code == 1
        one_line_error(err, f"is in use by another qat run (pid {other.pid}")
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing of ours was written
    finally:
        other.send_signal(signal.SIGKILL)  # the holder dies without releasing: a stale lock file stays
        other.wait()
    assert str(other.pid) in (out / LOCK_FILE).read_text()
    # The lock is also refused while held inside one process (the Trainer's own concurrency is the same).
    with OutputLock(out):
        with pytest.raises(ValueError, match="in use"):
            OutputLock(out).acquire()
    (out / LOCK_FILE).write_text(f'{{"pid": {other.pid}, "started": "earlier"}}')
    argv = ["train", *train_args(llama, chat, out, "--max_steps", "1", "--overwrite_output", "true",
                                 "--verify_export", "false")]
    code, err = run_in_process(argv, capsys)
    assert code == 0, err
    assert f"taking over the lock of {out} left by process {other.pid}" in err
    assert (out / "checkpoint-1").is_dir() and (out / "export" / ".qat-export").is_file()
    assert (out / LOCK_FILE).read_text() == ""  # released at the end of the run


def test_exports_get_the_users_umask(exported, tmp_path):
    # Item 11: exports were folder mode 700 (mkdtemp) with weights 600 (safetensors), whatever the umask.
    from safetensors.torch import load_file

    old = os.umask(0o027)  # not the default, so a fixed mode cannot pass by chance
    try:
        out = qat.export_model(qat.load_quantized(exported), tmp_path / "shared")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir() if p.is_file()} == {0o640}
    again, first = load_file(out / "model.safetensors"), load_file(exported / "model.safetensors")
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)
