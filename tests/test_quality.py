"""Stage 5: the model-free quality gate on the real COVID slices (fold 0 of Dataset501): real held-out slices
pass, noise, blur and the output of an untrained generator fail (medians alone passed pure noise)."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from nnunet_synth.dataset import ImageWindows, RawDataset, fit_slice, restore_slice
from nnunet_synth.dataset.splits import fold_training_cases
from nnunet_synth.generator import TrainingSettings, build_unet
from nnunet_synth.generator.training import prepare_generator_config
from nnunet_synth.quality.model_free import ModelFreeGate, fit_model_free_gate, model_free_score
from nnunet_synth.sampling import sample_images


def slices_of(dataset, case_ids):
    pairs = []
    for case_id in case_ids:
        image, label_map, _ = dataset.read_case(case_id)
        pairs += list(zip(image[0].astype(np.float32), label_map))
    return pairs


@pytest.fixture(scope="module")
def fold0(covid_dataset_folder):
    dataset = RawDataset(covid_dataset_folder)
    training_cases = fold_training_cases(dataset, 0)
    held_out = [case_id for case_id in dataset.case_ids if case_id not in training_cases]
    gate = fit_model_free_gate(slices_of(dataset, training_cases))
    return dataset, training_cases, gate, slices_of(dataset, held_out)


def pass_rate(gate, pairs):
    return np.mean([model_free_score(image, label_map, gate)["passed"] for image, label_map in pairs])


def test_real_held_out_slices_pass_and_noise_and_blur_fail(fold0):
    dataset, _, gate, held_out = fold0
    assert len(held_out) > 100
    assert pass_rate(gate, held_out) >= 0.9
    rng = np.random.default_rng(0)
    sample = held_out[::6]
    low, high = np.percentile(np.concatenate([image.ravel() for image, _ in sample]), (0.5, 99.5))
    noise = [(rng.uniform(low, high, image.shape).astype(np.float32), label_map) for image, label_map in sample]
    blur = [(ndimage.gaussian_filter(image, 2.0), label_map) for image, label_map in sample]
    assert pass_rate(gate, noise) <= 0.1 and pass_rate(gate, blur) <= 0.1
    # the per-class medians of the noise lie inside the real range: the medians-only gate passed it
    score = model_free_score(*noise[0], gate)
    assert score["score"] < 0.5 <= model_free_score(*held_out[0], gate)["score"]
    assert ModelFreeGate.from_dict(gate.to_dict()).to_dict() == gate.to_dict()


def test_images_of_an_untrained_generator_fail(fold0):
    dataset, training_cases, gate, held_out = fold0
    settings = TrainingSettings(preset="tiny").resolved()
    config = prepare_generator_config(dataset, settings, training_cases[:3], 0)   # window of 3 cases: enough here
    window = ImageWindows.from_dict(config.window)
    torch.manual_seed(0)
    unet = build_unet(settings, dataset.num_classes).eval()
    chosen = held_out[::len(held_out) // 12][:12]
    fits = [fit_slice(window.to_model(image[None]), label_map, settings.image_size) for image, label_map in chosen]
    generated = sample_images(unet, config, np.stack([model_map for _, model_map, _ in fits]), list(range(len(fits))),
                              num_inference_steps=10, batch_size=12, progress=False)
    pairs = []
    for image, (_, model_map, fit) in zip(generated, fits):
        restored, label_map = restore_slice(image, model_map, fit)
        pairs.append((window.from_model(restored, [np.float32])[0], label_map))
    assert pass_rate(gate, pairs) <= 0.1
