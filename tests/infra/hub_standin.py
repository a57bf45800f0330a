"""A local stand-in for the Hugging Face Hub's HTTP API, serving a Phi-2-layout checkpoint at tiny size.

The Hub is unreachable here, so `infra/prepare_model.py microsoft/phi-2` is tested against this server on
127.0.0.1 (HF_ENDPOINT, which huggingface_hub reads at import). It serves exactly what huggingface_hub 2.4's
`snapshot_download` of a pinned commit asks for, as the Hub answers it:
- `GET /api/models/{repo}/tree/{commit}?recursive=...`: the file listing (size, git blob sha1 as `oid`, and for
  LFS files `lfs.oid` = sha256). With a commit sha as revision, snapshot_download skips the model-info call.
- `HEAD|GET /{repo}/resolve/{commit}/{file}`: small files directly (ETag = git blob sha1, X-Repo-Commit);
  LFS files (the weights) as the Hub does, with a 302 to a CDN host carrying X-Linked-Etag (sha256),
  X-Linked-Size and X-Repo-Commit. The "CDN" is a second server on 127.0.0.2 (another loopback address, so
  huggingface_hub treats it as a different host, as it does the real CDN).
Any other revision answers 404 with `X-Error-Code: RevisionNotFound`, any other file `EntryNotFound`.

Xet: the stand-in serves no Xet metadata (no `xetHash` in the listing, no `X-Xet-*` headers), and the
subprocess runs with HF_HUB_DISABLE_XET=1, so downloads take the plain HTTP path even though hf-xet is
installed. The real Hub serves Phi-2 through Xet to clients that have hf-xet: that path is not covered here.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import torch
from safetensors.torch import save_file

PINNED = "ef382358ec9e382308935a992d908de099b64c23"
REPO = "microsoft/phi-2"
CDN_HOST = "127.0.0.2"
# microsoft/phi-2's config.json at the pinned revision, keys and values as published, except the sizes.
PHI2_CONFIG = {
    "_name_or_path": "microsoft/phi-2",
    "architectures": ["PhiForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 50256,
    "embd_pdrop": 0.0,
    "eos_token_id": 50256,
    "hidden_act": "gelu_new",
    "hidden_size": 2560,
    "initializer_range": 0.02,
    "intermediate_size": 10240,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 2048,
    "model_type": "phi",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "partial_rotary_factor": 0.4,
    "qk_layernorm": False,
    "resid_pdrop": 0.1,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.37.0",
    "use_cache": True,
    "vocab_size": 51200,
}
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}
GENERATION_CONFIG = {"_from_model_config": True, "bos_token_id": 50256, "eos_token_id": 50256}
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
# Files of the real repository that preparation must not download.
EXTRA_FILES = {
    ".gitattributes": "*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
    "README.md": "---\nlicense: mit\n---\n# Phi-2 (local stand-in)\n",
    "LICENSE": "MIT License (stand-in)\n",
}


def phi2_tensor_names(layers: int) -> set[str]:
    """Phi-2's tensor names (its model.safetensors.index.json), for `layers` decoder layers."""
    names = {"model.embed_tokens.weight", "model.final_layernorm.weight", "model.final_layernorm.bias"}
    names |= {"lm_head.weight", "lm_head.bias"}
    for i in range(layers):
        for part in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.dense",
            "mlp.fc1",
            "mlp.fc2",
        ):
            names |= {f"model.layers.{i}.{part}.weight", f"model.layers.{i}.{part}.bias"}
        names |= {f"model.layers.{i}.input_layernorm.weight", f"model.layers.{i}.input_layernorm.bias"}
    return names


def build_checkpoint(directory: Path, tokenizer) -> dict[str, torch.Tensor]:
    """Write the repository's files into `directory`; returns the fp16 tensors as stored."""
    from transformers import PhiConfig, PhiForCausalLM

    config = {**PHI2_CONFIG, **TINY}
    torch.manual_seed(0)
    model = PhiForCausalLM(PhiConfig(**{k: v for k, v in config.items() if not k.startswith("_")}))
    # Trained weights have a wider range than the initialiser's: give the values fp16 detail bf16 lacks.
    tensors = {name: (t.detach() * 3 + 0.001).to(torch.float16).contiguous() for name, t in model.state_dict().items()}
    assert set(tensors) == phi2_tensor_names(TINY["num_hidden_layers"]), "not Phi-2's tensor names"
    directory.mkdir(parents=True, exist_ok=True)
    half = TINY["num_hidden_layers"] // 2
    first = {
        n: t
        for n, t in tensors.items()
        if n == "model.embed_tokens.weight" or n.startswith(tuple(f"model.layers.{i}." for i in range(half)))
    }
    second = {n: t for n, t in tensors.items() if n not in first}
    for name, part in zip(SHARDS, (first, second), strict=True):
        save_file(part, directory / name, metadata={"format": "pt"})
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
        "weight_map": {n: SHARDS[0] if n in first else SHARDS[1] for n in sorted(tensors)},
    }
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "generation_config.json").write_text(
        json.dumps({**GENERATION_CONFIG, "transformers_version": "4.37.0"}, indent=2)
    )
    tokenizer.save_pretrained(directory)
    for name, text in EXTRA_FILES.items():
        (directory / name).write_text(text)
    return tensors


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's object id, not a security hash


@dataclass
class HubStandIn:
    """Two servers (the Hub on 127.0.0.1, its CDN on 127.0.0.2) over the files of `root`."""

    root: Path
    requests: list[tuple[str, str]] = field(default_factory=list)
    tampered: set[str] = field(default_factory=set)  # files served with one byte changed (after hashing)

    def __post_init__(self) -> None:
        self.files = {p.name: p.read_bytes() for p in sorted(self.root.iterdir()) if p.is_file()}
        self.lfs = {name for name in self.files if name.endswith(".safetensors")}
        self.sha256 = {name: hashlib.sha256(data).hexdigest() for name, data in self.files.items()}
        self.hub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler(cdn=False))
        self.cdn = http.server.ThreadingHTTPServer((CDN_HOST, 0), self._handler(cdn=True))
        self.threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (self.hub, self.cdn)]
        for thread in self.threads:
            thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.hub.server_address[1]}"

    def close(self) -> None:
        for server in (self.hub, self.cdn):
            server.shutdown()
            server.server_close()

    def body(self, name: str) -> bytes:
        data = self.files[name]
        return data[:-1] + bytes([data[-1] ^ 1]) if name in self.tampered else data

    def tree(self) -> list[dict]:
        entries = []
        for name, data in self.files.items():
            entry = {"type": "file", "path": name, "size": len(data), "oid": git_blob_sha1(data)}
            if name in self.lfs:
                pointer = (
                    f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256[name]}\nsize {len(data)}\n"
                )
                entry["oid"] = git_blob_sha1(pointer.encode())
                entry["lfs"] = {"oid": self.sha256[name], "size": len(data), "pointerSize": len(pointer)}
            entries.append(entry)
        return entries

    def _handler(self, cdn: bool):
        stand_in = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet: the test reads `requests` instead
                pass

            def do_HEAD(self) -> None:
                self._answer(head=True)

            def do_GET(self) -> None:
                self._answer(head=False)

            def _send(self, status: int, headers: dict[str, str], body: bytes, head: bool) -> None:
                self.send_response(status)
                for key, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(key, value)
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _error(self, status: int, code: str, message: str, head: bool) -> None:
                body = json.dumps({"error": message}).encode()
                headers = {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message}
                self._send(status, headers, body, head)

            def _answer(self, head: bool) -> None:
                path = unquote(urlsplit(self.path).path)
                stand_in.requests.append((("CDN " if cdn else "") + self.command, path))
                if cdn:
                    name = path.removeprefix("/lfs/")
                    if name not in stand_in.lfs:
                        return self._error(404, "EntryNotFound", "no such object", head)
                    return self._send(200, {"Content-Type": "application/octet-stream"}, stand_in.body(name), head)
                tree = f"/api/models/{REPO}/tree/"
                resolve = f"/{REPO}/resolve/"
                if path.startswith(tree):
                    revision = path.removeprefix(tree).strip("/")
                    if revision != PINNED:
                        return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
                    return self._send(
                        200, {"Content-Type": "application/json"}, json.dumps(stand_in.tree()).encode(), head
                    )
                if path.startswith(resolve):
                    revision, _, name = path.removeprefix(resolve).partition("/")
                    if revision != PINNED:
                        return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
                    if name not in stand_in.files:
                        return self._error(404, "EntryNotFound", f"{name} does not exist at {revision}", head)
                    data = stand_in.files[name]
                    if name in stand_in.lfs:
                        location = f"http://{CDN_HOST}:{stand_in.cdn.server_address[1]}/lfs/{name}"
                        headers = {
                            "Location": location,
                            "X-Repo-Commit": PINNED,
                            "X-Linked-Etag": f'"{stand_in.sha256[name]}"',
                            "X-Linked-Size": str(len(data)),
                            "ETag": f'"{git_blob_sha1(data)}"',
                        }
                        return self._send(302, headers, b"", head)
                    headers = {"X-Repo-Commit": PINNED, "ETag": f'"{git_blob_sha1(data)}"'}
                    return self._send(200, headers, stand_in.body(name), head)
                return self._error(404, "RepoNotFound", f"not served by the stand-in: {path}", head)

        return Handler
