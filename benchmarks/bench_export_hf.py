"""Size of a Hugging Face bitnet folder's model.safetensors against qtrain's packed file.

Builds a Llama of about 17 M parameters (hidden 512, intermediate 1376, 4 layers, 8 heads,
4,096 token ids, untied head: 12.6 M of them in the block projections), trains it for a few
steps through `qtrain train` (bc-adamw, ternary grid, scale absmean-tensor, act_bits 8: the
run `qtrain export --format hf` writes in transformers' bitnet format), exports it with
`--format packed` and `--format hf`, and prints both sizes, their ratio and what each file
holds: the ternary weights (2 bits each in both), their scales, the float32 tensors
(embeddings, head, norms and the act_norm RMSNorms; float32 in both files) and the rest
(safetensors' JSON header; the packed file's carries qtrain's metadata and CRC-32s). Packed
sizes do not depend on the values, so a few steps measure what a trained model would.

Run:  python benchmarks/bench_export_hf.py [--steps 2] [--layers 4] [--hidden 512]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import struct
import tempfile
import time
from pathlib import Path

from qtrain.cli import main as qtrain


def llama_folder(path: Path, *, hidden: int, intermediate: int, layers: int, heads: int,
                 vocab: int) -> None:  # fmt: skip
    """config.json of the Llama (no weights: the run initialises them from the config)."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=256,
    )  # fmt: skip
    config.save_pretrained(path)


def words(count: int) -> str:
    """`count` seeded words of a 12-word vocabulary (the run reads them by character)."""
    import torch

    vocabulary = ("the", "king", "queen", "of", "and", "to", "my", "lord", "what", "thou",
                  "art", "love")  # fmt: skip
    picks = torch.randint(len(vocabulary), (count,), generator=torch.Generator().manual_seed(0))
    return " ".join(vocabulary[i] for i in picks.tolist())


def tensor_bytes(path: Path) -> dict[str, int]:
    """Bytes of a safetensors file by kind: uint8 codes, scales, float tensors, header."""
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    kinds = {"ternary codes (uint8)": 0, "scales": 0, "float32 tensors": 0}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        scale = name.endswith((":scale", ".weight_scale"))
        kind = ("scales" if scale else "ternary codes (uint8)" if info["dtype"] == "U8" else
                "float32 tensors")  # fmt: skip
        assert scale or info["dtype"] in ("U8", "F32"), (name, info["dtype"])
        kinds[kind] += end - begin
    kinds["header and padding"] = len(data) - sum(kinds.values())
    return kinds


def run_quietly(argv: list[str]) -> float:
    """Seconds `qtrain argv` took (its output swallowed; a failure raises)."""
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        assert qtrain(argv) == 0, argv
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="bc-adamw steps before export")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        llama_folder(root / "llama", hidden=args.hidden, intermediate=args.intermediate,
                     layers=args.layers, heads=args.heads, vocab=args.vocab)  # fmt: skip
        (root / "text.txt").write_text(words(20_000))
        run, packed, folder = root / "run", root / "model.safetensors", root / "hf"
        seconds = run_quietly([
            "train", "--model", "hf", "--dataset", "shakespeare-char",
            "--set", f"hf_path={root / 'llama'}", "--set", f"text_file={root / 'text.txt'}",
            "--method", "bc-adamw", "--grid", "ternary", "--set", "scale=absmean-tensor",
            "--set", "policy=linear", "--set", "act_bits=8", "--set", "block_size=64",
            "--batch-size", "4", "--set", f"max_steps={args.steps}",
            "--set", f"eval_every={args.steps}", "--set", "eval_batches=1",
            "--set", "device=cpu", "--out", str(run),
        ])  # fmt: skip
        run_quietly(["export", str(run), "--format", "packed", "--out", str(packed)])
        run_quietly(["export", str(run), "--format", "hf", "--out", str(folder)])
        config = json.loads((folder / "config.json").read_text())
        assert config["quantization_config"]["quant_method"] == "bitnet", "not a bitnet folder"

        from qtrain.export import load

        model = load(run)
        total = sum(p.numel() for p in model.parameters())
        projections = sum(
            p.numel() for n, p in model.named_parameters() if n.endswith("_proj.weight")
        )
        print(
            f"Llama hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} "
            f"layers, {args.heads} heads, vocabulary {args.vocab}: {total:,} parameters, "
            f"{projections:,} in ternary block projections; {args.steps} bc-adamw steps "
            f"(act_bits 8, act_norm rms) in {seconds:.0f} s"
        )
        files = {
            "packed (--format packed)": packed,
            "bitnet (--format hf)": folder / "model.safetensors",
        }
        parts = {label: tensor_bytes(path) for label, path in files.items()}
        labels = list(files)
        print(f"{'':26s}{labels[0]:>26s}{labels[1]:>26s}")
        for kind in parts[labels[0]]:
            print(f"{kind:26s}" + "".join(f"{parts[label][kind]:>26,}" for label in labels))
        sizes = {label: path.stat().st_size for label, path in files.items()}
        print(f"{'file size':26s}" + "".join(f"{sizes[label]:>26,}" for label in labels))
        ratio = sizes[labels[1]] / sizes[labels[0]]
        print(f"bitnet model.safetensors / packed file: {ratio:.4f} ({(ratio - 1) * 100:+.2f}%)")
        others = sum(p.stat().st_size for p in folder.iterdir() if p.name != "model.safetensors")
        print(f"the folder's other files (config.json, tokenizer): {others:,} bytes")


if __name__ == "__main__":
    main()
