"""The model-free slice gate (quality/model_free.py) on every kind of test dataset: fitted on fold 0's training
cases, it passes the held-out cases' real slices and rejects uniform noise, Gaussian noise, blur and the images of
an untrained generator made from those slices, whatever the classes (a lung host class, none at all), the channels
(the four MR sequences of the MS volumes) or the units (CLAHE grey values, Hounsfield units). ``-s`` prints the
table of docs/quality.md."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from nnunet_synth.dataset import ImageWindows, RawDataset, fit_slice, restore_slice
from nnunet_synth.dataset.native_slices import evenly_spread
from nnunet_synth.dataset.splits import fold_training_cases
from nnunet_synth.errors import NnsynthError
from nnunet_synth.generator import TrainingSettings, build_unet
from nnunet_synth.generator.training import prepare_generator_config
from nnunet_synth.masks.placement import body_mask
from nnunet_synth.quality.model_free import MIN_FOREGROUND, ModelFreeGate, fit_channel_gates, model_free_channel_score
from nnunet_synth.sampling import sample_images

# row: (fixture of the dataset folder, what it is)
DATASETS = {
    "Dataset501": ("covid_dataset_folder", "COVID slices, lung host class"),
    "Dataset504": ("covid_binary_lesion_dataset_folder", "COVID slices, binary lesion, no host class"),
    "Dataset505": ("ms_lesions_dataset_folder", "MS volumes, 4 MR channels, no host class"),
    "Dataset550": ("sts_dataset_folder", "STS CT volumes (HU), no host class"),
}
INPUTS = ("held-out real", "uniform noise", "Gaussian noise", "blur sigma 2", "generator, 20 steps",
          "real + noise sigma 10 %")
CHECKED = INPUTS[1:5]           # the last column is measured, not required (docs/quality.md)
FIT_SLICES = 200                # training slices the gates are fitted on (evenly spread)
REAL_SLICES = 100               # held-out real slices scored
CORRUPTED_SLICES = 16           # held-out slices with a foreground, corrupted
GENERATED_SLICES = 8
TABLE = {}


def case_slices(dataset, case_ids):
    pairs = []
    for case_id in case_ids:
        image, label_map, _ = dataset.read_case(case_id)
        pairs += [(image[:, z].astype(np.float32), label_map[z]) for z in range(len(label_map))]
    return pairs


def untrained_generator_images(dataset, training_cases, pairs):
    """Images of an untrained ``tiny`` generator (32 px, 20 DDIM steps) for the label maps of ``pairs``, in the
    dataset's units at the slices' native size."""
    settings = TrainingSettings(preset="tiny", image_size=32).resolved()
    config = prepare_generator_config(dataset, settings, training_cases[:3], 0)
    window = ImageWindows.from_dict(config.window)
    torch.manual_seed(0)
    unet = build_unet(settings, dataset.num_classes, dataset.num_channels).eval()
    fits = [fit_slice(window.to_model(image), label_map, settings.image_size) for image, label_map in pairs]
    generated = sample_images(unet, config, np.stack([model_map for _, model_map, _ in fits]), list(range(len(fits))),
                              num_inference_steps=20, batch_size=len(fits), progress=False)
    images = []
    for image, (_, model_map, fit) in zip(generated, fits):
        restored, label_map = restore_slice(image, model_map, fit)
        images.append((np.stack(window.from_model(restored, [np.float32] * dataset.num_channels)), label_map))
    return images


def corrupted(pairs, held_out, rng):
    """{input: [(image, label map)]} of the corruptions of ``pairs``; the noise spans the held-out cases' values
    per channel (uniform: their 0.5th to 99.5th percentile; Gaussian: their mean and standard deviation)."""
    values = np.concatenate([image.reshape(len(image), -1) for image, _ in held_out], axis=1)
    low, high = np.percentile(values, (0.5, 99.5), axis=1)
    mean, std = values.mean(axis=1), values.std(axis=1)
    column = (slice(None), None, None)
    return {
        "uniform noise": [(rng.uniform(low[column], high[column], image.shape).astype(np.float32), label_map)
                          for image, label_map in pairs],
        "Gaussian noise": [(rng.normal(mean[column], std[column], image.shape).astype(np.float32), label_map)
                           for image, label_map in pairs],
        "blur sigma 2": [(ndimage.gaussian_filter(image, (0, 2, 2)), label_map) for image, label_map in pairs],
        "real + noise sigma 10 %": [((image + rng.normal(0, 1, image.shape) * 0.1 * (high - low)[column])
                                     .astype(np.float32), label_map) for image, label_map in pairs],
    }


@pytest.fixture(scope="module", autouse=True)
def print_table():
    yield
    if TABLE:
        print("\n| dataset | " + " | ".join(INPUTS) + " |\n| --- |" + " --- |" * len(INPUTS))
        for name, row in TABLE.items():
            print(f"| {name} | " + " | ".join(f"{passed} of {total}" for passed, total in row.values()) + " |")


@pytest.mark.parametrize("name", DATASETS)
def test_slice_gate_passes_real_and_rejects_noise_blur_and_an_untrained_generator(name, request):
    fixture, description = DATASETS[name]
    dataset = RawDataset(request.getfixturevalue(fixture))
    training_cases = fold_training_cases(dataset, 0)
    held_out = case_slices(dataset, [case_id for case_id in dataset.case_ids if case_id not in training_cases])
    training = case_slices(dataset, training_cases)
    gates = fit_channel_gates([image for image, _ in training], [label_map for _, label_map in training],
                              max_slices=FIT_SLICES)
    with_foreground = [pair for pair in held_out if body_mask(pair[0][0]).mean() >= MIN_FOREGROUND]
    chosen = [with_foreground[i] for i in evenly_spread(len(with_foreground), CORRUPTED_SLICES)]
    inputs = {"held-out real": [held_out[i] for i in evenly_spread(len(held_out), REAL_SLICES)],
              **corrupted(chosen, held_out, np.random.default_rng(0)),
              "generator, 20 steps": untrained_generator_images(
                  dataset, training_cases, [chosen[i] for i in evenly_spread(len(chosen), GENERATED_SLICES)])}
    row = {}
    for column in INPUTS:
        passed = [model_free_channel_score(image, label_map, gates)["passed"] for image, label_map in inputs[column]]
        row[column] = (int(np.sum(passed)), len(passed))
    TABLE[f"{name} ({description})"] = row
    print(name, {column: f"{passed} of {total}" for column, (passed, total) in row.items()})
    rate = {column: passed / total for column, (passed, total) in row.items()}
    assert rate["held-out real"] >= 0.9, row
    assert all(rate[column] <= 0.1 for column in CHECKED), row


def test_a_gate_stored_without_its_class_free_reference_is_refused(covid_binary_lesion_dataset_folder):
    dataset = RawDataset(covid_binary_lesion_dataset_folder)
    pairs = case_slices(dataset, dataset.case_ids[:3])
    gate = fit_channel_gates([image for image, _ in pairs], [label_map for _, label_map in pairs])[0]
    stored = gate.to_dict()
    assert ModelFreeGate.from_dict(stored).to_dict() == stored
    del stored["class_free"]
    with pytest.raises(NnsynthError, match="no class-free reference.*--overwrite"):
        ModelFreeGate.from_dict(stored)
