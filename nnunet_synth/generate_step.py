"""The generate step of one dataset, as a library call: ``generate(dataset, request)`` checks everything first
(``preflight.check_generate_request``), then makes each requested fold's cases (``generate_fold``): the fold's
generator, trained on its training cases when it has none, the source's settings, then the image source writes
the cases (``image_sources``). ``nnsynth_generate``, the demo and the downstream evaluation all run it."""
from nnunet_synth.dataset import RawDataset
from nnunet_synth.generator.training import train_generator
from nnunet_synth.image_sources import image_source
from nnunet_synth.preflight import GeneratePlan, GenerateRequest, check_generate_request, fold_generator_folder
from nnunet_synth.writer.synthetic_store import SyntheticStore


def generate(dataset: RawDataset, request: GenerateRequest, report=None, progress=True) -> list:
    """Check ``request``, then make the cases of each of its folds; ``report(summary)`` after each fold. Returns
    the folds' summaries (``fold_cases.write_fold_cases``)."""
    plan = check_generate_request(dataset, request, progress)    # everything is checked before anything is written
    summaries = []
    for fold in request.folds:
        summaries.append(generate_fold(dataset, request, fold, plan))
        if report is not None:
            report(summaries[-1])
    return summaries


def generate_fold(dataset: RawDataset, request: GenerateRequest, fold, plan: GeneratePlan) -> dict:
    """The cases of one fold of a checked request (``plan``: what ``check_generate_request`` found)."""
    source = image_source(request.image_source)
    generator_folder, must_train = fold_generator_folder(dataset, request, fold)
    if must_train:
        run_folder = generator_folder.parent
        print(f"no trained generator in {run_folder}: training one (preset {request.preset}, mode "
              f"{request.generator_mode}, fold {fold})")
        train_generator(dataset, run_folder, request.training_settings(), fold=fold)
    settings = source.settings(request, plan.num_cases[fold], plan.units[fold], SyntheticStore(dataset), fold)
    return source.write_cases(dataset, settings, fold, generator_folder, request.device, request.overwrite,
                              request.num_shards, request.shard_index)
