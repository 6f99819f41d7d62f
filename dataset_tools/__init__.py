"""Command-line tools and dataset converters (installed as ``nnunet_synth.dataset_tools``)."""
