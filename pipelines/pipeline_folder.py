"""The saved folder of a `LatentTextDiffusionPipeline`: what `save_pretrained` adds to diffusers' layout
(the Hub-style entry point of diffusers' generic loader) and the checks `from_pretrained` runs first."""

from __future__ import annotations

import json
import os
from pathlib import Path

from latentlm.files import read_json, refuse_pickled_weights

__all__ = [
    "CUSTOM_PIPELINE_MODULE",
    "CUSTOM_PIPELINE_STUB",
    "COMPONENTS",
    "CLASSIFIERS_DIR",
    "mark_custom_pipeline",
    "check_pipeline_folder",
    "COMPONENT_LIBRARIES",
    "load_classifiers",
    "save_classifiers",
    "PipelineFolderMixin",
]

# File written next to model_index.json so that diffusers' generic loader,
# `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`, finds the pipeline class
# (a Hub-style custom pipeline). It only re-exports the installed class: the folder carries no
# code of its own, and `LatentTextDiffusionPipeline.from_pretrained` runs the file only when it is
# byte-for-byte this stub.
CUSTOM_PIPELINE_MODULE = "pipeline_latent_text_diffusion"
CUSTOM_PIPELINE_STUB = (
    '"""Hub-style entry point for diffusers\' generic loader; needs `pip install latentlm`."""\n'
    "from latentlm.pipelines.pipeline_latent_text_diffusion import LatentTextDiffusionPipeline\n"
    "\n"
    '__all__ = ["LatentTextDiffusionPipeline"]\n'
)

COMPONENTS = ("tokenizer", "language_model", "autoencoder", "denoiser", "scheduler")
#: sub-folder of the named classifiers of classifier guidance (``classifiers/<name>/``)
CLASSIFIERS_DIR = "classifiers"


def mark_custom_pipeline(folder: Path, index_name: str, class_name: str) -> None:
    """Point ``model_index.json`` at the entry-point stub and write it: a ["module", "Class"] pair in
    _class_name plus the module file is how diffusers finds a Hub-style custom pipeline
    (pipeline_loading_utils._resolve_custom_pipeline_and_cls)."""
    index_path = folder / index_name
    index = json.loads(index_path.read_text())
    index["_class_name"] = [CUSTOM_PIPELINE_MODULE, class_name]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (folder / f"{CUSTOM_PIPELINE_MODULE}.py").write_text(CUSTOM_PIPELINE_STUB)


#: the libraries a component of a saved pipeline may name in ``model_index.json``: importing any other
#: module (a file planted in the folder or on ``sys.path``) would run code the folder chose
COMPONENT_LIBRARIES = ("transformers", "diffusers", "latentlm")
_CODE_KEYS = ("auto_map", "custom_pipeline")


def check_pipeline_folder(folder: Path, index_name: str, class_name: str) -> None:
    """Check that ``folder`` is a complete saved pipeline of ``class_name`` whose loading runs no code
    of the folder's own choosing: ``_class_name`` names the installed class (and, where it is a
    ["module", "Class"] pair, the entry-point stub, byte for byte the one latentlm writes), every
    component comes from transformers, diffusers or latentlm, and no component config names code
    (``auto_map``). `LatentTextDiffusionPipeline.from_pretrained` then loads it without ever asking
    diffusers or transformers to import code from the folder."""
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{str(folder)!r} is not a pipeline folder. latentlm loads local folders written by "
            "save_pretrained (for a hub repo, download it first, e.g. huggingface_hub.snapshot_download)."
        )
    index_path = folder / index_name
    if not index_path.is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no {index_name}: it is not a saved pipeline folder.")
    index = read_json(index_path)
    missing = [name for name in COMPONENTS if name not in index or not (folder / name).is_dir()]
    if missing:
        raise ValueError(
            f"pipeline folder {str(folder)!r} is missing the component(s) {missing} "
            f"(expected sub-folders {list(COMPONENTS)} listed in {index_name}); save it again with save_pretrained."
        )
    refuse_pickled_weights(folder)
    refuse = f"{str(index_path)!r}: refusing to run code from the folder"
    named = index.get("_class_name")
    if named not in (class_name, [CUSTOM_PIPELINE_MODULE, class_name]):
        raise ValueError(
            f"{refuse}: _class_name is {named!r}, not {class_name!r} (or [{CUSTOM_PIPELINE_MODULE!r}, {class_name!r}])."
        )
    if isinstance(named, list):
        stub = folder / f"{CUSTOM_PIPELINE_MODULE}.py"
        if not stub.is_file() or stub.read_text() != CUSTOM_PIPELINE_STUB:
            raise ValueError(
                f"{str(stub)!r} differs from the file latentlm writes; refusing to run code from the folder. "
                "Load it with DiffusionPipeline.from_pretrained(folder, trust_remote_code=True) if you trust it."
            )
    for key in _CODE_KEYS:
        if key in index:
            raise ValueError(f"{refuse}: it sets {key!r}.")
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or entry[0] is None:
            continue
        library = str(entry[0])
        if library.split(".")[0] not in COMPONENT_LIBRARIES:
            raise ValueError(
                f"{refuse}: component {name!r} names the library {library!r}; a latentlm pipeline's components "
                f"come from {list(COMPONENT_LIBRARIES)}."
            )
    for path in sorted(folder.glob("*/*.json")):
        config = read_json(path)  # a damaged tokenizer.json or config.json is named here
        if isinstance(config, dict) and "auto_map" in config:
            raise ValueError(
                f"{str(path)!r} sets 'auto_map' (code of its own for transformers to import); refusing to run "
                "code from the folder. Remove the entry if the component is a standard transformers class."
            )


def save_classifiers(classifiers: dict, folder: Path) -> None:
    """Each carried `LatentClassifier` to ``<folder>/classifiers/<name>/`` (safetensors)."""
    for name, classifier in classifiers.items():
        classifier.save_pretrained(Path(folder) / CLASSIFIERS_DIR / name, safe_serialization=True)


def load_classifiers(folder: Path) -> dict:
    """``{name: LatentClassifier}`` from ``<folder>/classifiers/`` (empty when there is none)."""
    from latentlm.diffusion.modeling_latent_classifier import LatentClassifier

    root = Path(folder) / CLASSIFIERS_DIR
    refuse_pickled_weights(root)
    paths = sorted(root.iterdir()) if root.is_dir() else []
    return {path.name: LatentClassifier.from_pretrained(path) for path in paths if (path / "config.json").is_file()}


class PipelineFolderMixin:
    """`save_pretrained` / `from_pretrained` of a pipeline with classifiers: safetensors only, the
    Hub-style entry point, and no code from a loaded folder ever runs. Put before
    ``DiffusionPipeline`` in the bases."""

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True, **kwargs):
        """Save ``model_index.json`` + one folder per component (safetensors), loadable by this class
        and by ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``."""
        if not safe_serialization:
            raise ValueError("latentlm saves safetensors only; drop safe_serialization=False.")
        super().save_pretrained(save_directory, safe_serialization=True, **kwargs)
        save_directory = Path(save_directory)
        mark_custom_pipeline(save_directory, self.config_name, type(self).__name__)
        save_classifiers(self.classifiers, save_directory)

    @classmethod
    def load_config(cls, *args, **kwargs):
        """diffusers' `load_config`, with ``_class_name`` set to this class: diffusers then builds this
        installed class instead of importing the module a ["module", "Class"] entry names."""
        loaded = super().load_config(*args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        if isinstance(config, dict) and "_class_name" in config:
            config["_class_name"] = cls.__name__
        return loaded

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """Load a folder written by `save_pretrained` (offline; extra kwargs go to diffusers,
        e.g. ``torch_dtype``). No code from the folder runs: the class is this installed one, and
        `check_pipeline_folder` refuses folders whose index or component configs name other code."""
        for key in ("trust_remote_code", "custom_pipeline"):
            if kwargs.get(key):
                raise ValueError(
                    f"{cls.__name__}.from_pretrained loads no code from a folder; drop {key}= (the generic "
                    "DiffusionPipeline.from_pretrained(folder, trust_remote_code=True) is the way to run a folder's code)."
                )
            kwargs.pop(key, None)
        folder = Path(pretrained_model_name_or_path)
        check_pipeline_folder(folder, cls.config_name, cls.__name__)
        kwargs.setdefault("local_files_only", True)
        kwargs.setdefault("use_safetensors", True)
        pipe = super().from_pretrained(str(folder), **kwargs)
        for name, classifier in load_classifiers(folder).items():
            pipe.add_classifier(name, classifier.to(pipe.device))
        return pipe
