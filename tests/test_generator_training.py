"""Generator training on real data (tiny preset, CPU): loss goes down, exact resume, dataset checks, the
command line, and sampling (seeded, batch-independent, shape and range)."""
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
import torch
from nnunetv2.utilities.crossval_split import generate_crossval_split
from safetensors.torch import load_file

from nnunet_synth.dataset import RawDataset, dataset_intensity_window
from nnunet_synth.errors import NnsynthError
from nnunet_synth.generator import (
    TrainingSettings,
    build_noise_scheduler,
    build_unet,
    denoising_loss,
    fold_training_cases,
    load_generator,
    load_model_slices,
    make_ablation_schedule,
)
from nnunet_synth.generator.training import draw_step_randomness, train_generator
from nnunet_synth.nnunet_paths import nnunet_folder
from nnunet_synth.sampling import sample_images

SIZE = 32
TRAIN_COMMAND = str(Path(sys.executable).parent / "nnsynth_train_generator")


def small_settings(**overrides) -> TrainingSettings:
    values = dict(preset="tiny", image_size=SIZE, batch_size=2, max_steps=5, warmup_steps=1, checkpoint_every=2,
                  preview_every=100, preview_inference_steps=2, preview_count=2, learning_rate=5e-4)
    values.update(overrides)
    return TrainingSettings(**values)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The machine is shared (2 cores): one intra-op thread avoids oversubscription and keeps CPU use modest."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def one_thread_environment():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def trained_steps(checkpoint_folder) -> int:
    return json.loads((checkpoint_folder / "generator_config.json").read_text())["trained_steps"]


def assert_same_weights(run_a, run_b, checkpoint="checkpoint_1"):
    """The final EMA weights and the raw weights of ``checkpoint`` are bitwise equal."""
    for name in ("final/unet/diffusion_pytorch_model.safetensors", f"checkpoints/{checkpoint}/model.safetensors"):
        a, b = load_file(run_a / name), load_file(run_b / name)
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a), name


@pytest.fixture(scope="module")
def example(example_dataset_folder):
    return RawDataset(example_dataset_folder)


@pytest.fixture(scope="module")
def uninterrupted_run(example, tmp_path_factory):
    """Five tiny steps on two real cases, without interruption."""
    folder = tmp_path_factory.mktemp("generator") / "uninterrupted"
    return train_generator(example, folder, small_settings(), case_ids=example.case_ids[:2], progress=False)


def test_a_few_tiny_steps_on_a_fixed_real_batch_lower_the_loss(covid_dataset_folder):
    dataset = RawDataset(covid_dataset_folder)
    cases = dataset.case_ids[:2]
    images, label_maps, _ = load_model_slices(dataset, cases, dataset_intensity_window(dataset, cases), SIZE)
    chosen = np.linspace(0, len(images) - 1, 4).astype(int)
    image_batch, label_batch = torch.from_numpy(images[chosen]), torch.from_numpy(label_maps[chosen])
    settings = small_settings().resolved()
    torch.manual_seed(0)
    unet = build_unet(settings, dataset.num_classes)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    schedule = make_ablation_schedule("none", [0.8, 0.15, 0.05], [], 0.5, 1)
    noise, timesteps, ablated = draw_step_randomness(4, SIZE, 0, schedule, 0.1, torch.Generator().manual_seed(0))
    scheduler = build_noise_scheduler()
    losses = []
    for _ in range(12):
        loss = denoising_loss(unet, scheduler, image_batch, label_batch, noise, timesteps, ablated, dataset.num_classes)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_interrupted_and_resumed_run_repeats_the_uninterrupted_run(example, uninterrupted_run, tmp_path):
    folder = tmp_path / "interrupted"

    def crash_at_step_3(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_generator(example, folder, small_settings(), case_ids=example.case_ids[:2], progress=False,
                        step_callback=crash_at_step_3)
    assert trained_steps(folder / "checkpoints" / "checkpoint_0") == 2 and not (folder / "final").exists()
    # resumed with DataLoader worker processes reading the slice cache (a setting that may change on resume)
    resumed = train_generator(example, folder, small_settings(data_workers=2), case_ids=example.case_ids[:2],
                              progress=False)
    assert resumed.resumed_from_step == 2
    assert resumed.losses == uninterrupted_run.losses[2:]  # steps 3, 4, 5: identical losses
    # accelerate kept the two newest checkpoints (total_limit): steps 4 and 5 in both runs
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["checkpoint_1", "checkpoint_2"]
    assert trained_steps(folder / "checkpoints" / "checkpoint_1") == 4
    assert_same_weights(uninterrupted_run.run_folder, folder)
    config = json.loads((folder / "final" / "generator_config.json").read_text())
    assert config["trained_steps"] == 5 and config["labels"] == example.labels
    assert config["ablation"]["mode"] == "cbmat" and config["ablation"]["protected_classes"] == ["lung"]
    assert config["training_cases"] == example.case_ids[:2]


def test_a_gpu_preset_trained_on_a_cpu_prints_its_estimated_time_and_the_cpu_preset_once(example, tmp_path,
                                                                                         monkeypatch, capsys):
    from nnunet_synth.generator import training
    monkeypatch.setattr(training, "GPU_PRESETS", ("tiny",))     # the tiny preset stands in for one meant for a GPU
    monkeypatch.setattr(training, "CPU_ESTIMATE_STEPS", 2)
    capsys.readouterr()
    train_generator(example, tmp_path / "run", small_settings(max_steps=4, checkpoint_every=4),
                    case_ids=example.case_ids[:2], progress=False)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "meant for a GPU" in line]
    assert len(warnings) == 1, warnings
    assert re.fullmatch(r"nnsynth: warning: preset 'tiny' is meant for a GPU; on this CPU a step takes [\d.]+ s, so "
                        r"the 4 steps of this run would take about \d+(\.\d)? (s|min|h|days): to train on a CPU use "
                        r"--preset tiny \(or a machine with a GPU\)", warnings[0]), warnings[0]


def test_the_cpu_estimate_is_the_time_per_step_times_the_steps_and_only_for_gpu_presets_on_a_cpu():
    from nnunet_synth.generator.training import CpuCostTimer, cpu_cost_warning, format_duration
    line = cpu_cost_warning("default", 720.0, 3, 50_000)       # 4 minutes a step, the default preset's steps
    assert "a step takes 240.0 s" in line and "the 50000 steps of this run would take about 139 days" in line
    assert line.endswith("use --preset tiny (or a machine with a GPU)")
    assert [format_duration(s) for s in (40, 720, 5.3 * 3600, 3 * 86400)] == ["40 s", "12 min", "5.3 h", "3 days"]
    assert CpuCostTimer("default", torch.device("cpu"), 10).active
    assert not CpuCostTimer("tiny", torch.device("cpu"), 10).active
    assert not CpuCostTimer("default", torch.device("cuda"), 10).active
    assert not CpuCostTimer("default", torch.device("cpu"), 10, enabled=False).active      # not the main process


KILL_STEPS, KILL_CHECKPOINT_EVERY = 30, 3


def kill_run_arguments(example, folder, **changes):
    values = {"--steps": KILL_STEPS, "--checkpoint-every": KILL_CHECKPOINT_EVERY, "--lr": 5e-4, **changes}
    return [TRAIN_COMMAND, example.name, "--fold", "0", "--preset", "tiny", "--image-size", str(SIZE),
            "--batch-size", "2", "--warmup-steps", "1", "--preview-every", "100", "--preview-inference-steps", "2",
            "--output", str(folder), "--no-progress"] + [str(item) for pair in values.items() for item in pair]


@pytest.mark.slow
def test_training_killed_after_a_checkpoint_resumes_exactly_and_refuses_other_settings(example, nnunet_folders,
                                                                                     tmp_path):
    folder = tmp_path / "killed"
    process = subprocess.Popen(kill_run_arguments(example, folder), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, env=one_thread_environment())
    first_checkpoint = folder / "checkpoints" / "checkpoint_0" / "generator_config.json"
    deadline = time.monotonic() + 600
    while not first_checkpoint.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, stderr[-2000:]
    assert first_checkpoint.is_file() and not (folder / "final").exists()

    changed = subprocess.run(kill_run_arguments(example, folder, **{"--lr": 1e-3}), capture_output=True, text=True,
                             timeout=600, env=one_thread_environment())
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    assert changed.stderr.strip().count("\n") == 0
    assert str(folder) in changed.stderr and "learning_rate 0.0005 -> 0.001" in changed.stderr

    resumed = subprocess.run(kill_run_arguments(example, folder), capture_output=True, text=True, timeout=600,
                             env=one_thread_environment())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at step" in resumed.stdout and "resuming at step 0" not in resumed.stdout
    reference = train_generator(example, tmp_path / "reference",
                                small_settings(max_steps=KILL_STEPS, checkpoint_every=KILL_CHECKPOINT_EVERY,
                                               preview_count=4), fold="0", progress=False)
    last = f"checkpoint_{KILL_STEPS // KILL_CHECKPOINT_EVERY - 1}"
    assert trained_steps(folder / "checkpoints" / last) == KILL_STEPS
    assert_same_weights(reference.run_folder, folder, last)


def test_final_folder_loads_with_diffusion_pipeline_from_pretrained_and_samples(uninterrupted_run, trained_generator,
                                                                               example, tmp_path):
    from diffusers import DiffusionPipeline
    final = uninterrupted_run.final_folder
    assert json.loads((final / "model_index.json").read_text())["_class_name"] == ["nnsynth_pipeline",
                                                                                 "NnsynthPipeline"]
    pipeline = DiffusionPipeline.from_pretrained(final, trust_remote_code=True)
    assert type(pipeline).__name__ == "NnsynthPipeline" and type(pipeline.scheduler).__name__ == "DDIMScheduler"
    unet, config, _, label_maps = trained_generator
    images = pipeline(label_maps, [1, 2, 3], num_inference_steps=3, progress=False)
    expected = sample_images(unet, config, label_maps, [1, 2, 3], num_inference_steps=3, progress=False)
    assert images.shape == (3, 1, SIZE, SIZE) and np.array_equal(images, expected)
    # a final folder of the older format (unet/, scheduler/, generator_config.json, no model_index.json) still loads
    old = tmp_path / "old_final"
    shutil.copytree(final, old)
    (old / "model_index.json").unlink()
    (old / "nnsynth_pipeline.py").unlink()
    old_unet, old_config = load_generator(old, dataset=example)
    again = sample_images(old_unet, old_config, label_maps, [1, 2, 3], num_inference_steps=3, progress=False)
    assert np.array_equal(again, expected)


def test_an_unfinished_or_old_format_run_is_named_with_the_fix(uninterrupted_run, example, tmp_path):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(uninterrupted_run.run_folder / "checkpoints", unfinished / "checkpoints")
    with pytest.raises(NnsynthError, match="unfinished training run .* rerun the same nnsynth_train_generator"):
        load_generator(unfinished)
    old = tmp_path / "old"
    (old / "checkpoint-4").mkdir(parents=True)
    (old / "checkpoint-4" / "training_state.pt").write_bytes(b"")
    with pytest.raises(NnsynthError, match=r"checkpoints of an older nnunet-synth \(checkpoint-4/\).*delete"):
        train_generator(example, old, small_settings(), case_ids=example.case_ids[:2], progress=False)


def test_checkpoint_used_with_a_dataset_of_other_classes_fails_clearly(uninterrupted_run, real_hu_dataset_folder,
                                                                       example):
    other = RawDataset(real_hu_dataset_folder)
    with pytest.raises(NnsynthError, match=r"was trained for classes .* but dataset Dataset502\S* has .*"
                                           r"nnsynth_train_generator Dataset502"):
        load_generator(uninterrupted_run.run_folder, dataset=other)
    unet, config = load_generator(uninterrupted_run.run_folder, dataset=example)
    assert not unet.training and config.image_size == SIZE and config.class_names == example.class_names


def test_fold_cases_follow_splits_final_or_nnunets_default_split(example, tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    default = generate_crossval_split(example.case_ids, seed=12345, n_splits=5)
    assert fold_training_cases(example, 1) == sorted(default[1]["train"])
    assert fold_training_cases(example, "all") == example.case_ids
    (tmp_path / example.name).mkdir()
    (tmp_path / example.name / "splits_final.json").write_text(json.dumps([{"train": example.case_ids[:2],
                                                                            "val": example.case_ids[2:]}]))
    assert fold_training_cases(example, 0) == example.case_ids[:2]
    with pytest.raises(NnsynthError, match="fold 3 does not exist"):
        fold_training_cases(example, 3)


def test_train_command_writes_final_generator_and_preview(example, nnunet_folders):
    result = subprocess.run([TRAIN_COMMAND, example.name, "--fold", "0", "--preset", "tiny", "--image-size", str(SIZE),
                             "--steps", "3", "--batch-size", "2", "--preview-every", "2",
                             "--preview-inference-steps", "2", "--no-progress"],
                            capture_output=True, text=True, timeout=900, env=one_thread_environment())
    assert result.returncode == 0, result.stderr[-3000:]
    run_folder = nnunet_folder("nnUNet_results") / example.name / "nnsynth_generator_tiny_fold0"
    config = json.loads((run_folder / "final" / "generator_config.json").read_text())
    assert config["fold"] == "0" and config["training_cases"] == fold_training_cases(example, 0)
    assert config["trained_steps"] == 3 and config["preset"] == "tiny" and config["image_size"] == SIZE
    assert (run_folder / "final" / "preview.png").stat().st_size > 1000
    assert (run_folder / "final" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert sorted(p.name for p in (run_folder / "previews").iterdir()) == ["step-0000002.png", "step-0000003.png"]


def test_train_command_with_a_bad_dataset_name_exits_with_one_line(nnunet_folders):
    result = subprocess.run([TRAIN_COMMAND, "Dataset777_DoesNotExist", "--preset", "tiny"],
                            capture_output=True, text=True, timeout=600, env=one_thread_environment())
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("nnsynth: error: unknown dataset")


@pytest.fixture(scope="module")
def trained_generator(uninterrupted_run, example):
    unet, config = load_generator(uninterrupted_run.final_folder, dataset=example)
    window = dataset_intensity_window(example)
    images, label_maps, _ = load_model_slices(example, example.case_ids[:1], window, SIZE)
    return unet, config, images[:3], label_maps[:3]


def test_sampling_shape_range_and_seeded_output_independent_of_batch(trained_generator):
    unet, config, _, label_maps = trained_generator
    seeds = [11, 12, 13]
    together = sample_images(unet, config, label_maps, seeds, num_inference_steps=3, batch_size=3, progress=False)
    assert together.shape == (3, 1, SIZE, SIZE) and together.dtype == np.float32
    assert together.min() >= -1.0 and together.max() <= 1.0
    one_by_one = sample_images(unet, config, label_maps, seeds, num_inference_steps=3, batch_size=1, progress=False)
    reordered = sample_images(unet, config, label_maps[::-1].copy(), seeds[::-1], num_inference_steps=3,
                              batch_size=2, progress=False)[::-1]
    # The initial noise of a case depends on its seed only (bitwise); CPU convolution kernels may round
    # differently for different batch sizes, hence the tiny tolerance rather than bitwise equality.
    np.testing.assert_allclose(together, one_by_one, atol=2e-4)
    np.testing.assert_allclose(together, reordered, atol=2e-4)
    again = sample_images(unet, config, label_maps, seeds, num_inference_steps=3, batch_size=3, progress=False)
    assert np.array_equal(together, again)
    other_seeds = sample_images(unet, config, label_maps, [1, 2, 3], num_inference_steps=3, progress=False)
    assert np.abs(other_seeds - together).mean() > 0.05


def test_noise_seeding_starts_from_the_noised_reference(trained_generator):
    unet, config, images, label_maps = trained_generator
    # strength 0.1 of 10 DDIM steps keeps only the last step (t = 0, noise std 0.01): whatever the (barely
    # trained) model predicts, the output is the reference up to that small noise
    seeded = sample_images(unet, config, label_maps, range(3), num_inference_steps=10, reference_images=images,
                           strength=0.1, progress=False)
    unseeded = sample_images(unet, config, label_maps, range(3), num_inference_steps=10, progress=False)
    assert seeded.shape == images.shape and seeded.min() >= -1 and seeded.max() <= 1
    assert np.abs(seeded - images).mean() < 0.05 < np.abs(unseeded - images).mean()
    again = sample_images(unet, config, label_maps, range(3), num_inference_steps=10, reference_images=images,
                          strength=0.5, batch_size=2, progress=False)
    assert again.shape == images.shape and np.isfinite(again).all()
    with pytest.raises(ValueError, match="strength"):
        sample_images(unet, config, label_maps, range(3), reference_images=images, strength=1.5, progress=False)


def test_slice_cache_holds_the_model_slices_is_reused_and_keyed_by_the_window(example, tmp_path):
    from nnunet_synth.generator.slice_cache import open_slice_cache
    cases = example.case_ids[:2]
    window = dataset_intensity_window(example, cases)
    images, label_maps, _ = load_model_slices(example, cases, window, SIZE)
    cache = open_slice_cache(example, cases, window, SIZE, tmp_path)
    assert len(cache) == len(images) and cache.images.shape == images.shape
    rows = np.array([3, 0, len(images) - 1, 3])
    np.testing.assert_array_equal(cache.label_maps[rows], label_maps[rows])
    np.testing.assert_allclose(cache.images[rows], images[rows], atol=1e-3)     # stored as float16
    assert cache.images[rows].dtype == np.float32 and cache.label_maps[rows].dtype == np.int64
    built = (cache.folder / "images.bin").stat().st_mtime_ns
    again = open_slice_cache(example, cases, window, SIZE, tmp_path)
    assert again.folder == cache.folder and (again.folder / "images.bin").stat().st_mtime_ns == built
    channel = window.channels[0]
    other_window = type(window).from_dict([{**channel.to_dict(), "upper": channel.upper + 10}])
    assert open_slice_cache(example, cases, other_window, SIZE, tmp_path).folder != cache.folder
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".incomplete")]
