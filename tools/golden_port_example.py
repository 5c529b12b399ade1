"""A worked example: check a port of Qwen3.5 against minqwen with golden outputs.

The "port" below is a few lines of NumPy written without minqwen's model code: it reads the
checkpoint with safetensors, embeds the prompt, applies layer 0's input RMSNorm and, for a
Gated DeltaNet layer 0, its four input projections. It writes those intermediates under the
golden tap names (``minqwen golden taps`` lists them) into ``port.safetensors``; then

    minqwen golden record --model DIR --tokens IDS --taps <the port's taps> --out minqwen.safetensors
    minqwen golden compare port.safetensors minqwen.safetensors

says whether the two agree, and if not, which tap is the first to part ways. Try it:

    python tools/golden_port_example.py --model tests/fixtures/text_tied_fp32 --tokens 5,17,42,99
    python tools/golden_port_example.py --model tests/fixtures/text_tied_fp32 --tokens 5,17,42,99 --bug

``--bug`` makes the port commit a classic porting mistake: scaling by the stored norm weight
``w`` instead of ``1 + w`` (Qwen3.5's decoder norms are zero-centred). The comparison then
passes ``embed`` and marks ``layers.0.input_layernorm`` as the first divergence (exit code 1).

The file a port writes is plain safetensors: the tensors, and a ``__metadata__`` whose values
are JSON text — ``token_ids`` (the prompt) and ``config_sha256`` (SHA-256 of the text config
as canonical JSON) are the two a comparison requires. This example takes the hash from
``minqwen.golden.config_hash``; a port in another language can copy ``config_sha256`` from
the reference recording of the same checkpoint instead.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import ml_dtypes  # noqa: F401  (lets safetensors read bf16 tensors as NumPy arrays)
import numpy as np
from safetensors.numpy import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from argtypes import output_folder  # noqa: E402

# ---------------------------------------------------------------------------- the "port"


def read_weights(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint as float32, with the text model's prefix removed."""
    weights = {}
    for file in sorted(folder.glob("*.safetensors")):
        if file.name == "expected.safetensors":  # the test fixtures keep reference outputs beside the weights
            continue
        for name, value in load_file(str(file)).items():
            for prefix in ("model.language_model.", "model."):
                if name.startswith(prefix):
                    weights[name[len(prefix):]] = value.astype(np.float32)
                    break
    return weights


def port_taps(folder: Path, token_ids: list[int], bug: bool = False) -> dict[str, np.ndarray]:
    """The port's forward pass up to layer 0's input projections, as {tap name: array}."""
    config = json.loads((folder / "config.json").read_text())
    text = config.get("text_config", config)
    eps = text.get("rms_norm_eps", 1e-6)
    w = read_weights(folder)

    x = w["embed_tokens.weight"][token_ids]  # [T, H]
    taps = {"embed": x}

    scale = w["layers.0.input_layernorm.weight"]  # [H], stored as an offset from one
    if not bug:
        scale = 1.0 + scale
    h = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale  # [T, H]
    taps["layers.0.input_layernorm"] = h

    layer_types = text.get("layer_types")
    if layer_types is None or layer_types[0] == "linear_attention":
        hv, dv = text["linear_num_value_heads"], text["linear_value_head_dim"]
        for part in ("qkv", "z", "b", "a"):
            out = h @ w[f"layers.0.linear_attn.in_proj_{part}.weight"].T  # [T, out]
            taps[f"layers.0.linear_attn.in_proj_{part}"] = out.reshape(len(token_ids), hv, dv) if part == "z" else out
    return taps


def write_golden(taps: dict[str, np.ndarray], path: Path, token_ids: list[int], config_sha256: str) -> None:
    """The golden file format: tensors by tap name; metadata values are JSON text."""
    tensors = {"token_ids": np.array(token_ids, dtype=np.int64)}
    tensors.update({name: np.ascontiguousarray(value, dtype=np.float32) for name, value in taps.items()})
    metadata = {
        "format": "minqwen-golden/1",
        "producer": "golden_port_example (NumPy)",
        "token_ids": token_ids,
        "config_sha256": config_sha256,
    }
    save_file(tensors, str(path), metadata={key: json.dumps(value) for key, value in metadata.items()})


# ---------------------------------------------------------------------------- the check


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="checkpoint folder")
    parser.add_argument("--tokens", required=True, help="prompt token ids, e.g. 5,17,42,99")
    parser.add_argument("--bug", action="store_true", help="forget the 1 + w of the zero-centred RMSNorm")
    parser.add_argument("--workdir", type=output_folder,
                        help="where to write the two recordings (default: a temporary folder, deleted at the end)")
    args = parser.parse_args(argv)

    from minqwen.config import load_config
    from minqwen.errors import MinqwenError

    try:  # check the arguments before the port runs: it is written to be short, not defensive
        config = load_config(args.model)
        try:
            token_ids = [int(t) for t in args.tokens.replace(",", " ").split()]
        except ValueError:
            raise MinqwenError(f"--tokens must be whole numbers separated by commas, got {args.tokens!r}") from None
        if not token_ids or not all(0 <= t < config.vocab_size for t in token_ids):
            raise MinqwenError(f"--tokens must be 1 or more ids in 0 … {config.vocab_size - 1}, got {args.tokens!r}")
    except MinqwenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.workdir is None:  # the recordings go when the comparison is done
        with tempfile.TemporaryDirectory(prefix="golden-port-") as workdir:
            return record_and_compare(args, Path(workdir), token_ids, config)
    args.workdir.mkdir(parents=True, exist_ok=True)
    return record_and_compare(args, args.workdir, token_ids, config)


def record_and_compare(args, workdir: Path, token_ids: list[int], config) -> int:
    """The port's recording against minqwen's, both written to ``workdir``: golden compare's exit code."""
    from minqwen.golden import config_hash

    port_file, minqwen_file = workdir / "port.safetensors", workdir / "minqwen.safetensors"

    taps = port_taps(args.model, token_ids, bug=args.bug)
    write_golden(taps, port_file, token_ids, config_hash(config))
    print(f"port wrote {len(taps)} taps → {port_file}")

    minqwen = [sys.executable, "-m", "minqwen", "golden"]
    recorded = subprocess.run(minqwen + ["record", "--model", str(args.model), "--tokens", args.tokens,
                                         "--taps", ",".join(taps), "--out", str(minqwen_file)])
    if recorded.returncode != 0:  # an error (exit 2 here), not a divergence (exit 1)
        print(f"error: minqwen golden record refused this checkpoint (exit {recorded.returncode}; its message is "
              "above), so there is nothing to compare with", file=sys.stderr)
        return 2
    result = subprocess.run(minqwen + ["compare", str(port_file), str(minqwen_file)])
    print(f"minqwen golden compare exited with {result.returncode}"
          f" ({'within tolerance' if result.returncode == 0 else 'diverged'})")
    return result.returncode


if __name__ == "__main__":
    raise SystemExit(main())
