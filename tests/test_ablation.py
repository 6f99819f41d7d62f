"""Mask ablation (CBMAT / MAT / none) on the real COVID label maps, and offset-noise statistics."""
import numpy as np
import pytest
import torch

from nnunet_synth.dataset import RawDataset, class_pixel_frequencies, dataset_intensity_window
from nnunet_synth.generator import (
    ablate_label_maps,
    build_noise_scheduler,
    cbmat_initial_probabilities,
    denoising_loss,
    load_model_slices,
    make_ablation_schedule,
    one_hot_condition,
    training_noise,
)
from nnunet_synth.generator.ablation import cosine_annealing_factor

TOTAL_STEPS = 1000
DRAWS = 3000  # samples per (mode, t); the binomial standard error at p = 0.5 is 0.009


@pytest.fixture(scope="module")
def covid(covid_dataset_folder):
    dataset = RawDataset(covid_dataset_folder)
    frequencies = class_pixel_frequencies(dataset)
    window = dataset_intensity_window(dataset)
    images, label_maps, _ = load_model_slices(dataset, dataset.case_ids, window, 32)
    return dataset, frequencies, images, label_maps


def empirical_ablation_rates(schedule, label_maps, step, seed=0):
    """Fraction of samples in which each class, present in the real map, is gone from the ablated map."""
    generator = torch.Generator().manual_seed(seed)
    num_classes = len(schedule.initial_probabilities)
    ablated_count, present_count = np.zeros(num_classes), np.zeros(num_classes)
    rng = np.random.default_rng(seed)
    for start in range(0, DRAWS, 500):
        batch = torch.from_numpy(label_maps[rng.integers(0, len(label_maps), 500)])
        ablated = ablate_label_maps(batch, schedule.draw(len(batch), step, generator))
        for value in range(num_classes):
            present = (batch == value).flatten(1).any(1)
            gone = present & ~(ablated == value).flatten(1).any(1)
            present_count[value] += present.sum().item()
            ablated_count[value] += gone.sum().item()
    return ablated_count / np.maximum(present_count, 1), present_count


def assert_rates_match(rates, expected, counts):
    tolerance = 4.5 * np.sqrt(np.maximum(expected * (1 - expected), 1e-12) / np.maximum(counts, 1)) + 1e-9
    assert np.all(np.abs(rates - expected) <= tolerance), (rates, expected, tolerance)


def test_cbmat_probability_is_delta0_times_one_minus_frequency(covid):
    dataset, frequencies, _, _ = covid
    schedule = make_ablation_schedule("cbmat", frequencies, [dataset.labels["lung"]], 0.5, TOTAL_STEPS)
    lesion = dataset.labels["lesion"]
    assert schedule.initial_probabilities[lesion] == pytest.approx(0.5 * (1 - frequencies[lesion]))
    assert np.allclose(cbmat_initial_probabilities(frequencies, 0.3), 0.3 * (1 - frequencies))
    assert schedule.initial_probabilities[0] == 0 and schedule.initial_probabilities[dataset.labels["lung"]] == 0


def test_cbmat_annealing_is_a_schedule_of_the_initial_value_not_a_compounding_product(covid):
    dataset, frequencies, _, _ = covid
    schedule = make_ablation_schedule("cbmat", frequencies, [1], 0.5, TOTAL_STEPS)
    initial = schedule.initial_probabilities
    for step in range(0, TOTAL_STEPS + 1, 50):  # asking many times changes nothing
        schedule.probabilities(step)
    assert np.allclose(schedule.probabilities(0), initial)
    assert np.allclose(schedule.probabilities(TOTAL_STEPS // 2), initial / 2)
    assert np.allclose(schedule.probabilities(TOTAL_STEPS // 4), initial * (1 + np.cos(np.pi / 4)) / 2)
    assert np.allclose(schedule.probabilities(TOTAL_STEPS), 0)
    assert cosine_annealing_factor(0, 10) == 1.0


@pytest.mark.parametrize("step", [0, 250, 500, 800])
def test_cbmat_empirical_rates_follow_the_cosine_schedule(covid, step):
    dataset, frequencies, _, label_maps = covid
    lung, lesion = dataset.labels["lung"], dataset.labels["lesion"]
    schedule = make_ablation_schedule("cbmat", frequencies, [lung], 0.5, TOTAL_STEPS)
    rates, counts = empirical_ablation_rates(schedule, label_maps, step, seed=step)
    expected = 0.5 * (1 - frequencies[lesion]) * (1 + np.cos(np.pi * step / TOTAL_STEPS)) / 2
    assert counts[lesion] > 1000
    assert_rates_match(rates[lesion], expected, counts[lesion])
    assert rates[lung] == 0 and rates[0] == 0  # protected class and background are never ablated


def test_default_protected_class_is_the_most_frequent_non_background_class(covid):
    from nnunet_synth.generator import TrainingSettings
    from nnunet_synth.generator.training import prepare_generator_config
    dataset, _, _, _ = covid
    config = prepare_generator_config(dataset, TrainingSettings(preset="tiny").resolved(), dataset.case_ids[:3], "all")
    assert config.ablation["protected_classes"] == ["lung"]
    assert config.ablation["initial_probabilities"][dataset.labels["lung"]] == 0.0


@pytest.mark.parametrize("step", [0, 900])
def test_mat_ablates_every_non_background_class_with_one_half(covid, step):
    dataset, frequencies, _, label_maps = covid
    schedule = make_ablation_schedule("mat", frequencies, [dataset.labels["lung"]], 0.5, TOTAL_STEPS)
    rates, counts = empirical_ablation_rates(schedule, label_maps, step, seed=10 + step)
    for value in (dataset.labels["lung"], dataset.labels["lesion"]):
        assert_rates_match(rates[value], 0.5, counts[value])
    assert rates[0] == 0


def test_none_never_ablates(covid):
    _, frequencies, _, label_maps = covid
    schedule = make_ablation_schedule("none", frequencies, [], 0.5, TOTAL_STEPS)
    rates, _ = empirical_ablation_rates(schedule, label_maps, 0)
    assert np.all(rates == 0)


class RecordingUNet(torch.nn.Module):
    """Stands in for the UNet: records its input, predicts zeros."""

    def forward(self, model_input, timesteps):
        self.model_input = model_input.clone()
        return type("Output", (), {"sample": torch.zeros_like(model_input[:, :1])})()


def test_ablation_changes_the_conditioning_map_only_never_the_image(covid):
    dataset, _, images, label_maps = covid
    lesion = dataset.labels["lesion"]
    chosen = np.flatnonzero((label_maps == lesion).any(axis=(1, 2)))[:4]
    image_batch = torch.from_numpy(images[chosen])
    label_batch = torch.from_numpy(label_maps[chosen])
    image_copy, label_copy = image_batch.clone(), label_batch.clone()
    noise, timesteps = torch.randn_like(image_batch), torch.full((len(chosen),), 500)
    ablate_lesion = torch.zeros((len(chosen), dataset.num_classes), dtype=torch.bool)
    ablate_lesion[:, lesion] = True
    inputs = []
    for ablated in (torch.zeros_like(ablate_lesion), ablate_lesion):
        unet = RecordingUNet()
        denoising_loss(unet, build_noise_scheduler(), image_batch, label_batch, noise, timesteps, ablated,
                       dataset.num_classes)
        inputs.append(unet.model_input)
    assert torch.equal(image_batch, image_copy) and torch.equal(label_batch, label_copy)
    assert torch.equal(inputs[0][:, :1], inputs[1][:, :1])  # the noisy image channel is the same
    condition = inputs[1][:, 1:]
    assert condition[:, lesion].sum() == 0  # an ablated class is an all-zero channel
    assert torch.equal(condition[:, 0].bool(), (label_batch == 0) | (label_batch == lesion))  # its pixels -> background
    assert torch.equal(inputs[0][:, 1:], one_hot_condition(label_batch, dataset.num_classes))


def test_offset_noise_adds_a_per_sample_constant_with_std_one_tenth():
    generator = torch.Generator().manual_seed(0)
    pixels = 32 * 32
    noise = training_noise((4000, 1, 32, 32), 0.1, generator)
    sample_means = noise.mean(dim=(2, 3)).flatten()
    assert sample_means.std().item() == pytest.approx(np.sqrt(0.01 + 1 / pixels), rel=0.06)
    assert sample_means.mean().abs().item() < 0.01
    within_sample = (noise - noise.mean(dim=(2, 3), keepdim=True)).std().item()
    assert within_sample == pytest.approx(1.0, abs=0.01)
    plain = training_noise((4000, 1, 32, 32), 0.0, torch.Generator().manual_seed(0))
    assert plain.mean(dim=(2, 3)).std().item() == pytest.approx(np.sqrt(1 / pixels), rel=0.06)


def test_cbmat_delta_differs_by_class_with_foreground_frequencies_and_both_readings_are_selectable(
        covid, covid_lesion_types_dataset_folder):
    """Over all pixels (background included) f_c is tiny for every class and delta_c nearly equal (numerically inert);
    counted over foreground pixels, delta_c separates the classes, on Dataset501 and on a 3-class dataset."""
    from nnunet_synth.generator.ablation import cbmat_class_frequencies
    dataset, frequencies, _, _ = covid
    lesion_types = RawDataset(covid_lesion_types_dataset_folder)
    for shares in (frequencies, class_pixel_frequencies(lesion_types)):
        foreground = cbmat_class_frequencies(shares, "foreground")
        assert foreground[0] == 0 and foreground.sum() == pytest.approx(1.0)
        delta = make_ablation_schedule("cbmat", foreground, [], 0.5, TOTAL_STEPS).initial_probabilities
        delta_all = make_ablation_schedule("cbmat", cbmat_class_frequencies(shares, "all"), [], 0.5,
                                           TOTAL_STEPS).initial_probabilities
        assert abs(delta[1] - delta[2]) > 0.1 and abs(delta[1] - delta[2]) > 3 * abs(delta_all[1] - delta_all[2])
        rarest = 1 + int(np.argmin(shares[1:]))
        assert delta[rarest] == delta[1:].max()        # the equation: the rarest class is ablated most
        text = make_ablation_schedule("cbmat", foreground, [], 0.5, TOTAL_STEPS, reading="text").initial_probabilities
        assert text[rarest] == text[1:].min()          # the text's reading: common classes ablated most
    pathology = cbmat_class_frequencies(frequencies, "pathology", [dataset.labels["lung"]])
    assert pathology[dataset.labels["lesion"]] == pytest.approx(1.0) and pathology[dataset.labels["lung"]] == 0


def test_generator_config_records_frequency_definition_and_delta_c(covid_lesion_types_dataset_folder):
    from nnunet_synth.generator import TrainingSettings
    from nnunet_synth.generator.training import prepare_generator_config
    dataset = RawDataset(covid_lesion_types_dataset_folder)
    settings = TrainingSettings(preset="tiny", image_size=32).resolved()
    config = prepare_generator_config(dataset, settings, dataset.case_ids, 0)
    ablation = config.ablation
    assert ablation["protected_classes"] == []     # ground glass (75 % of the foreground) is no surrounding tissue
    assert ablation["frequency_definition"] == "foreground" and ablation["probability_reading"] == "equation"
    assert sum(ablation["frequencies"].values()) == pytest.approx(1.0) and ablation["frequencies"]["background"] == 0
    for name in ("ground_glass", "dense"):
        assert ablation["delta_c"][name] == pytest.approx(0.5 * (1 - ablation["frequencies"][name]))
    assert ablation["delta_c"]["dense"] > ablation["delta_c"]["ground_glass"] + 0.1
