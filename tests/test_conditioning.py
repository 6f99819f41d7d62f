"""The generator follows the label map it is given (Diff-Lung §2.1): trained briefly on real slices whose classes get
distinct intensities, its samples are bright where the map says lesion and dark where it says background, and
swapping the maps swaps the images. Fails if the conditioning were dropped or ignored at sampling time."""
import numpy as np
import pytest

from nnunet_synth.dataset import ImageWindows, RawDataset, fit_slice
from nnunet_synth.dataset.writing import write_dataset_json_atomic, write_volume
from nnunet_synth.generator import TrainingSettings
from nnunet_synth.generator.training import train_generator
from nnunet_synth.sampling import sample_images

CLASS_INTENSITY = np.array([0.0, 90.0, 180.0])   # background, lung, lesion: added to a quarter of the real grey value
SIZE = 32


@pytest.fixture(scope="module")
def map_determined_generator(example_dataset_folder, nnunet_folders, tmp_path_factory):
    """Dataset975: the example's real slices and label maps, each class shifted to its own intensity band (the
    real texture kept at a quarter of its contrast); a tiny 32 px generator trained on it for 100 steps."""
    source = RawDataset(example_dataset_folder)
    folder = nnunet_folders["nnUNet_raw"] / "Dataset975_ConditioningCheck"
    for case_id in source.case_ids:
        image, label_map, _ = source.read_case(case_id)
        shifted = 0.25 * image[0] + CLASS_INTENSITY[label_map]
        write_volume(shifted.astype(np.uint8), folder / "imagesTr" / f"{case_id}_0000.nii.gz")
        write_volume(label_map.astype(np.uint8), folder / "labelsTr" / f"{case_id}.nii.gz")
    write_dataset_json_atomic(folder, channel_names={0: "CT"}, labels=source.labels,
                              num_training_cases=len(source.case_ids), file_ending=".nii.gz", dataset_name=folder.name)
    dataset = RawDataset(folder)
    # ablation "none": the map is always given, so the test asks only whether it is followed
    settings = TrainingSettings(preset="tiny", image_size=SIZE, batch_size=8, max_steps=100, warmup_steps=10,
                                learning_rate=2e-3, checkpoint_every=1000, preview_every=1000, ablation_mode="none",
                                preview_inference_steps=2)
    result = train_generator(dataset, tmp_path_factory.mktemp("conditioning") / "run", settings, fold="all",
                             progress=False)
    from nnunet_synth.generator.checkpoints import load_generator
    unet, config = load_generator(result.final_folder, dataset, "cpu")
    return dataset, unet, config


def model_maps(dataset, config, count):
    """Label maps at the model size from real slices with lung and lesion, two of them quite different."""
    window = ImageWindows.from_dict(config.window)
    maps = []
    for case_id in dataset.case_ids:
        image, label_map, _ = dataset.read_case(case_id)
        for index in range(label_map.shape[0]):
            model_map = fit_slice(window.to_model(image[:, index]), label_map[index], SIZE)[1]
            if (model_map == 2).sum() >= 15 and (model_map == 1).sum() >= 40:
                maps.append(model_map)
    return maps[:: max(1, len(maps) // count)][:count]


def test_generated_intensities_follow_the_map_and_swapping_maps_swaps_the_images(map_determined_generator):
    dataset, unet, config = map_determined_generator
    maps = model_maps(dataset, config, 4)
    assert len(maps) == 4
    seeds = [11, 12, 13, 14]
    images = sample_images(unet, config, np.stack(maps), seeds, num_inference_steps=10, batch_size=4, progress=False)
    # measured after 100 steps: background about -0.55, lung -0.15..0, lesion 0.03..0.16 (model units); with
    # all-background maps instead, the three regions all come out near -0.5
    for image, label_map in zip(images, maps):
        means = [image[0][label_map == value].mean() for value in range(3)]
        assert means[0] + 0.3 < means[1] < means[2] - 0.05, means     # background < lung < lesion, as trained
    # the same noise (seeds) with the maps swapped pairwise: each image follows its new map
    swapped = sample_images(unet, config, np.stack([maps[1], maps[0], maps[3], maps[2]]), seeds,
                            num_inference_steps=10, batch_size=4, progress=False)
    ideal = [m.astype(np.float64) for m in maps]   # intensity rises linearly with the label value, as trained
    for first, second in ((0, 1), (2, 3)):
        for image, own, other in ((swapped[first], ideal[second], ideal[first]),
                                  (swapped[second], ideal[first], ideal[second])):
            assert (np.corrcoef(image[0].ravel(), own.ravel())[0, 1]
                    > np.corrcoef(image.ravel(), other.ravel())[0, 1] + 0.1)
