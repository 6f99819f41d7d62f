"""The package's layers point one way, in the order its folders tell (docs/layout.md): dataset -> masks ->
generator -> sampling -> quality -> writer -> the generate step (image sources) -> evaluation -> trainers ->
commands. A module may import its own layer and the layers before it, never a later one; the library never
imports ``trainers`` or ``dataset_tools``. Imports inside functions count too. Code copied from nnU-Net or from
another of our modules is marked ``# Copied from`` and must match its source."""
import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# installed name of each source folder (pyproject.toml maps dataset_tools/ and trainers/ into the package)
SOURCE_FOLDERS = {"nnunet_synth": REPO_ROOT / "nnunet_synth", "nnunet_synth.dataset_tools": REPO_ROOT / "dataset_tools",
                  "nnunet_synth.trainers": REPO_ROOT / "trainers"}
BASE = ("errors", "atomic", "preview_grid", "trainer_lookup", "nnunet_paths")   # importable from every layer
LAYERS = [
    ("dataset",),
    ("masks",),
    ("generator",),
    ("sampling",),
    ("quality",),
    ("writer", "provenance"),
    ("fold_cases", "image_sources", "preflight", "generate_step"),
    ("evaluation", "example"),
    ("trainers",),
    ("dataset_tools",),
]


def layer_of(module: str):
    """Layer index of an ``nnunet_synth...`` module name (None for base modules and the package itself)."""
    parts = module.split(".")
    if len(parts) < 2 or parts[1] in BASE:
        return None
    for index, names in enumerate(LAYERS):
        if parts[1] in names:
            return index
    raise AssertionError(f"{module}: no layer is declared for nnunet_synth.{parts[1]} (add it to LAYERS)")


def source_modules():
    for package, folder in SOURCE_FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            relative = path.relative_to(folder).with_suffix("")
            parts = [p for p in relative.parts if p != "__init__"]
            yield ".".join([package, *parts]), path


def imported_modules(path: Path, module: str):
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                yield node.lineno, ".".join(base + ([node.module] if node.module else []))
            elif node.module:
                yield node.lineno, node.module


def test_every_import_points_to_an_earlier_layer():
    upward = []
    for module, path in source_modules():
        own = layer_of(module)
        for line, imported in imported_modules(path, module):
            if not imported.startswith("nnunet_synth.") or own is None:
                continue
            target = layer_of(imported)
            if target is not None and target > own:
                upward.append(f"{path.relative_to(REPO_ROOT)}:{line} imports {imported} "
                              f"({LAYERS[own][0]} -> {LAYERS[target][0]})")
    assert not upward, "imports from a later layer:\n" + "\n".join(upward)


def test_the_fold_orchestration_imports_no_image_source():
    """``fold_cases`` serves every image source, so it may not import one (nor preflight, which checks them, nor
    the entry point)."""
    path = REPO_ROOT / "nnunet_synth" / "fold_cases.py"
    sources = {"image_sources", "preflight", "generate_step"}
    imported = [name for _, name in imported_modules(path, "nnunet_synth.fold_cases")
                if name.startswith("nnunet_synth.") and name.split(".")[1] in sources]
    assert not imported, imported


def test_every_listed_module_exists():
    """A name in ``LAYERS`` or ``BASE`` is a module or package of ours, so the lists cannot drift from the code."""
    installed = {name.split(".")[1]: folder for name, folder in SOURCE_FOLDERS.items() if "." in name}
    package = SOURCE_FOLDERS["nnunet_synth"]
    missing = [name for name in [*BASE, *(n for names in LAYERS for n in names)]
               if name not in installed and not (package / f"{name}.py").is_file()
               and not (package / name / "__init__.py").is_file()]
    assert not missing, f"listed in tests/test_layers.py but not in nnunet_synth/: {missing}"


def test_the_image_sources_stand_side_by_side():
    """A source module imports no other source (they share only ``base``, ``generators`` and ``previews``), and
    no source imports the checks or the entry point built on the registry."""
    folder = REPO_ROOT / "nnunet_synth" / "image_sources"
    sources = {"whole_slice", "inpaint", "copy_paste"}
    later = {"preflight", "generate_step"}
    found = []
    for path in sorted(folder.glob("*.py")):
        module = f"nnunet_synth.image_sources.{path.stem}"
        for line, name in imported_modules(path, module):
            parts = name.split(".")
            if len(parts) > 1 and parts[1] in later:
                found.append(f"{path.name}:{line} imports {name}")
            if path.stem in sources and parts[:2] == ["nnunet_synth", "image_sources"] and len(parts) > 2 and \
                    parts[2] in sources - {path.stem}:
                found.append(f"{path.name}:{line} imports {name}")
    preflight = REPO_ROOT / "nnunet_synth" / "preflight.py"
    found += [f"preflight.py:{line} imports {name}"
              for line, name in imported_modules(preflight, "nnunet_synth.preflight")
              if name.startswith("nnunet_synth.generate_step")]
    assert not found, found


@pytest.mark.parametrize("module", ["nnunet_synth.masks.balance", "nnunet_synth.image_sources.whole_slice",
                                    "nnunet_synth.dataset_tools.generate"])
def test_layer_of_knows_the_stages(module):
    assert layer_of(module) is not None


# ``# Copied from <module>.<name> [with A->B,C->D]`` on the line above a copied function or method (the convention of
# diffusers' ``make fix-copies``); the source is nnU-Net's or one of ours (a file that ships alone, e.g. in final/)
COPIED_FROM = re.compile(r"\s*# Copied from ((?:nnunetv2|nnunet_synth)\.[\w.]+)(?: with (.*))?$")


def resolve(dotted: str):
    """The object a dotted name points at: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for name in parts[split:]:
            value = getattr(value, name)
        return value
    raise AssertionError(f"{dotted}: no module of it can be imported")


def copied_functions():
    """(line, our function, its source, replacements) for every ``# Copied from`` marker in our source folders."""
    found = []
    for module_name, path in source_modules():
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines):
            match = COPIED_FROM.match(line)
            if not match:
                continue
            where = f"{path.relative_to(REPO_ROOT)}:{number + 1}"
            definition = re.match(r"(\s*)def (\w+)", lines[number + 1])
            assert definition, f"{where}: a Copied from marker stands on the line above the def it marks"
            module = importlib.import_module(module_name)
            if not definition.group(1):
                ours = vars(module)[definition.group(2)]
            else:
                ours = next(vars(value)[definition.group(2)] for value in vars(module).values()
                            if inspect.isclass(value) and value.__module__ == module_name
                            and definition.group(2) in vars(value))
            replacements = [pair.split("->") for pair in match.group(2).split(",")] if match.group(2) else []
            found.append((where, ours, resolve(match.group(1)), replacements))
    return found


def test_copied_code_matches_its_source():
    """Each marked copy equals its source (the installed nnU-Net's, or our module's) after the declared
    replacements, whitespace aside: a change in the source fails here instead of being silently missed."""
    copies = copied_functions()
    assert sorted(f"{ours.__module__}.{ours.__qualname__}" for _, ours, _, _ in copies) == [
        "nnunet_synth.generator.inpaint_pipeline._autocast", "nnunet_synth.generator.inpaint_pipeline.initial_noise",
        "nnunet_synth.trainers.synth_mix.nnUNetTrainerSynthMix.get_dataloaders"]
    for where, ours, original, replacements in copies:
        expected = inspect.getsource(original)
        for old, new in replacements:
            assert old in expected, f"{where}: {original.__qualname__} no longer contains {old!r}"
            expected = expected.replace(old, new)
        assert " ".join(inspect.getsource(ours).split()) == " ".join(expected.split()), (
            f"{where}: {ours.__qualname__} differs from {original.__module__}.{original.__qualname__}: update the copy")


def test_every_package_folder_is_installed():
    """pyproject.toml lists the packages it installs: a package folder missing from the list imports in an editable
    install and is absent from a wheel."""
    import tomllib
    setuptools = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {Path(folder): name for name, folder in setuptools["package-dir"].items()}
    found = set()
    for folder, name in folders.items():
        for init in (REPO_ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO_ROOT / folder).parts
            found.add(".".join((name, *relative)))
    missing = sorted(found - set(setuptools["packages"]))
    assert not missing, f"package folders not in pyproject.toml's packages: {missing}"
