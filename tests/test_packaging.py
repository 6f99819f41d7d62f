"""The installed package claims only the `nnunet_synth` name and ships the embedded example."""
import importlib.metadata
import importlib.util
import subprocess
import sys

from nnunet_synth.example import example_source_folder


def test_no_generic_top_level_packages_are_installed(tmp_path):
    # from a neutral folder, so that the repository's own top-level folders are not on sys.path
    probe = ("import importlib.util as u; import nnunet_synth.trainers, nnunet_synth.dataset_tools; "
             "print(u.find_spec('trainers'), u.find_spec('dataset_tools'))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["None", "None"]
    import nnunet_synth.dataset_tools
    import nnunet_synth.trainers
    distribution = importlib.metadata.distribution("nnunet-synth")
    top_level_modules = {str(f).split("/")[0] for f in distribution.files or [] if str(f).endswith(".py")}
    assert top_level_modules <= {"nnunet_synth"} | {m for m in top_level_modules if m.startswith("__editable__")}


def test_every_command_is_an_nnsynth_console_script():
    distribution = importlib.metadata.distribution("nnunet-synth")
    scripts = [e for e in distribution.entry_points if e.group == "console_scripts"]
    assert scripts and all(e.name.startswith("nnsynth_") for e in scripts)


def test_embedded_example_is_real_small_and_licensed():
    folder = example_source_folder()
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 3 * 1024 * 1024
    assert "CC BY 4.0" in (folder / "SOURCE.md").read_text()
    assert len(list((folder / "ct").glob("*.png"))) == 37


def test_demo_converts_the_embedded_example(tmp_path):
    result = subprocess.run(["nnsynth_demo", "-o", str(tmp_path), "--stop-after", "convert"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Dataset990_Covid19Example" in result.stdout and "5 cases, 37 slices" in result.stdout
