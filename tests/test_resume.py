"""A resume checkpoint is only continued by the run that wrote it (same settings, inputs, process count)."""

import os

import pandas as pd
import torch
from test_train import finetune_settings, make_store, pretrain_settings

from retflow.train import finetune as ft
from retflow.train import pretrain as pt
from retflow.train.checkpoint import load_state, save_atomic
from retflow.train.resume import file_stamp, load_resume, run_fingerprint


def test_fingerprint_follows_settings_and_input_files_but_not_operational_keys(tmp_path):
    f = tmp_path / "init.pth"
    f.write_bytes(b"abc")
    base = run_fingerprint({"epochs": 3, "num_workers": 0, "device": "cpu"}, [f], world_size=1)
    assert run_fingerprint({"epochs": 3, "num_workers": 4, "device": "cuda", "compile": True}, [f], world_size=1) == base
    assert run_fingerprint({"epochs": 4, "num_workers": 0, "device": "cpu"}, [f], world_size=1) != base
    assert run_fingerprint({"epochs": 3, "num_workers": 0, "device": "cpu"}, [f], world_size=2) != base
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file was rewritten
    assert run_fingerprint({"epochs": 3, "num_workers": 0, "device": "cpu"}, [f], world_size=1) != base
    assert file_stamp(tmp_path / "absent") == [str(tmp_path / "absent"), None, None] and file_stamp(None)[0] is None


def test_fingerprint_of_pretrain_settings_follows_the_recipe_not_operational_fields():
    s = pretrain_settings()
    base = run_fingerprint(s, [], world_size=1)
    assert run_fingerprint(s.to_dict(), [], world_size=1) == base  # a record is fingerprinted as its dict
    assert run_fingerprint(s.replace(num_workers=4, device="cuda", compile=True, checkpoint_every_steps=9), [],
                           world_size=1) == base
    assert run_fingerprint(s.replace(epochs=4), [], world_size=1) != base
    assert run_fingerprint(s.replace(decoder=s.decoder.replace(depth=2)), [], world_size=1) != base
    simclr = pretrain_settings("simclr")
    assert run_fingerprint(simclr.replace(simclr=simclr.simclr.replace(temperature=0.5)), [], world_size=1) != \
        run_fingerprint(simclr, [], world_size=1)


def test_load_resume_ignores_another_runs_checkpoint_and_says_so(tmp_path, capsys):
    path = tmp_path / "resume" / "last.pth"
    assert load_resume(path, "abc") is None  # nothing to resume: silent
    save_atomic({"epoch": 2, "fingerprint": "abc"}, path)
    assert load_resume(path, "abc")["epoch"] == 2
    message = f"ignoring {path}: written by a run with other settings or inputs; training from the start\n"
    assert load_resume(path, "xyz") is None
    assert capsys.readouterr().out == message
    assert load_resume(path, "xyz", report=False) is None and capsys.readouterr().out == ""
    save_atomic({"epoch": 2}, path)  # written before fingerprints existed
    assert load_resume(path, "abc") is None and capsys.readouterr().out == message


def test_pretraining_rerun_with_other_settings_starts_afresh(tmp_path, capsys):
    pool = str(make_store(tmp_path / "pool", labelled=False))
    out = tmp_path / "mae"
    assert pt.run(pretrain_settings(epochs=2), [pool], out) == 0
    two = load_state(out / "checkpoint.pth")["model"]
    capsys.readouterr()
    # what Snakemake does when the settings changed: the job runs again in the same folder
    assert pt.run(pretrain_settings(epochs=3, blr=3e-4), [pool], out) == 0
    said = capsys.readouterr().out
    assert "ignoring" in said and "Resuming" not in said
    assert pd.read_csv(out / "log.csv").epoch.tolist() == [0, 1, 2]
    ref = tmp_path / "ref"
    assert pt.run(pretrain_settings(epochs=3, blr=3e-4), [pool], ref) == 0
    three, fresh = load_state(out / "checkpoint.pth")["model"], load_state(ref / "checkpoint.pth")["model"]
    key = "encoder.blocks.0.attn.qkv.weight"
    torch.testing.assert_close(three[key], fresh[key])  # the same as a run that never saw the old one
    assert not torch.equal(three[key], two[key])
    # the same settings again: the finished run's checkpoint is taken (no retraining)
    assert pt.run(pretrain_settings(epochs=3, blr=3e-4), [pool], out) == 0
    assert "Resuming from" in capsys.readouterr().out


def test_finetune_rerun_from_a_new_pretrained_encoder_does_not_resume_the_old_one(tmp_path, capsys):
    pool = str(make_store(tmp_path / "pool", labelled=False))
    store = str(make_store(tmp_path / "labelled"))
    mae = tmp_path / "mae"
    assert pt.run(pretrain_settings(epochs=1), [pool], mae) == 0
    out = tmp_path / "ft"
    assert ft.run(finetune_settings(epochs=2), store, str(mae / "checkpoint.pth"), out) == 0
    capsys.readouterr()
    assert ft.run(finetune_settings(epochs=2), store, str(mae / "checkpoint.pth"), out) == 0
    assert "Resuming from" in capsys.readouterr().out  # same run: continues (here: already done)
    # the encoder was pretrained again (upstream rerun): the fine-tune must start from it
    ckpt = load_state(mae / "checkpoint.pth")
    ckpt["model"] = {k: v + 0.01 for k, v in ckpt["model"].items()}
    save_atomic(ckpt, mae / "checkpoint.pth")
    assert ft.run(finetune_settings(epochs=2), store, str(mae / "checkpoint.pth"), out) == 0
    said = capsys.readouterr().out
    assert "ignoring" in said and "Resuming" not in said
    assert len(pd.read_csv(out / "train_log.csv")) == 2
