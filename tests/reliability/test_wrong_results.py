"""Issue 17, items 4-8: no result that looks right but is wrong; kills, full disks and flipped bytes."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers

import qat
from qat.trainers import checkpoint as ckpt
from qat.trainers.trainer import QATTrainer
from tests.conftest import tiny_llama
from tests.reliability.helpers import one_line_error, run_in_process, run_subprocess, train_args
from tests.trainers.helpers import text_file, tiny_tokenizer


def _train(llama, chat, out, *extra):
    return ["train", *train_args(llama, chat, out, *extra)]


# ---------------------------------------------------------------------------------------- item 4
def test_wht_outside_is_refused_when_the_arguments_are_read(llama, chat, tmp_path, capsys):
    code, err = run_in_process(_train(llama, chat, tmp_path / "o", "--max_steps", "1", "--adapter", "wht",
                                      "--adapter_placement", "outside", "--adapter_init", "zero"), capsys)
    assert code == 1
    one_line_error(err, "adapter 'wht' with adapter_placement 'outside' cannot be exported")
    assert not (tmp_path / "o").exists()


def test_an_outside_export_that_fails_part_way_leaves_nothing(tmp_path, monkeypatch):
    # The base export went in, then writing the peft adapter failed (disk full): no export may remain
    # that holds config and weights but not the trained adapter.
    from qat.adapters import AdapterConfig, attach, export_with_peft
    import qat.export as ex

    model = tiny_llama()
    qat.quantize_model(model, qat.QuantConfig(init="rtn"))
    attach(model, AdapterConfig(kind="lora", rank=2, placement="outside"))
    real, calls = ex.swap_into_place, []

    def full_disk_on_second(tmp, out):
        calls.append(out)
        if len(calls) == 2:  # the adapter's swap, after the base's
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tmp, out)

    monkeypatch.setattr(ex, "swap_into_place", full_disk_on_second)
    with pytest.raises(OSError, match="No space"):
        export_with_peft(model, tmp_path / "export", tmp_path / "export-adapter")
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------- item 5
@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A tiny random BERT encoder (the embedding task) with the BPE test tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=128)
    transformers.BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_a_blow_up_without_nan_exits_non_zero_unless_allowed(tiny_bert, tmp_path, capsys):
    # lr 1e3 used to train, export, print "QAT recovers -1775.5%" and exit 0.
    data = text_file(tmp_path / "corpus.txt")
    argv = ["train", "--model_name_or_path", str(tiny_bert), "--dataset", str(data), "--max_steps", "3",
            "--learning_rate", "1000", "--step_learning_rate", "1000", "--max_eval_samples", "16",
            "--per_device_train_batch_size", "8", "--save_steps", "1", "--logging_steps", "1", "--warmup_steps", "0",
            "--disable_tqdm", "true", "--verify_export", "false", "--max_length", "32"]
    # keep_best (on by default) would export the step-0 state and hide the blow-up: this guards runs without it.
    code, err = run_in_process([*argv, "--keep_best", "false", "--output_dir", str(tmp_path / "a")], capsys)
    assert code == 1
    one_line_error(err, "the trained model is worse than post-training quantization (cosine")
    rows = json.loads((tmp_path / "a" / "metrics.json").read_text())["rows"]
    assert rows["qat"]["cosine"] < rows["post-training"]["cosine"] - 0.1  # the blow-up is real, not noise
    code, err = run_in_process([*argv, "--keep_best", "false", "--output_dir", str(tmp_path / "b"),
                                "--allow_worse_than_ptq", "true"], capsys)
    assert code == 0, err
    # With keep_best the same run exports its best dev state (step 0 here) and is no worse than post-training.
    code, err = run_in_process([*argv, "--output_dir", str(tmp_path / "c")], capsys)
    assert code == 0, err
    rows = json.loads((tmp_path / "c" / "metrics.json").read_text())["rows"]
    assert rows["qat"]["cosine"] >= rows["post-training"]["cosine"] - 1e-3  # eval-split noise between dev and eval


def test_worse_than_post_training_tolerates_noise_only():
    from qat.trainers.run import worse_than_post_training

    rows = {"float": {"cosine": 1.0}, "post-training": {"cosine": 0.96}, "qat": {"cosine": 0.959}}
    assert worse_than_post_training(rows) is None  # 0.001 below: within ABS_TOLERANCE
    rows["qat"]["cosine"] = 0.90
    assert "cosine 0.9000 vs 0.9600" in worse_than_post_training(rows)
    loss = {"float": {"loss": 2.0}, "post-training": {"loss": 3.0}, "qat": {"loss": float("nan")}}
    assert worse_than_post_training(loss) is not None


def test_a_matryoshka_run_is_judged_on_its_weighted_widths(tmp_path):
    """A Matryoshka run may trade its int8 model for its slices (the run's "qat" row is the int8 export),
    but not make the weighted mean of its widths worse; a plain run is judged on its "qat" row."""
    from qat.trainers.run import check_not_worse

    rows = {"float": {"cosine": 1.0}, "post-training": {"cosine": 0.9999}, "qat": {"cosine": 0.9586},
            "post-training, weighted widths": {"cosine": 0.80}, "qat, weighted widths": {"cosine": 0.85}}
    matryoshka = SimpleNamespace(matryoshka_widths=[8, 4, 2], allow_worse_than_ptq=False)
    check_not_worse(matryoshka, {"rows": rows}, tmp_path)  # int8 paid, the whole gained: accepted
    plain = SimpleNamespace(matryoshka_widths=None, allow_worse_than_ptq=False)
    with pytest.raises(ValueError, match="the trained model is worse than post-training quantization"):
        check_not_worse(plain, {"rows": rows}, tmp_path)
    rows["qat, weighted widths"]["cosine"] = 0.70  # the whole got worse: refused, naming what was judged
    with pytest.raises(ValueError, match="the weighted mean of the Matryoshka widths is worse .*cosine 0.7000"):
        check_not_worse(matryoshka, {"rows": rows}, tmp_path)


def test_a_matryoshka_report_has_each_width_and_their_weighted_mean(tiny_bert, tmp_path, capsys):
    """The job's rows score every width before and after training, and the weighted row is the
    matryoshka_weights mean of them; its int8 row is the in-memory twin of the reloaded "qat" row."""
    data = text_file(tmp_path / "corpus.txt")
    argv = ["train", "--model_name_or_path", str(tiny_bert), "--dataset", str(data), "--max_steps", "2",
            "--max_eval_samples", "16", "--per_device_train_batch_size", "4", "--save_strategy", "no",
            "--disable_tqdm", "true", "--max_length", "32", "--bits", "8", "--storage_bits", "8",
            "--train_mode", "fake_quant", "--adapter", "lora", "--quant_init", "rtn",
            "--matryoshka_widths", "[8, 4, 2]", "--matryoshka_weights", "[1, 2, 5]", "--allow_worse_than_ptq", "true",
            "--output_dir", str(tmp_path / "m")]
    code, err = run_in_process(argv, capsys)
    assert code == 0, err
    rows = json.loads((tmp_path / "m" / "metrics.json").read_text())["rows"]
    for label in ("post-training", "qat"):
        per = [rows[f"{label} int{b}"]["cosine"] for b in (8, 4, 2)]
        assert per[0] > per[2]  # the widths are different models (int2 of a random BERT is far off)
        mean = (1 * per[0] + 2 * per[1] + 5 * per[2]) / 8
        assert rows[f"{label}, weighted widths"]["cosine"] == pytest.approx(mean, abs=1e-12)  # float64 sum
    assert rows["post-training int8"] == rows["post-training"]  # the same model, measured twice
    assert rows["qat int8"]["cosine"] == pytest.approx(rows["qat"]["cosine"], abs=1e-4)  # reload: fp32 rounding


def _fake_checkpoint(folder: Path, step: int) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    for name in (ckpt.TRAINER_STATE_FILE, ckpt.TRAINABLE_FILE, ckpt.META_FILE):
        (path / name).write_text("{}")
    ckpt.write_manifest(path)
    return path


def test_rotation_keeps_the_lowest_loss_checkpoint(tmp_path):
    # A finite blow-up: the loss climbs after step 2; save_total_limit 2 used to keep only 4 and 5.
    for step in range(1, 6):
        _fake_checkpoint(tmp_path, step)
    trainer = SimpleNamespace(
        args=SimpleNamespace(save_total_limit=2),
        state=SimpleNamespace(best_model_checkpoint=None, log_history=[
            {"step": s, "loss": loss} for s, loss in zip(range(1, 6), (3.0, 1.5, 40.0, 900.0, 1e5))]))
    trainer._lowest_loss_checkpoint = lambda found: QATTrainer._lowest_loss_checkpoint(trainer, found)
    QATTrainer._rotate(trainer, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-5"]


def test_the_checkpoint_holding_the_diverged_weights_is_not_named_good(tmp_path):
    # NaN loss at step 5 comes from the weights saved as checkpoint-4: the last good one is checkpoint-2.
    for step in (2, 4):
        _fake_checkpoint(tmp_path, step)
    trainer = SimpleNamespace(args=SimpleNamespace(output_dir=str(tmp_path)))
    assert QATTrainer._last_good(trainer, 4).endswith(f"{tmp_path / 'checkpoint-2'})")


def test_saved_state_must_be_finite_and_sane():
    good = {"a.weight_scale": torch.full((4, 2), 0.01), "a.adapter.lora_B": torch.zeros(4, 2)}
    assert ckpt.state_problem(good) is None
    assert "NaN / inf" in ckpt.state_problem({**good, "a.adapter.lora_B": torch.full((4, 2), float("inf"))})
    assert "overflow" in ckpt.state_problem({**good, "a.adapter.lora_B": torch.full((4, 2), 1e30)})
    assert "step size of 0" in ckpt.state_problem({**good, "a.weight_scale": torch.zeros(4, 2)})
    assert ckpt.nonpositive_steps({**good, "a.weight_scale": torch.tensor([[-0.1, 0.1]])}) == (1, 2)


# ---------------------------------------------------------------------------------------- items 6, 7
def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")  # safetensors: u64 header size, JSON header, tensor bytes
    data[header + (len(data) - header) // 2] ^= 0x40
    path.write_bytes(bytes(data))


KILL_AT_SAVE = """
import os, signal, sys
from pathlib import Path
from qat.trainers import checkpoint
real = checkpoint.write_manifest
def killed_mid_save(folder):
    if Path(folder).name == "checkpoint-3":  # files written, manifest not yet: kill -9 now
        os.kill(os.getpid(), signal.SIGKILL)
    real(folder)
checkpoint.write_manifest = killed_mid_save
from qat.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_mid_save_flipped_byte_and_missing_state_then_resume(llama, chat, tmp_path, capsys):
    out = tmp_path / "run"
    done = run_subprocess(_train(llama, chat, out, "--max_steps", "6", "--save_total_limit", "0"), cwd=tmp_path,
                          code=KILL_AT_SAVE)
    assert done.returncode == -9, done.stderr[-2000:]  # SIGKILL mid-training, inside the third save
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == [
        ".checkpoint-3.partial", "checkpoint-1", "checkpoint-2"]
    # Item 6: a flipped byte in the newest checkpoint's trainable tensors; item 7: an older one without state.
    _flip_a_byte(out / "checkpoint-2" / ckpt.TRAINABLE_FILE)
    (out / "checkpoint-1" / ckpt.TRAINER_STATE_FILE).unlink()
    code, err = run_in_process(_train(llama, chat, out, "--max_steps", "6", "--resume_from_checkpoint", "true",
                                      "--verify_export", "false"), capsys)
    assert code == 1
    assert "removed" in err and ".checkpoint-3.partial" in err
    assert "skipping checkpoint-2 for resume: model." in err and "does not match the sha256 stored with it" in err
    assert "taking over the lock" in err  # the killed run's lock file
    assert "skipping checkpoint-1 for resume: it has no trainer_state.json" in err
    one_line_error(err, "no complete checkpoint-* in")


def test_tensor_checksums_catch_a_flip_the_safetensors_reader_accepts(llama, chat, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_in_process(_train(llama, chat, out, "--max_steps", "2", "--verify_export", "false"), capsys)[0] == 0
    target = out / "checkpoint-2"
    _flip_a_byte(target / ckpt.TRAINABLE_FILE)
    (target / ckpt.MANIFEST_FILE).unlink()  # without the file manifest the tensor checksums still catch it
    code, err = run_in_process(_train(llama, chat, out, "--max_steps", "4", "--resume_from_checkpoint", str(target),
                                      "--verify_export", "false"), capsys)
    assert code == 1
    one_line_error(err, "does not match the sha256 stored with it")
    # Resume from the newest complete checkpoint works and continues the step count.
    code, err = run_in_process(_train(llama, chat, out, "--max_steps", "3", "--resume_from_checkpoint", "true",
                                      "--verify_export", "false"), capsys)
    assert code == 0, err
    assert f"resuming from {out / 'checkpoint-1'}" in err  # checkpoint-2 failed its tensor checksum


def test_disk_full_during_a_save_leaves_whole_checkpoints_only(llama, chat, tmp_path, capsys, monkeypatch):
    import safetensors.torch

    real, calls = safetensors.torch.save_file, []

    def full_disk(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    out = tmp_path / "run"
    code, err = run_in_process(_train(llama, chat, out, "--max_steps", "3", "--verify_export", "false"), capsys)
    assert code == 1
    one_line_error(err, "No space left on device; the checkpoints written so far are whole")
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]
    assert ckpt.checkpoint_problem(out / "checkpoint-1") is None


def test_read_only_output_folder_is_one_sentence(llama, chat, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir(mode=0o555)
    if os.geteuid() == 0:  # root writes into 0555 folders: make the file system itself refuse, as a ro mount does
        real_mkdir = Path.mkdir

        def read_only(self, *args, **kwargs):
            if out in self.parents:
                raise OSError(errno.EROFS, "Read-only file system", str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", read_only)
    code, err = run_in_process(_train(llama, chat, out / "run", "--max_steps", "1"), capsys)
    assert code == 1
    one_line_error(err, "qat train: [Errno")
    assert "Read-only file system" in err or "Permission denied" in err
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------------------------------- item 8
KILL_IN_EXPORT = """
import os, signal, sys
import qat.export as ex
stage, how = sys.argv[1], getattr(signal, sys.argv[2])
if stage == "writing":
    ex.write_model_card = lambda *a, **k: os.kill(os.getpid(), how)
else:  # between moving the old export aside and renaming the new one into place
    real_rename = type(ex.Path()).rename
    def rename(self, target):
        out = real_rename(self, target)
        if ".old-" in str(target):
            os.kill(os.getpid(), how)
        return out
    type(ex.Path()).rename = rename
from qat.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_llama()
    qat.quantize_model(model, qat.QuantConfig(init="rtn"))
    return qat.export_model(model, tmp_path_factory.mktemp("src") / "w4")


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_interrupted_overwrite_exports_are_cleaned_and_restored(exported, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(exported, out)
    weights = (out / "model.safetensors").read_bytes()
    argv = ["export", str(exported), "--out", str(out), "--overwrite"]
    # SIGTERM while writing: the handler raises, the temporary folder goes at once.
    done = run_subprocess(["writing", "SIGTERM", *argv], cwd=tmp_path, code=KILL_IN_EXPORT)
    assert done.returncode == 128 + 15 and _hidden(tmp_path) == [], done.stderr[-2000:]
    # SIGKILL while writing: a hidden temp folder stays behind ...
    done = run_subprocess(["writing", "SIGKILL", *argv], cwd=tmp_path, code=KILL_IN_EXPORT)
    assert done.returncode == -9 and len(_hidden(tmp_path)) == 1 and ".out.tmp-" in _hidden(tmp_path)[0]
    # ... and SIGKILL between the two renames leaves the old export moved aside, `out` missing.
    # ... which the next run removes, saying so; SIGKILL between its two renames then leaves the old
    # export moved aside and `out` missing.
    done = run_subprocess(["swap", "SIGKILL", *argv], cwd=tmp_path, code=KILL_IN_EXPORT)
    assert "left by an interrupted export" in done.stderr
    assert done.returncode == -9 and not out.exists() and len(_hidden(tmp_path)) == 2
    # The next run restores the old export, removes the new one's leftovers, says so, and exports.
    code, err = run_in_process(argv, capsys)
    assert code == 0, err
    assert "restored" in err and "left by an interrupted export" in err
    assert _hidden(tmp_path) == [] and (out / "model.safetensors").read_bytes() == weights
