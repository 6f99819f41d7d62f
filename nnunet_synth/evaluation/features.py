"""A Frechet feature distance whose feature network is an nnU-Net model trained on the real data.

FID's Inception network would have to come from a hub; an nnU-Net model of the same dataset is local and has
learned features of exactly this kind of image. Features: the encoder's bottleneck, averaged over space.
Images are normalised as nnU-Net's preprocessing does (the plans' normalisation scheme and intensity
properties) and resized to the configuration's patch size, the input size the network was trained on (and
large enough that no instance norm sees a single pixel).
"""
import numpy as np
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
from torchmetrics.image.fid import FrechetInceptionDistance

from nnunet_synth.errors import NnsynthError
from nnunet_synth.trainer_lookup import trainers_visible


class EncoderBottleneckFeatures(torch.nn.Module):
    """(N, C, H, W) normalised images -> (N, F) spatially averaged bottleneck features of an nnU-Net encoder."""

    def __init__(self, network: torch.nn.Module, num_features: int):
        super().__init__()
        self.encoder = network.encoder
        self.num_features = num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)[-1].float().mean(dim=(2, 3)).double()


class FeatureDistance:
    """Frechet distance between real and synthetic slices on the features of a trained nnU-Net model."""

    def __init__(self, model_folder, fold=0, checkpoint_name="checkpoint_final.pth", device="cpu"):
        predictor = nnUNetPredictor(device=torch.device(device), perform_everything_on_device=device != "cpu",
                                    allow_tqdm=False)
        try:
            with trainers_visible():        # nnU-Net looks the trainer class up by the name in the checkpoint
                predictor.initialize_from_trained_model_folder(str(model_folder), use_folds=(fold,),
                                                               checkpoint_name=checkpoint_name)
        except (FileNotFoundError, OSError) as error:
            raise NnsynthError(f"{model_folder}: cannot load fold {fold} ({error}): give the folder of an nnU-Net "
                               f"model (the one holding plans.json and fold_{fold}/)") from None
        if len(predictor.configuration_manager.patch_size) != 2:
            raise NnsynthError(f"{model_folder}: the feature network must be a 2d nnU-Net model")
        predictor.network.load_state_dict(predictor.list_of_parameters[0])
        self.network = predictor.network.to(device).eval()
        self.device = device
        self.configuration_manager = predictor.configuration_manager
        self.intensity_properties = predictor.plans_manager.foreground_intensity_properties_per_channel
        num_features = self.configuration_manager.network_arch_init_kwargs["features_per_stage"][-1]
        self.extractor = EncoderBottleneckFeatures(self.network, num_features)

    def normalise(self, images: np.ndarray) -> torch.Tensor:
        """(N, C, H, W) images in dataset units -> (N, C, P, P): each channel normalised as nnU-Net does, resized
        to the patch size."""
        preprocessor = DefaultPreprocessor(verbose=False)
        normalised = [preprocessor._normalize(image.astype(np.float32), np.zeros((1, *image.shape[1:]), np.int8),
                                              self.configuration_manager, self.intensity_properties)
                      for image in images]
        return torch.nn.functional.interpolate(torch.from_numpy(np.stack(normalised)).float(),
                                               size=tuple(self.configuration_manager.patch_size), mode="bilinear")

    @torch.no_grad()
    def distance(self, real_images: np.ndarray, synthetic_images: np.ndarray, batch_size=16) -> float:
        metric = FrechetInceptionDistance(feature=self.extractor, normalize=True)
        for images, is_real in ((real_images, True), (synthetic_images, False)):
            tensor = self.normalise(images)
            for start in range(0, len(tensor), batch_size):
                metric.update(tensor[start:start + batch_size].to(self.device), real=is_real)
        return float(metric.compute())
