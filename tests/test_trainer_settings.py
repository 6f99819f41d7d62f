"""Trainer settings through the stock nnUNetv2_train entry point, continuing with changed settings, and the
verification of the synthetic pool (tests/test_layers.py compares the copy of nnU-Net's get_dataloaders)."""
import re
import subprocess
import sys

import numpy as np
import pytest
from synthetic_fixtures import CPU_PLANS, SYNTHMIX_DATASET_ID, clean_environment, load_json, make_trainer

from nnunet_synth.dataset.raw_dataset import RawDataset
from nnunet_synth.trainers.settings import SETTINGS, resolve_settings
from nnunet_synth.trainers.synthetic_pool import pool_folder
from nnunet_synth.writer.synthetic_store import SyntheticStore, synthetic_case_id

BAD_VALUES = [
    ("nnsynth_ratio", "1.5", "outside [0, 1]"), ("nnsynth_ratio", "half", "not a number"),
    ("nnsynth_min_quality", "good", "not a number"), ("nnsynth_min_quality", "nan", "not a finite number"),
    ("nnsynth_min_quality", "-1", "outside [0, 1], the range of every quality score"),
    ("nnsynth_quality_key", "fid", "unknown quality key"),
    ("nnsynth_rare_oversampling", "2", "outside [0, 1]"), ("nnsynth_rare_oversampling", "often", "not a number"),
    ("nnsynth_seed", "abc", "not an integer"), ("nnsynth_seed", "1.5", "not an integer"),
    ("nnsynth_seed", "-1", "outside 0 .. 4294967295"), ("nnsynth_seed", "99999999999", "outside 0 .. 4294967295"),
    ("nnsynth_cpu_threads", "abc", "not an integer"), ("nnsynth_cpu_threads", "0", "must be at least 1"),
    ("nnsynth_paste_probability", "1.1", "outside [0, 1]"), ("nnsynth_paste_probability", "x", "not a number"),
    ("nnsynth_paste_components", "0", "must be at least 1"), ("nnsynth_paste_components", "two", "not an integer"),
    ("nnsynth_paste_classes", ",", "no class named"),
    ("nnsynth_paste_classes", "rarest,lesion", "rarest or pathology cannot be combined with other names"),
]


def test_every_setting_has_bad_values_under_test():
    assert {variable for variable, _, _ in BAD_VALUES} == {setting.variable for setting in SETTINGS}


def last_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr and stderr.count("nnsynth: error:") == 1, stderr[-3000:]
    return stderr.strip().splitlines()[-1]     # torch's FutureWarnings from nnU-Net's imports come before it


def test_bad_values_stop_the_stock_nnunetv2_train_in_one_line(planned_dataset, nnunet_folders, monkeypatch, capsys):
    """Every bad value through nnU-Net's own entry point (what the nnUNetv2_train script calls), in this process;
    the next test runs the script itself."""
    from nnunetv2.run.run_training import run_training_entry
    for name, value in clean_environment(nnunet_folders).items():
        monkeypatch.setenv(name, value)
    for variable, value, problem in BAD_VALUES:
        monkeypatch.setenv(variable, value)
        monkeypatch.setattr(sys, "argv", ["nnUNetv2_train", str(SYNTHMIX_DATASET_ID), "2d", "0", "-tr",
                                          "nnUNetTrainerSynthMix_debug", "-p", CPU_PLANS, "-device", "cpu"])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            run_training_entry()
        assert exit_info.value.code == 2, (variable, value)
        line = last_error_line(capsys.readouterr().err)
        assert line.startswith(f"nnsynth: error: {variable}={value}: {problem}: "), line
        monkeypatch.delenv(variable)


@pytest.mark.parametrize("variable, value, trainer", [("nnsynth_cpu_threads", "0", "nnUNetTrainerSynthMix_debug"),
                                                      ("nnsynth_ratio", "0.5", "nnUNetTrainerSynthMix_r25")])
def test_the_nnunetv2_train_script_prints_one_line_and_exits_2(planned_dataset, nnunet_folders, variable, value,
                                                               trainer):
    result = subprocess.run(["nnUNetv2_train", str(SYNTHMIX_DATASET_ID), "2d", "0", "-tr", trainer, "-p", CPU_PLANS,
                             "-device", "cpu"], env=clean_environment(nnunet_folders, **{variable: value}),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-2000:]
    assert last_error_line(result.stderr).startswith(f"nnsynth: error: {variable}={value}: ")


def test_trainer_defaults_and_fixed_values():
    fixed, defaults = {"ratio": 0.0}, {"paste_probability": 0.5}
    settings = resolve_settings("T", fixed, defaults, environ={})
    assert (settings.ratio, settings.paste_probability, settings.paste_components) == (0.0, 0.5, 1)
    assert (settings.sources["ratio"], settings.sources["paste_probability"]) == ("trainer", "trainer default")
    assert resolve_settings("T", fixed, defaults, environ={"nnsynth_paste_probability": "0.2"}).paste_probability == 0.2
    assert resolve_settings("T", environ={"nnsynth_seed": "none", "nnsynth_cpu_threads": ""}).seed is None


CHANGED = {"nnsynth_ratio": "0.25", "nnsynth_min_quality": "0.1", "nnsynth_quality_key": "segmentation",
           "nnsynth_rare_oversampling": "0.5", "nnsynth_seed": "7", "nnsynth_paste_probability": "0.3",
           "nnsynth_paste_components": "2", "nnsynth_paste_classes": "lesion"}


def test_continuing_with_any_changed_setting_is_refused(planned_dataset, monkeypatch, capsys):
    """A run started with the defaults is continued (current_epoch > 0, as after nnU-Net loads the checkpoint)
    with one setting changed at a time: each is refused in one line naming it. nnsynth_cpu_threads changes speed
    only and may differ."""
    from nnunet_synth.trainers.synth_mix import nnUNetTrainerSynthMix
    compared = {setting.variable for setting in SETTINGS if setting.compared_on_continue}
    assert set(CHANGED) == compared and "nnsynth_cpu_threads" not in compared
    for setting in SETTINGS:
        monkeypatch.delenv(setting.variable, raising=False)
    make_trainer(planned_dataset, nnUNetTrainerSynthMix).get_tr_and_val_datasets()     # writes synthmix.json
    for variable, value in CHANGED.items():
        monkeypatch.setenv(variable, value)
        trainer = make_trainer(planned_dataset, nnUNetTrainerSynthMix)
        trainer.current_epoch = 1
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            trainer.get_tr_and_val_datasets()
        assert exit_info.value.code == 2
        line = last_error_line(capsys.readouterr().err)
        assert re.search(f"started with {variable}=.* but would continue with {variable}=", line), line
        monkeypatch.delenv(variable)
    monkeypatch.setenv("nnsynth_cpu_threads", "1")
    trainer = make_trainer(planned_dataset, nnUNetTrainerSynthMix)
    trainer.current_epoch = 1
    trainer.get_tr_and_val_datasets()


# ------------------------------------------------------------------------------------------- pool verification
@pytest.fixture
def restore_afterwards(synthetic_example_dataset, planned_dataset):
    """Files a test damages, put back byte for byte at the end."""
    saved = {}

    def keep(path):
        saved.setdefault(path, path.read_bytes())
        return path
    yield keep
    for path, content in saved.items():
        path.write_bytes(content)


def trainer_stops_with(planned_dataset, capsys) -> str:
    from nnunet_synth.trainers.synth_mix import nnUNetTrainerSynthMix
    trainer = make_trainer(planned_dataset, nnUNetTrainerSynthMix)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        trainer.get_tr_and_val_datasets()
    assert exit_info.value.code == 2
    return last_error_line(capsys.readouterr().err)


def test_a_deleted_raw_file_is_named(planned_dataset, synthetic_example_dataset, restore_afterwards, monkeypatch,
                                     capsys):
    monkeypatch.setenv("nnsynth_ratio", "0.5")
    store = SyntheticStore(RawDataset(synthetic_example_dataset))
    label_file = restore_afterwards(store.label_file(synthetic_case_id(4, 0)))
    label_file.unlink()
    line = trainer_stops_with(planned_dataset, capsys)
    assert f"synthetic case {synthetic_case_id(4, 0)} (fold 0) has lost this file" in line
    assert line.startswith(f"nnsynth: error: {label_file}: ") and "nnsynth_generate" in line


def test_a_truncated_raw_file_is_named_and_never_trained_on(planned_dataset, synthetic_example_dataset,
                                                            restore_afterwards, monkeypatch, capsys):
    monkeypatch.setenv("nnsynth_ratio", "0.5")
    store = SyntheticStore(RawDataset(synthetic_example_dataset))
    image_file = restore_afterwards(store.image_file(synthetic_case_id(2, 0)))
    image_file.write_bytes(image_file.read_bytes()[:200])
    line = trainer_stops_with(planned_dataset, capsys)
    assert (f"synthetic case {synthetic_case_id(2, 0)} (fold 0) has a truncated or corrupt file "
            f"{image_file.name}") in line
    assert f"nnsynth_generate {synthetic_example_dataset.name} --fold 0 --overwrite" in line
    # nothing of it is left in the pool
    assert not any(path.name.startswith(synthetic_case_id(2, 0))
                   for path in pool_folder(planned_dataset, "nnUNetPlans_2d").iterdir())


def test_a_truncated_pool_file_is_preprocessed_again_and_named(planned_dataset, synthetic_example_dataset,
                                                               monkeypatch):
    from nnunet_synth.trainers.synth_mix import nnUNetTrainerSynthMix
    monkeypatch.setenv("nnsynth_ratio", "0.5")
    monkeypatch.setenv("nnsynth_min_quality", "none")       # every case in the training set, the repaired one too
    make_trainer(planned_dataset, nnUNetTrainerSynthMix).get_tr_and_val_datasets()     # pool up to date
    case_id = synthetic_case_id(5, 0)
    pool_file = pool_folder(planned_dataset, "nnUNetPlans_2d") / f"{case_id}_seg.b2nd"
    whole = pool_file.read_bytes()
    pool_file.write_bytes(whole[:len(whole) // 2])
    trainer = make_trainer(planned_dataset, nnUNetTrainerSynthMix)
    dataset_tr, _ = trainer.get_tr_and_val_datasets()
    summary = load_json(trainer.output_folder + "/synthmix.json")
    assert summary["pool"]["repaired"] == {
        case_id: f"preprocessed again: {case_id}_seg.b2nd had {len(whole) // 2} bytes instead of {len(whole)} "
                 f"(truncated or overwritten)"}
    assert summary["pool"]["preprocessed"] == [case_id]
    assert pool_file.stat().st_size == len(whole)
    seg = dataset_tr.load_case(case_id)[1]
    assert np.asarray(seg).size > 0
