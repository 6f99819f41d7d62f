"""Bad input gets one line that names the file and the fix, a non-zero exit, and no traceback."""
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import run_entry_point

from nnunet_synth.dataset_tools import check_dataset as check_dataset_command
from nnunet_synth.dataset_tools import clean as clean_command
from nnunet_synth.dataset_tools import generate as generate_command
from nnunet_synth.dataset_tools import train_generator as train_generator_command
from nnunet_synth.nnunet_paths import nnunet_folder


def run_check(target, nnunet_raw):
    environment = dict(os.environ, nnUNet_raw=str(nnunet_raw))
    return subprocess.run(["nnsynth_check_dataset", str(target)], capture_output=True, text=True, timeout=900,
                          env=environment)


def check_here(dataset_folder):
    """``nnsynth_check_dataset FOLDER`` (or a dataset name or id) in this process (no interpreter start-up): the
    same entry point, its exit status and output. The console script itself runs in the subprocess rows above and
    below."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            check_dataset_command.main([str(dataset_folder)])
            code = 0
        except SystemExit as exit_:
            code = exit_.code
    return subprocess.CompletedProcess(["nnsynth_check_dataset", str(dataset_folder)], code, stdout.getvalue(),
                                       stderr.getvalue())


def assert_one_line_error(result, *expected_fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("nnsynth: error: ")
    for fragment in expected_fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def broken_copy(real_hu_dataset_folder, tmp_path):
    """A writable copy of the real HU dataset, to be broken by each test."""
    raw = tmp_path / "raw"
    copy = raw / "Dataset777_Broken"
    shutil.copytree(real_hu_dataset_folder, copy)
    return copy


def rewrite_volume(path, change):
    image = sitk.ReadImage(str(path))
    array = change(sitk.GetArrayFromImage(image))
    new_image = sitk.GetImageFromArray(array, isVector=False)
    if new_image.GetDimension() == image.GetDimension():
        new_image.CopyInformation(image) if new_image.GetSize() == image.GetSize() else None
    sitk.WriteImage(new_image, str(path))


def test_intact_copy_passes(broken_copy):
    result = run_check(broken_copy, broken_copy.parent)
    assert result.returncode == 0, result.stderr
    assert "5 cases, 30 slices" in result.stdout


def test_missing_dataset_json(broken_copy):
    (broken_copy / "dataset.json").unlink()
    assert_one_line_error(run_check(broken_copy, broken_copy.parent), "dataset.json", "generate_dataset_json")


def test_malformed_dataset_json(broken_copy):
    (broken_copy / "dataset.json").write_text('{"labels": {"background": 0,, }')
    assert_one_line_error(check_here(broken_copy), "dataset.json", "not valid JSON")


def test_dataset_json_without_required_keys(broken_copy):
    dataset_json = json.loads((broken_copy / "dataset.json").read_text())
    del dataset_json["file_ending"]
    (broken_copy / "dataset.json").write_text(json.dumps(dataset_json))
    assert_one_line_error(check_here(broken_copy), "dataset.json", "file_ending")


def test_unknown_dataset(broken_copy, monkeypatch):
    assert_one_line_error(run_check("Dataset778", broken_copy.parent), "unknown dataset", "Dataset778")
    monkeypatch.setenv("nnUNet_raw", str(broken_copy.parent))
    assert_one_line_error(check_here("not-a-dataset"), "not-a-dataset")


def test_dataset_by_short_name_and_id(broken_copy, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(broken_copy.parent))
    for name in ("Dataset777", "777", "Dataset777_Broken"):
        assert check_here(name).returncode == 0


def test_undeclared_label_value(broken_copy):
    label_file = broken_copy / "labelsTr" / "hu_01.nii.gz"
    rewrite_volume(label_file, lambda a: np.where(a == 1, 9, a).astype(a.dtype))
    assert_one_line_error(check_here(broken_copy), "hu_01.nii.gz", "[9]", "declare")


def test_image_label_shape_mismatch(broken_copy):
    label_file = broken_copy / "labelsTr" / "hu_02.nii.gz"
    rewrite_volume(label_file, lambda a: a[:, :50])
    assert_one_line_error(check_here(broken_copy), "hu_02.nii.gz", "same grid")


def test_nan_in_image(broken_copy):
    # SimpleITK's NIfTI reader turns NaN into 0, so NaN reaches a reader only through formats such as .mha:
    # store the copy as .mha (nnU-Net reads it with SimpleITKIO as well) and put a NaN into one image.
    for path in list(broken_copy.rglob("*.nii.gz")):
        array_image = sitk.ReadImage(str(path))
        if path.name == "hu_03_0000.nii.gz":
            array = sitk.GetArrayFromImage(array_image).astype(np.float32)
            array[0, 10, 10] = np.nan
            new_image = sitk.GetImageFromArray(array)
            new_image.CopyInformation(array_image)
            array_image = new_image
        sitk.WriteImage(array_image, str(path).replace(".nii.gz", ".mha"))
        path.unlink()
    dataset_json = json.loads((broken_copy / "dataset.json").read_text())
    dataset_json["file_ending"] = ".mha"
    (broken_copy / "dataset.json").write_text(json.dumps(dataset_json))
    assert_one_line_error(check_here(broken_copy), "hu_03_0000.mha", "NaN")


def test_a_lesion_free_label_map_is_accepted_as_nnunet_accepts_it(broken_copy):
    label_file = broken_copy / "labelsTr" / "hu_04.nii.gz"
    rewrite_volume(label_file, lambda a: np.zeros_like(a))
    result = check_here(broken_copy)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


@pytest.mark.parametrize("what", ["origin", "direction"])
def test_a_label_origin_or_direction_unlike_the_images_is_one_warning_as_in_nnunet(broken_copy, what):
    """nnU-Net refuses another spacing (a row of CORRUPTIONS) but only warns about origin and direction."""
    for case in ("hu_01", "hu_02"):
        label_file = broken_copy / "labelsTr" / f"{case}.nii.gz"
        image = sitk.ReadImage(str(label_file))
        if what == "origin":
            image.SetOrigin([o + 9 for o in image.GetOrigin()])
        else:
            image.SetDirection([-d if i == 0 else d for i, d in enumerate(image.GetDirection())])
        sitk.WriteImage(image, str(label_file))
    result = check_here(broken_copy)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("nnsynth: warning: ") and "hu_01.nii.gz" in lines[0], lines
    assert f"has {what}" in lines[0]


def test_wrong_dimensionality(broken_copy):
    image_file = broken_copy / "imagesTr" / "hu_00_0000.nii.gz"
    rewrite_volume(image_file, lambda a: np.stack([a, a]))      # a 4D file: two volumes in one image
    assert_one_line_error(check_here(broken_copy), "hu_00_0000.nii.gz", "channel")


def test_a_declared_channel_without_its_files_is_named(broken_copy):
    dataset_json = json.loads((broken_copy / "dataset.json").read_text())
    dataset_json["channel_names"] = {"0": "CT", "1": "PET"}
    (broken_copy / "dataset.json").write_text(json.dumps(dataset_json))
    assert_one_line_error(check_here(broken_copy), "dataset.json", "hu_00_0001.nii.gz",
                          "2 channels")


def test_num_training_mismatch(broken_copy):
    dataset_json = json.loads((broken_copy / "dataset.json").read_text())
    dataset_json["numTraining"] = 9
    (broken_copy / "dataset.json").write_text(json.dumps(dataset_json))
    assert_one_line_error(check_here(broken_copy), "numTraining")


# ---- every command, every defect: exit 2, one line, no traceback, real files byte-identical --------------------
#
# Rows that need no generator run the command in this process (no start-up cost) and are refused before anything
# is read beyond the dataset; rows that need one share the tiny generator of ``tiny_generator`` (fold 0 of a copy
# of the real HU data), and rows that need their own file system (a full disk, a read-only folder) mount a small
# tmpfs or a read-only bind mount, skipped where this machine does not allow it.

BIN = Path(sys.executable).parent
FAST_SAMPLING = ["--inference-steps", "2", "--batch-size", "2", "--device", "cpu"]


def real_file_hashes(dataset_folder) -> dict:
    """sha256 of every file of imagesTr/labelsTr and of dataset.json."""
    folder = Path(dataset_folder)
    files = [folder / "dataset.json", *sorted((folder / "imagesTr").rglob("*")),
             *sorted((folder / "labelsTr").rglob("*"))]
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest() for path in files
            if path.is_file()}


def synthetic_file_hashes(dataset_folder) -> dict:
    folder = Path(dataset_folder)
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for name in ("imagesSynth", "labelsSynth", "recordsSynth") for path in sorted((folder / name).glob("*"))}


def run_main(main, argv, capsys):
    """Run a command's main in this process; return (exit status, stderr)."""
    code, _, stderr = run_entry_point(main, argv, capsys)
    return code, stderr


PROGRESS_LINE = re.compile(r"^[^:]*: +\d+%\|")      # a tqdm bar, e.g. "sampling synthetic cases:  17%|█▋ |"


def assert_refused(code, stderr, *expected_fragments, after_progress=False):
    """Exit status 2 and exactly one line on stderr, ``nnsynth: error: ...`` with the fragments; with
    ``after_progress`` (a failure half-way through a run) the progress bars before it are allowed."""
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    if after_progress:
        lines = [line for line in lines if not PROGRESS_LINE.match(line)]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("nnsynth: error: ")
    for fragment in expected_fragments:
        assert fragment in lines[0], lines[0]


def run_command(*command, timeout=900, **environment):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **{k: str(v) for k, v in environment.items()}}
    return subprocess.run([str(BIN / command[0]), *map(str, command[1:])], capture_output=True, text=True,
                          timeout=timeout, env=env)


def assert_command_refused(result, *expected_fragments):
    assert_refused(result.returncode, result.stderr, *expected_fragments)


def copy_dataset(source, raw_root, dataset_id: int, name: str) -> Path:
    folder = Path(raw_root) / f"Dataset{dataset_id}_{name}"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("imagesSynth", "labelsSynth", "recordsSynth",
                                                                    "synthetic*"))
    return folder


@contextlib.contextmanager
def mounted(kind: str, target: Path, size: str = None, source: Path = None):
    """A small tmpfs (``kind='tmpfs'``) or a read-only bind mount of ``source`` (``kind='ro'``) at ``target``;
    skips the test where mounting is not allowed."""
    target.mkdir(parents=True, exist_ok=True)
    if kind == "tmpfs":
        command = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)]
    else:
        command = ["mount", "--bind", "-o", "ro", str(source), str(target)]
    try:
        mounting = subprocess.run(command, capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command on this machine")
    if mounting.returncode != 0:
        pytest.skip(f"cannot mount here ({mounting.stderr.strip()}): needs root and mount permission")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)



@pytest.fixture(scope="module")
def hu_copy(real_hu_dataset_folder, nnunet_folders):
    """A copy of the real HU dataset (Dataset781), the fold-0 source of the module's generator."""
    return copy_dataset(real_hu_dataset_folder, nnunet_folders["nnUNet_raw"], 781, "BadInput")


@pytest.fixture(scope="module")
def tiny_generator(hu_copy, tmp_path_factory):
    """A tiny generator (32x32, 4 steps, checkpoints at steps 2 and 4) on fold 0 of ``hu_copy``; its run folder."""
    from nnunet_synth.dataset import RawDataset
    from nnunet_synth.generator import TrainingSettings
    from nnunet_synth.generator.training import train_generator
    settings = TrainingSettings(preset="tiny", image_size=32, batch_size=2, max_steps=4, warmup_steps=1,
                                checkpoint_every=2, preview_every=100, preview_inference_steps=2)
    run_folder = tmp_path_factory.mktemp("bad_input_generator") / "run"
    train_generator(RawDataset(hu_copy), run_folder, settings, fold=0, progress=False)
    return run_folder


@pytest.fixture(scope="module")
def generated_copy(hu_copy, tiny_generator):
    """``hu_copy`` with 4 synthetic cases of fold 0 (seed 7): what the option rows must leave alone."""
    result = run_command("nnsynth_generate", hu_copy, "--generator", tiny_generator / "final", "-n", "4",
                         "--seed", "7", *FAST_SAMPLING)
    assert result.returncode == 0, result.stderr[-3000:]
    return hu_copy


BAD_GENERATE_OPTIONS = [
    (["--seed", "-1"], "--seed"),
    (["--inference-steps", "0"], "--inference-steps"),
    (["--inference-steps", "-5"], "--inference-steps"),
    (["--batch-size", "0"], "--batch-size"),
    (["-r", "nan"], "--ratio"),
    (["-r", "inf"], "--ratio"),
    (["-r", "-1"], "--ratio"),
    (["-r", "1e9"], "free"),
    (["-n", "1000000000"], "free"),
    (["-n", "0"], "--num-cases"),
    (["--device", "foo"], "--device 'foo'"),
    (["--noise-seeding", "5"], "--noise-seeding"),
    (["--noise-seeding", "0"], "--noise-seeding"),
    (["--target-share", "1.5"], "--target-share"),
    (["--target-factor", "inf"], "--target-factor"),
    (["--p-rotate", "2"], "--p-rotate"),
    (["--map-cap", "nan"], "--map-cap"),
    (["--map-load", "sparse"], "--map-load: invalid choice"),
    (["--map-load", "real", "--load-cap-percentile", "150"], "--load-cap-percentile"),
    (["--map-load", "real", "--load-from-percentile", "95", "--load-cap-percentile", "90"], "load_from_percentile"),
    (["--fold", "7"], "fold 7"),
    (["--num-shards", "2", "--shard-index", "2"], "--shard-index"),
]


@pytest.mark.parametrize("options, fragment", BAD_GENERATE_OPTIONS, ids=[" ".join(o) for o, _ in BAD_GENERATE_OPTIONS])
def test_bad_generate_options_are_refused_before_anything_is_removed(generated_copy, tiny_generator, capsys,
                                                                    options, fragment):
    real_before, synthetic_before = real_file_hashes(generated_copy), synthetic_file_hashes(generated_copy)
    argv = [str(generated_copy), "--overwrite", "--preset", "tiny", *FAST_SAMPLING, *options]
    if "--fold" not in options:
        argv += ["--generator", str(tiny_generator / "final")]
    assert_refused(*run_main(generate_command.main, argv, capsys), fragment)
    assert synthetic_file_hashes(generated_copy) == synthetic_before      # --overwrite removed nothing
    assert real_file_hashes(generated_copy) == real_before


def test_a_missing_cuda_device_is_refused(generated_copy, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    assert_refused(*run_main(generate_command.main, [str(generated_copy), "--device", "cuda", "-n", "2"], capsys),
                   "--device cuda", "no usable CUDA GPU")


def test_bad_training_options_are_refused_before_training(hu_copy, tmp_path, capsys):
    for options, fragment in [(["--lr", "nan"], "--lr"), (["--steps", "0"], "max_steps"),
                              (["--seed", "-1"], "--seed"), (["--window", "5", "1"], "--window"),
                              (["--offset-noise", "inf"], "--offset-noise"), (["--fold", "9"], "fold 9")]:
        output = tmp_path / "run"
        argv = [str(hu_copy), "--preset", "tiny", "--output", str(output), *options]
        assert_refused(*run_main(train_generator_command.main, argv, capsys), fragment)
        assert not output.exists()


def test_clean_refuses_a_fold_that_does_not_exist(generated_copy, capsys):
    synthetic_before = synthetic_file_hashes(generated_copy)
    assert_refused(*run_main(clean_command.main, [str(generated_copy), "--fold", "7"], capsys), "fold 7")
    assert synthetic_file_hashes(generated_copy) == synthetic_before


def test_an_export_onto_an_existing_dataset_id_is_refused(generated_copy, tiny_generator, covid_dataset_folder,
                                                          capsys):
    before = sorted(p.name for p in generated_copy.parent.iterdir())
    argv = [str(generated_copy), "--generator", str(tiny_generator / "final"), "-n", "4", "--seed", "7",
            *FAST_SAMPLING, "--export-standalone", "501"]
    assert_refused(*run_main(generate_command.main, argv, capsys), "501", "Dataset501_Covid19Lung", "free id")
    assert sorted(p.name for p in generated_copy.parent.iterdir()) == before


# -- corrupt cases: refused by nnsynth_check_dataset and by nnsynth_generate (also in a validation case) --------

def _rewrite(path, change, keep_geometry=True):
    image = sitk.ReadImage(str(path))
    new_image = change(image)
    sitk.WriteImage(new_image, str(path), True)


def _with_array(change):
    def apply(image):
        new_image = sitk.GetImageFromArray(change(sitk.GetArrayFromImage(image)))
        new_image.CopyInformation(image)
        return new_image
    return apply


def _with_geometry(setter, transform):
    def apply(image):
        setter(image, transform(image))
        return image
    return apply


def _nan_image(array):
    array = array.astype(np.float32)
    array[0, 10, 10], array[0, 11, 11] = np.nan, np.inf
    return array


def _negative_label(array):
    array = array.astype(np.int16)               # a signed label file
    array.flat[0] = -1
    return array


CORRUPTIONS = {
    "truncated image": ("imagesTr/{case}_0000.nii.gz", None, "truncated"),
    "NaN and Inf in a NIfTI image": ("imagesTr/{case}_0000.nii.gz", _with_array(_nan_image), "NaN"),
    "label spacing": ("labelsTr/{case}.nii.gz", _with_geometry(sitk.Image.SetSpacing,
                                                               lambda im: [s * 1.5 for s in im.GetSpacing()]),
                      "spacing"),
    "label -1": ("labelsTr/{case}.nii.gz", _with_array(_negative_label), "[-1]"),
    "constant image": ("imagesTr/{case}_0000.nii.gz", _with_array(lambda a: np.full_like(a, 40)), "constant"),
}


@pytest.fixture
def corrupt_copy(real_hu_dataset_folder, nnunet_folders, request):
    """A copy (Dataset782) with one defect in fold 0's *validation* case, which generation for fold 0 does not
    otherwise read."""
    from nnunet_synth.dataset import RawDataset
    from nnunet_synth.dataset.splits import fold_validation_cases
    folder = copy_dataset(real_hu_dataset_folder, nnunet_folders["nnUNet_raw"], 782, "Corrupt")
    case = fold_validation_cases(RawDataset(folder), 0)[0]
    relative, change, fragment = CORRUPTIONS[request.param]
    path = folder / relative.format(case=case)
    if change is None:
        os.truncate(path, path.stat().st_size // 2)
    else:
        _rewrite(path, change)
    return folder, path, fragment


@pytest.mark.parametrize("corrupt_copy", list(CORRUPTIONS), indirect=True)
def test_a_corrupt_case_is_refused_by_check_and_by_generate_before_training(corrupt_copy, capsys):
    folder, path, fragment = corrupt_copy
    real_before = real_file_hashes(folder)
    assert_refused(*run_main(check_dataset_command.main, [str(folder)], capsys), path.name, fragment)
    results = nnunet_folder("nnUNet_results") / folder.name
    assert_refused(*run_main(generate_command.main, [str(folder), "--preset", "tiny", "-n", "2", "--device", "cpu"],
                             capsys), path.name, fragment)
    assert not results.exists()                     # refused before a generator was trained
    assert real_file_hashes(folder) == real_before


def test_a_fold_whose_training_cases_hold_no_annotation_is_refused_before_training(real_hu_dataset_folder,
                                                                                  nnunet_folders, capsys):
    """Every training case of fold 0 lesion-free (background only): nothing to learn or balance in that fold. (A
    fold that lacks only some classes goes on without them: tests/test_real_datasets.py.)"""
    from nnunet_synth.dataset import RawDataset
    from nnunet_synth.dataset.splits import fold_training_cases
    folder = copy_dataset(real_hu_dataset_folder, nnunet_folders["nnUNet_raw"], 783, "NoAnnotationInTraining")
    dataset = RawDataset(folder)
    for case in fold_training_cases(dataset, 0):
        _rewrite(dataset.cases[case]["label"], _with_array(lambda a: np.zeros_like(a)))
    real_before = real_file_hashes(folder)
    code, stderr = run_main(generate_command.main, [str(folder), "--preset", "tiny", "-n", "2", "--device", "cpu"],
                            capsys)
    assert_refused(code, stderr, "fold 0", "hold no pixel of any pathology class")
    assert not (nnunet_folder("nnUNet_results") / folder.name).exists()
    assert real_file_hashes(folder) == real_before


# -- generators and checkpoints ----------------------------------------------------------------------------------

def _damage(path: Path, how: str):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[:len(data) // 2])
    else:                                            # garbled: the header and the middle overwritten
        garbled = bytearray(data)
        garbled[:64] = b"\xff" * 64
        garbled[len(data) // 2:len(data) // 2 + 4096] = os.urandom(4096)
        path.write_bytes(bytes(garbled))


@pytest.mark.parametrize("how", ["truncated", "garbled"])
def test_a_damaged_generator_is_refused_in_one_line(generated_copy, tiny_generator, tmp_path, capsys, how):
    copy = tmp_path / "generator"
    shutil.copytree(tiny_generator / "final", copy)
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    _damage(weights, how)
    synthetic_before = synthetic_file_hashes(generated_copy)
    argv = [str(generated_copy), "--generator", str(copy), "-n", "4", "--seed", "7", "--overwrite", *FAST_SAMPLING]
    assert_refused(*run_main(generate_command.main, argv, capsys), "diffusion_pytorch_model.safetensors",
                   "truncated or damaged")
    assert synthetic_file_hashes(generated_copy) == synthetic_before


def test_a_truncated_checkpoint_on_resume_is_refused_in_one_line(hu_copy, tiny_generator, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_generator, run)
    shutil.rmtree(run / "final")                    # resume from the newest checkpoint, which is damaged
    newest = sorted((run / "checkpoints").iterdir())[-1]
    _damage(newest / "model.safetensors", "truncated")
    argv = [str(hu_copy), "--fold", "0", "--preset", "tiny", "--output", str(run), "--image-size", "32",
            "--batch-size", "2", "--steps", "4", "--warmup-steps", "1", "--checkpoint-every", "2", "--preview-every",
            "100", "--preview-inference-steps", "2", "--no-progress"]
    assert_refused(*run_main(train_generator_command.main, argv, capsys), newest.name, "cannot be read", "delete")


@pytest.mark.slow
def test_a_full_results_disk_during_training_is_one_line_and_leaves_no_final_model(hu_copy, tmp_path):
    with mounted("tmpfs", tmp_path / "small_results", size="2m") as results:
        run = results / "run"
        result = run_command("nnsynth_train_generator", hu_copy, "--fold", "0", "--preset", "tiny", "--output", run,
                             "--image-size", "32", "--batch-size", "2", "--steps", "2", "--warmup-steps", "1",
                             "--checkpoint-every", "2", "--preview-every", "100", "--preview-inference-steps", "2",
                             "--no-progress")
        assert_command_refused(result, "No space left on device", "free space")
        assert not (run / "final").exists()


# -- the environment: read-only dataset folder, full disk -----------------------------------------------------

def test_a_read_only_dataset_folder_is_refused_before_training(real_hu_dataset_folder, tmp_path, monkeypatch,
                                                               capsys):
    source = copy_dataset(real_hu_dataset_folder, tmp_path / "writable", 784, "ReadOnly")
    raw = tmp_path / "raw"
    real_before = real_file_hashes(source)
    with mounted("ro", raw, source=source.parent):
        results = tmp_path / "results"
        monkeypatch.setenv("nnUNet_raw", str(raw))
        monkeypatch.setenv("nnUNet_results", str(results))
        for main, argv in ((generate_command.main, [str(raw / source.name), "--preset", "tiny", "-n", "2",
                                                    "--device", "cpu"]),
                           (clean_command.main, [str(raw / source.name)])):
            assert_refused(*run_main(main, argv, capsys), "Read-only file system", "writable")
        assert not results.exists()
    assert real_file_hashes(source) == real_before


def _incomplete_synthetic_files(folder: Path) -> list:
    """Files under a final synthetic name that nibabel cannot decode fully, and temporary files left behind."""
    import nibabel
    bad = []
    for name in ("imagesSynth", "labelsSynth"):
        for path in sorted((folder / name).glob("*")) if (folder / name).is_dir() else []:
            if path.name.startswith(".nnsynth_tmp_"):
                bad.append(path)
                continue
            try:
                np.asanyarray(nibabel.load(str(path)).dataobj)
            except Exception:
                bad.append(path)
    return bad


def start_command(*command, **environment) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **{k: str(v) for k, v in environment.items()}}
    return subprocess.Popen([str(BIN / command[0]), *map(str, command[1:])], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def wait_for_claim(process: subprocess.Popen, dataset_folder: Path, timeout=600):
    """Until ``process`` holds its fold's claim: its checks passed, no case is written yet."""
    claims = dataset_folder / "synthetic.claims"
    deadline = time.time() + timeout
    while not (claims.is_dir() and any(claims.glob("fold_0.shard_*.lock"))):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline, "the command never claimed its fold"
        time.sleep(0.02)


@pytest.mark.slow
def test_a_full_disk_while_writing_cases_is_one_line_and_the_rerun_completes(real_hu_dataset_folder, tiny_generator,
                                                                            tmp_path, monkeypatch, capsys):
    with mounted("tmpfs", tmp_path / "small_raw", size="4m") as raw:
        folder = copy_dataset(real_hu_dataset_folder, raw, 785, "FullDisk")
        real_before = real_file_hashes(folder)
        command = ["nnsynth_generate", folder, "--generator", tiny_generator / "final", "-n", "6", "--seed", "3",
                   *FAST_SAMPLING]
        running = start_command(*command, nnUNet_raw=raw)
        wait_for_claim(running, folder)
        running.send_signal(signal.SIGSTOP)         # the checks passed; now the disk fills up under it
        filler = raw / "filler.bin"
        with open(filler, "wb") as handle:
            handle.write(b"\0" * max(0, shutil.disk_usage(raw).free - 40 * 1024))   # room for one case or so
        running.send_signal(signal.SIGCONT)
        _, stderr = running.communicate(timeout=900)
        assert_refused(running.returncode, stderr, "No space left on device", "free space", after_progress=True)
        assert _incomplete_synthetic_files(folder) == []           # complete or absent
        filler.unlink()
        monkeypatch.setenv("nnUNet_raw", str(raw))             # the rerun in this process
        code, stdout, stderr = run_entry_point(generate_command.main, command[1:], capsys)
        assert code == 0, stderr[-3000:]
        assert "6 synthetic cases" in stdout
        assert _incomplete_synthetic_files(folder) == []
        assert real_file_hashes(folder) == real_before


# -- concurrent runs on one fold --------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_concurrent_run_with_other_settings_is_refused_and_the_first_runs_cases_stay_intact(
        real_hu_dataset_folder, nnunet_folders, tiny_generator, capsys):
    from nnunet_synth.dataset import RawDataset
    from nnunet_synth.writer.synthetic_store import SyntheticStore
    folder = copy_dataset(real_hu_dataset_folder, nnunet_folders["nnUNet_raw"], 786, "Concurrent")
    real_before = real_file_hashes(folder)
    generator = tiny_generator / "final"
    base = ["nnsynth_generate", folder, "--generator", generator, "-n", "8", "--inference-steps", "2",
            "--device", "cpu"]
    first = start_command(*base, "--seed", "7", "--batch-size", "2")
    wait_for_claim(first, folder)
    first.send_signal(signal.SIGSTOP)               # holds its claim, has written no case yet
    try:
        second = run_command(*base, "--seed", "8", "--batch-size", "4")
        same = run_command(*base, "--seed", "7", "--batch-size", "2")
    finally:
        first.send_signal(signal.SIGCONT)
    assert_command_refused(second, "another nnsynth_generate", "seed 7 -> 8", "batch_size 2 -> 4")
    assert_command_refused(same, "another nnsynth_generate", "same settings", "--shard-index")
    _, stderr = first.communicate(timeout=900)
    assert first.returncode == 0, stderr[-3000:]
    store = SyntheticStore(RawDataset(folder))
    cases = store.complete_case_ids("0")
    assert len(cases) == 8
    assert {store.cases[case]["recipe"]["seed"] for case in cases} == {7}
    assert store.fold_record("0")["settings"]["seed"] == 7
    assert store.recipe_mismatches("0") == []
    # after the first run, another seed is refused up front, and the same one resumes (writes nothing); in this
    # process, as the console script's entry point
    synthetic_before = synthetic_file_hashes(folder)
    argv = [str(argument) for argument in base[1:]]
    assert_refused(*run_main(generate_command.main, [*argv, "--seed", "8", "--batch-size", "2"], capsys),
                   "other settings", "seed 7 -> 8")
    code, stdout, stderr = run_entry_point(generate_command.main, [*argv, "--seed", "7", "--batch-size", "2"], capsys)
    assert code == 0, stderr[-3000:]
    assert "0 written now, 8 already there" in stdout
    assert synthetic_file_hashes(folder) == synthetic_before
    assert real_file_hashes(folder) == real_before


def test_check_dataset_reports_a_fold_whose_cases_disagree_with_its_recipe(generated_copy, tmp_path, capsys):
    from nnunet_synth.atomic import write_json_atomic
    folder = copy_dataset(generated_copy, tmp_path / "raw", 787, "MixedRecipes")
    for name in ("imagesSynth", "labelsSynth", "recordsSynth"):
        shutil.copytree(generated_copy / name, folder / name)
    shutil.copyfile(generated_copy / "synthetic.json", folder / "synthetic.json")
    record_file = sorted((folder / "recordsSynth").glob("*.json"))[-1]
    record = json.loads(record_file.read_text())
    record["recipe"] = dict(record["recipe"], seed=8)           # as a second run with --seed 8 would have left it
    write_json_atomic(record, record_file)
    assert_refused(*run_main(check_dataset_command.main, [str(folder)], capsys), "fold 0", "1 of fold 0's 4",
                   "seed", "nnsynth_clean")


def test_bad_evaluation_options_are_refused_before_the_evaluation_folder_is_made(hu_copy, tmp_path, capsys):
    from nnunet_synth.dataset_tools import evaluate as evaluate_command
    output = tmp_path / "evaluation"
    for argv, *fragments in [(["fidelity", str(hu_copy), "--generator", "g=/nowhere", "--inference-steps", "0"],
                              "--inference-steps"),
                             (["fidelity", str(hu_copy), "--generator", "g=/nowhere", "--seeds", "-3"], "--seeds"),
                             (["fidelity", str(hu_copy), "--generator", "g=/nowhere", "--device", "foo"], "--device"),
                             (["downstream", str(hu_copy), "--arms", "real_only", "--amounts", "nan"], "--amounts"),
                             (["downstream", str(hu_copy), "--arms", "real_only", "--repeats", "0"], "--repeats"),
                             (["downstream", str(hu_copy), "--arms", "real_only", "--planner", "nnUNetPlannerResEncS"],
                              "--planner nnUNetPlannerResEncS", "no experiment planner", "nnUNetPlannerResEncM")]:
        assert_refused(*run_main(evaluate_command.main, [*argv, "-o", str(output)], capsys), *fragments)
        assert not output.exists()


def test_a_passed_scan_is_remembered_until_a_file_changes(real_hu_dataset_folder, nnunet_folders, monkeypatch):
    from nnunet_synth.dataset import RawDataset
    from nnunet_synth.dataset.validation import scan_dataset
    from nnunet_synth.errors import NnsynthError
    folder = copy_dataset(real_hu_dataset_folder, nnunet_folders["nnUNet_raw"], 788, "ScanMemory")
    scan = scan_dataset(RawDataset(folder), progress=False)
    assert sum(scan.num_slices.values()) == 30
    remembered = list((nnunet_folder("nnUNet_preprocessed") / folder.name / "nnsynth_slice_cache").glob(
        "validated_*.json"))
    assert len(remembered) == 1
    with monkeypatch.context() as patched:                  # read back, not scanned again
        patched.setattr(RawDataset, "read_case", lambda *args: pytest.fail("the scan read a case again"))
        assert scan_dataset(RawDataset(folder), progress=False) == scan
    # corrupted in place, its size and modification time put back: the content key scans it again
    label = folder / "labelsTr" / "hu_03.nii.gz"
    stat, data = label.stat(), bytearray(label.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    label.write_bytes(bytes(data))
    os.utime(label, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (label.stat().st_size, label.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    with pytest.raises(NnsynthError, match="hu_03.nii.gz"):
        scan_dataset(RawDataset(folder), progress=False)
    image = folder / "imagesTr" / "hu_02_0000.nii.gz"
    os.truncate(image, image.stat().st_size // 2)
    with pytest.raises(NnsynthError, match="truncated"):
        scan_dataset(RawDataset(folder), progress=False)


# -- trainer settings: rows of BAD_VALUES in test_trainer_settings.py (through the stock nnUNetv2_train) -----------

# -- converters: ids, existing datasets, --slices-per-case --------------------------------------------------------

def _tree_hashes(folder: Path) -> dict:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def test_converters_refuse_ids_outside_1_to_999_and_a_zero_slices_per_case(tmp_path, capsys):
    from conftest import COVID_SOURCE, MS_SOURCE, REAL_HU_SOURCE

    from nnunet_synth.dataset_tools import convert_covid19_ct_slices, convert_ms_lesions, convert_real_hu_ct
    output = tmp_path / "raw"
    for main, source in ((convert_covid19_ct_slices.main, COVID_SOURCE), (convert_real_hu_ct.main, REAL_HU_SOURCE),
                         (convert_ms_lesions.main, MS_SOURCE)):
        for dataset_id in ("0", "1000"):
            assert_refused(*run_main(main, [str(source), "-o", str(output), "-d", dataset_id], capsys),
                           f"-d/--dataset-id {dataset_id}", "1 .. 999")
    assert_refused(*run_main(convert_real_hu_ct.main, [str(REAL_HU_SOURCE), "-o", str(output), "--slices-per-case",
                                                        "0"], capsys), "--slices-per-case 0", "1 .. 30")
    assert not output.exists()


def test_converters_refuse_an_existing_dataset_and_overwrite_replaces_it_whole(tmp_path, capsys):
    from conftest import COVID_SOURCE, MS_SOURCE, REAL_HU_SOURCE

    from nnunet_synth.dataset_tools import convert_covid19_ct_slices, convert_ms_lesions, convert_real_hu_ct
    raw = tmp_path / "raw"
    covid = [str(COVID_SOURCE), "-o", str(raw), "-d", "511", "--max-slices-per-case", "2"]
    code, _, stderr = run_entry_point(convert_covid19_ct_slices.main, [*covid, "--cases", "case_10", "case_14"],
                                      capsys)
    assert code == 0, stderr
    existing = raw / "Dataset511_Covid19Lung"
    before = _tree_hashes(existing)
    assert "imagesTr/case_10_0000.nii.gz" in before
    for main, argv in ((convert_covid19_ct_slices.main, [*covid, "--cases", "case_15"]),
                       (convert_covid19_ct_slices.main, [*covid, "-n", "OtherName"]),      # same id, other name
                       (convert_real_hu_ct.main, [str(REAL_HU_SOURCE), "-o", str(raw), "-d", "511"]),
                       (convert_ms_lesions.main, [str(MS_SOURCE), "-o", str(raw), "-d", "511", "--downsample", "4"])):
        assert_refused(*run_main(main, argv, capsys), str(existing), "already exists", "--overwrite")
        assert _tree_hashes(existing) == before                      # byte for byte
        assert sorted(path.name for path in raw.iterdir()) == ["Dataset511_Covid19Lung"]
    code, _, stderr = run_entry_point(convert_covid19_ct_slices.main, [*covid, "--cases", "case_15", "--overwrite"],
                                      capsys)
    assert code == 0, stderr
    after = _tree_hashes(existing)
    assert sorted(after) == ["dataset.json", "imagesTr/case_15_0000.nii.gz", "labelsTr/case_15.nii.gz"]
    assert json.loads((existing / "dataset.json").read_text())["numTraining"] == 1
    assert sorted(path.name for path in raw.iterdir()) == ["Dataset511_Covid19Lung"]     # nothing left beside it
    # --overwrite onto another name with that id: the old folder goes, the new one takes its place
    code, _, stderr = run_entry_point(convert_real_hu_ct.main, [str(REAL_HU_SOURCE), "-o", str(raw), "-d", "511",
                                                                 "--overwrite"], capsys)
    assert code == 0, stderr
    assert sorted(path.name for path in raw.iterdir()) == ["Dataset511_RealHUCT"]


# -- 2D natural-image data: RGB and truncated label PNGs, 3D configurations --------------------------------------

@pytest.fixture(scope="module")
def png_dataset(nnunet_folders):
    """Dataset789_PngSlices: eight real COVID slices as 2D PNG cases (the CT PNG itself; lung 1, lesion 2)."""
    from conftest import COVID_SOURCE
    from skimage import io

    from nnunet_synth.dataset.writing import write_dataset_json_atomic, write_volume
    from nnunet_synth.dataset_tools.convert_covid19_ct_slices import read_case_table, read_slice
    folder = Path(nnunet_folders["nnUNet_raw"]) / "Dataset789_PngSlices"
    slice_files = [files[len(files) // 2] for files in list(read_case_table(COVID_SOURCE).values())[:8]]
    (folder / "imagesTr").mkdir(parents=True)
    for index, slice_file in enumerate(slice_files):
        _, label_map = read_slice(COVID_SOURCE, slice_file)
        assert io.imread(COVID_SOURCE / "ct" / slice_file).ndim == 2           # a greyscale PNG, copied as it is
        shutil.copyfile(COVID_SOURCE / "ct" / slice_file, folder / "imagesTr" / f"png_{index:02d}_0000.png")
        write_volume(label_map, folder / "labelsTr" / f"png_{index:02d}.png")
    write_dataset_json_atomic(folder, channel_names={0: "CT"}, labels={"background": 0, "lung": 1, "lesion": 2},
                              num_training_cases=len(slice_files), file_ending=".png", dataset_name=folder.name)
    return folder


@pytest.fixture
def png_copy(png_dataset, tmp_path):
    return copy_dataset(png_dataset, tmp_path / "raw", 790, "PngCopy")


def test_an_rgb_label_png_is_refused_by_check_and_generate_with_the_conversion(png_copy, capsys):
    from skimage import io
    label_file = png_copy / "labelsTr" / "png_03.png"
    grey = io.imread(label_file)
    io.imsave(label_file, np.stack([grey] * 3, axis=-1), check_contrast=False)
    real_before = real_file_hashes(png_copy)
    for main, argv in ((check_dataset_command.main, [str(png_copy)]),
                       (generate_command.main, [str(png_copy), "--image-source", "copy-paste", "-n", "2"])):
        assert_refused(*run_main(main, argv, capsys), "png_03.png", "3 channels", "single-channel",
                       "skimage.io.imread(path)[..., 0]")
    assert real_file_hashes(png_copy) == real_before


def test_a_truncated_label_png_is_named_not_its_image(png_copy, capsys):
    label_file = png_copy / "labelsTr" / "png_02.png"
    os.truncate(label_file, label_file.stat().st_size // 2)
    assert_refused(*run_main(check_dataset_command.main, [str(png_copy)], capsys), str(label_file))


def test_a_3d_configuration_on_2d_data_is_refused_before_the_evaluation_folder(png_dataset, tmp_path, capsys):
    from nnunet_synth.dataset_tools import evaluate as evaluate_command
    output = tmp_path / "evaluation"
    preprocessed = nnunet_folder("nnUNet_preprocessed") / png_dataset.name
    before = sorted(preprocessed.rglob("*")) if preprocessed.exists() else []
    argv = ["downstream", str(png_dataset), "--arms", "real_only", "--configuration", "3d_fullres", "-o", str(output)]
    assert_refused(*run_main(evaluate_command.main, argv, capsys), "--configuration 3d_fullres", "2D",
                   "--configuration 2d")
    assert not output.exists()
    assert [path for path in (sorted(preprocessed.rglob("*")) if preprocessed.exists() else [])
            if "nnsynth_slice_cache" not in str(path)] == [p for p in before if "nnsynth_slice_cache" not in str(p)]


def test_aligned_volume_noise_is_refused_without_an_inpainting_generator_and_on_2d_data(png_dataset, hu_copy,
                                                                                      tiny_generator, capsys):
    results = nnunet_folder("nnUNet_results") / png_dataset.name
    for argv, fragment in [
            ([str(hu_copy), "--image-source", "copy-paste", "-n", "2", "--volume-noise", "aligned"],
             "--image-source inpaint"),
            ([str(hu_copy), "--generator", str(tiny_generator / "final"), "-n", "2", "--volume-noise", "aligned",
              *FAST_SAMPLING], "--image-source inpaint"),
            ([str(png_dataset), "--image-source", "inpaint", "--preset", "tiny", "-n", "2", "--volume-noise",
              "aligned", "--device", "cpu"], "one slice")]:
        synthetic_before = synthetic_file_hashes(Path(argv[0]))
        assert_refused(*run_main(generate_command.main, argv, capsys), "--volume-noise aligned", fragment)
        assert synthetic_file_hashes(Path(argv[0])) == synthetic_before
    assert not results.exists()                     # refused before an inpainting generator was trained


# -- evaluation generators, demo options, nnsynth_unit ------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_inpaint_generator(hu_copy, tmp_path_factory):
    """A 2-step tiny inpainting generator (32 px crops) on fold 0 of ``hu_copy``; its run folder."""
    from nnunet_synth.dataset import RawDataset
    from nnunet_synth.generator import TrainingSettings
    from nnunet_synth.generator.training import train_generator
    settings = TrainingSettings(preset="tiny", mode="inpaint", image_size=32, batch_size=2, max_steps=2,
                                warmup_steps=1, checkpoint_every=2, preview_every=100, preview_inference_steps=2)
    run_folder = tmp_path_factory.mktemp("bad_input_inpaint") / "run"
    train_generator(RawDataset(hu_copy), run_folder, settings, fold=0, progress=False)
    return run_folder


def test_an_inpainting_generator_as_a_fidelity_generator_is_refused(hu_copy, tiny_inpaint_generator, tmp_path,
                                                                    capsys):
    from nnunet_synth.dataset_tools import evaluate as evaluate_command
    output = tmp_path / "evaluation"
    argv = ["fidelity", str(hu_copy), "--generator", f"cbmat={tiny_inpaint_generator}", "--device", "cpu", "-o",
            str(output)]
    assert_refused(*run_main(evaluate_command.main, argv, capsys), "cbmat=", "inpaint generator",
                   f"--inpaint-generator {tiny_inpaint_generator}")
    assert not output.exists()


def test_the_demo_refuses_a_ratio_that_is_not_a_finite_positive_number(tmp_path, capsys):
    from nnunet_synth.dataset_tools import demo as demo_command
    for ratio in ("nan", "inf", "0", "-1"):
        argv = ["-o", str(tmp_path / "demo"), "--stop-after", "convert", "--ratio", ratio]
        assert_refused(*run_main(demo_command.main, argv, capsys), "--ratio")
    assert not (tmp_path / "demo").exists()


def test_an_unknown_nnsynth_unit_is_refused_by_check_dataset(broken_copy):
    dataset_json = json.loads((broken_copy / "dataset.json").read_text())
    dataset_json["nnsynth_unit"] = "cube"
    (broken_copy / "dataset.json").write_text(json.dumps(dataset_json))
    assert_one_line_error(check_here(broken_copy), "dataset.json", "nnsynth_unit", "'cube'")


# -- the store: copy-paste runs of two folds at the same time ------------------------------------------------------

@pytest.mark.slow
def test_copy_paste_runs_of_two_folds_write_at_the_same_time_and_one_fold_refuses_a_second_run(
        real_hu_dataset_folder, nnunet_folders, capsys):
    from nnunet_synth.dataset import RawDataset
    from nnunet_synth.writer.synthetic_store import SyntheticStore
    folder = copy_dataset(real_hu_dataset_folder, nnunet_folders["nnUNet_raw"], 791, "TwoFolds")
    real_before = real_file_hashes(folder)
    first = start_command("nnsynth_generate", folder, "--image-source", "copy-paste", "--fold", "0", "-n", "3")
    try:
        wait_for_claim(first, folder)
        first.send_signal(signal.SIGSTOP)           # fold 0 holds the store (shared) and its claim, mid-run
        code, stderr = run_main(generate_command.main, [str(folder), "--image-source", "copy-paste", "--fold", "0",
                                                        "-n", "3"], capsys)
        assert_refused(code, stderr, "fold_0.shard_0.lock", "same settings", "a rerun then resumes")
        assert "--shard-index" not in stderr                  # copy-paste runs unsharded
        code, stdout, stderr = run_entry_point(generate_command.main, [str(folder), "--image-source", "copy-paste",
                                                                       "--fold", "1", "-n", "3"], capsys)
        assert code == 0, stderr[-3000:]
    finally:
        first.send_signal(signal.SIGCONT)
    _, stderr = first.communicate(timeout=900)
    assert first.returncode == 0, stderr[-3000:]
    store = SyntheticStore(RawDataset(folder))
    assert (len(store.complete_case_ids("0")), len(store.complete_case_ids("1"))) == (3, 3)
    assert real_file_hashes(folder) == real_before
