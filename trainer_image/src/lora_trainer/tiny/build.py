"""Build (or reuse) the tiny model, its tokenizer and the fine-tuning data in one directory.

Layout of the output directory::

    model/          tokenizer + LlamaForCausalLM (safetensors), loadable with Auto* classes
    data/train.jsonl, data/eval.jsonl
                    {"conversations": [{"role": ..., "content": ...}, ...]} per line
    manifest.json   seed, recipe, sizes, versions, per-file and overall sha256; written last,
                    so a directory with a valid manifest is complete

Same seed, same recipe, same platform: byte-identical files.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import tokenizers
import torch
import transformers
from transformers import PreTrainedTokenizerFast

from .corpus import Conversation, finetuning_splits, pretraining_corpus
from .model import PretrainSettings, create_model, pack_blocks, pretrain
from .tokenizer import train_tokenizer

FORMAT_VERSION = 1
ENV_OUT_DIR = "LORA_OPERATOR_TINY_DIR"
FALLBACK_OUT_DIR = Path("/tmp/lora-operator/tiny")
MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".lock"
CONTENT_DIRS = ("model", "data")
VOCAB_SIZE = 1024
# Fixed so that results do not depend on the machine's core count.
TORCH_THREADS = 2


@dataclass(frozen=True)
class TinyAssets:
    """Where the generated assets are. `reused` is True when a cached build was kept."""

    model_dir: Path
    train_path: Path
    eval_path: Path
    manifest_path: Path
    reused: bool = False


def default_out_dir() -> Path:
    """`$LORA_OPERATOR_TINY_DIR` if set, else /tmp/lora-operator/tiny."""
    return Path(os.environ.get(ENV_OUT_DIR) or FALLBACK_OUT_DIR)


def build_tiny_assets(
    out_dir: Path, seed: int = 0, force: bool = False, *, pretrain_steps: int | None = None
) -> TinyAssets:
    """Generate the assets into `out_dir`, or keep a complete build with the same recipe.

    `pretrain_steps` overrides the recipe's step count (tests use a few steps); it is part
    of the cache key, like the seed.
    """
    settings = PretrainSettings()
    if pretrain_steps is not None:
        settings = replace(settings, steps=pretrain_steps)
    if not force and _is_complete(out_dir, seed, settings):
        return _assets(out_dir, reused=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(out_dir / LOCK_NAME):
        # Another process may have finished the same build while this one waited.
        if not force and _is_complete(out_dir, seed, settings):
            return _assets(out_dir, reused=True)
        staging = out_dir / f".staging-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            _generate(staging, seed, settings)
            _install(staging, out_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return _assets(out_dir, reused=False)


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    """The manifest of `out_dir`, or None when missing or unreadable."""
    try:
        manifest = json.loads((out_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def content_hashes(root: Path) -> tuple[str, dict[str, str]]:
    """sha256 of every file under the content dirs of `root`, and one hash over all of them."""
    files: dict[str, str] = {}
    for name in CONTENT_DIRS:
        for path in sorted((root / name).rglob("*")):
            if path.is_file():
                files[path.relative_to(root).as_posix()] = _sha256_file(path)
    overall = hashlib.sha256()
    for relative, digest in sorted(files.items()):
        overall.update(f"{relative}\0{digest}\n".encode())
    return overall.hexdigest(), files


def _assets(out_dir: Path, reused: bool) -> TinyAssets:
    return TinyAssets(
        model_dir=out_dir / "model",
        train_path=out_dir / "data" / "train.jsonl",
        eval_path=out_dir / "data" / "eval.jsonl",
        manifest_path=out_dir / MANIFEST_NAME,
        reused=reused,
    )


def _is_complete(out_dir: Path, seed: int, settings: PretrainSettings) -> bool:
    manifest = read_manifest(out_dir)
    if manifest is None:
        return False
    pretrain_summary = manifest.get("pretrain")
    same_recipe = (
        manifest.get("format_version") == FORMAT_VERSION
        and manifest.get("seed") == seed
        and isinstance(pretrain_summary, dict)
        and pretrain_summary.get("settings") == asdict(settings)
    )
    return same_recipe and manifest.get("content_sha256") == content_hashes(out_dir)[0]


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Serialise builders of one directory (parallel test workers, several pods)."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _generate(dest: Path, seed: int, settings: PretrainSettings) -> None:
    base = pretraining_corpus(seed)
    train, evaluation = finetuning_splits(seed)
    tokenizer = train_tokenizer(_tokenizer_texts(base), VOCAB_SIZE)
    # fork_rng: seeding the model must not reset the caller's global torch RNG.
    with _torch_threads(TORCH_THREADS), torch.random.fork_rng(devices=[]):
        model = create_model(tokenizer, seed)
        blocks = pack_blocks(_encode_documents(tokenizer, base), settings.block_size)
        losses = pretrain(model, blocks, settings, seed)
    model_dir = dest / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    for path in model_dir.iterdir():
        path.chmod(0o644)  # safetensors is written 0600; the cache may be shared read-only
    _write_jsonl(dest / "data" / "train.jsonl", train)
    _write_jsonl(dest / "data" / "eval.jsonl", evaluation)
    summary = {
        "settings": asdict(settings),
        "conversations": len(base),
        "tokens": int(blocks.numel()),
        "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
    }
    model_info = {
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "hidden_size": model.config.hidden_size,
        "layers": model.config.num_hidden_layers,
        "vocab_size": len(tokenizer),
    }
    _write_manifest(dest, seed, summary, model_info, {"train": train, "eval": evaluation})


def _tokenizer_texts(conversations: Sequence[Conversation]) -> list[str]:
    """Training text for BPE: what the chat template renders, minus the special tokens."""
    return ["".join(f"{m['role']}\n{m['content']}\n" for m in c) for c in conversations]


def _encode_documents(
    tokenizer: PreTrainedTokenizerFast, conversations: Sequence[Conversation]
) -> list[list[int]]:
    """Each conversation rendered with the chat template (which starts with bos), plus eos."""
    rendered = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    encoded = tokenizer([str(text) for text in rendered], add_special_tokens=False)
    return [[*ids, tokenizer.eos_token_id] for ids in encoded["input_ids"]]


def _write_jsonl(path: Path, conversations: Sequence[Conversation]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (json.dumps({"conversations": c}, ensure_ascii=False) + "\n" for c in conversations)
    path.write_text("".join(lines), encoding="utf-8")


def _write_manifest(
    dest: Path,
    seed: int,
    pretrain_summary: dict[str, Any],
    model_info: dict[str, Any],
    splits: dict[str, list[Conversation]],
) -> None:
    overall, files = content_hashes(dest)
    manifest = {
        "format_version": FORMAT_VERSION,
        "generator": "lora_trainer.tiny",
        "seed": seed,
        "pretrain": pretrain_summary,
        "model": model_info,
        "data": {
            name: {
                "samples": len(conversations),
                "multi_turn": sum(1 for c in conversations if len(c) > 3),
            }
            for name, conversations in splits.items()
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "content_sha256": overall,
        "files": files,
    }
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    (dest / MANIFEST_NAME).write_text(text, encoding="utf-8")


def _install(staging: Path, out_dir: Path) -> None:
    """Replace the build in `out_dir` by the staged one; the manifest goes last."""
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    for name in CONTENT_DIRS:
        shutil.rmtree(out_dir / name, ignore_errors=True)
        (staging / name).rename(out_dir / name)
    (staging / MANIFEST_NAME).rename(out_dir / MANIFEST_NAME)
