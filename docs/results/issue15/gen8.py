"""Pre-train the real8 generators with the settings nnsynth_evaluate uses (it reuses a finished run folder)."""
from nnunet_synth.dataset import RawDataset
from nnunet_synth.evaluation.arm_generators import ArmGeneratorSettings, train_arm_generator
from nnunet_synth.evaluation.patients import split_patients
dataset = RawDataset.from_name("501")
split = split_patients(dataset.case_ids, 4, 8, 0)
for mode in ("mat", "cbmat"):
    print(mode, split.training, flush=True)
    train_arm_generator(dataset, f"exp/eval8/generators/real8_{mode}", split.training, mode, ArmGeneratorSettings())
